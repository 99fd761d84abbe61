#!/usr/bin/env bash
# Reproduce examples/smoothing/README.md (issue 9): the seed paper's grid on 32 and 256 bundled digits, then the
# residual-noise check of the unconditioned model's samples (old Euler-Maruyama sde vs today's sde), the quality
# table of the rows discussed and samples.png.
# Usage: examples/smoothing/run.sh [OUT] ; FINETUNE_STEPS / SCRATCH_STEPS set the training lengths (the README's
# tables used 800 / 2000; about 2 hours on 2 CPU cores with the two sets run side by side). Rerunning skips the
# rows already in OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${1:-/tmp/memaudit-smoothing}
FINETUNE_STEPS=${FINETUNE_STEPS:-800}
SCRATCH_STEPS=${SCRATCH_STEPS:-2000}
BASE_STEPS=${BASE_STEPS:-10000}  # the 256-image model the fine-tuning rows start from
python examples/smoothing/grid.py "$OUT" --sets 32 --finetune-steps "$FINETUNE_STEPS" --scratch-steps "$SCRATCH_STEPS" --base-steps "$BASE_STEPS" &
python examples/smoothing/grid.py "$OUT" --sets 256 --finetune-steps "$FINETUNE_STEPS" --scratch-steps "$SCRATCH_STEPS" --base-steps "$BASE_STEPS" &
wait
python examples/smoothing/grid.py "$OUT" --sets 32 256 --finetune-steps "$FINETUNE_STEPS" --scratch-steps "$SCRATCH_STEPS" --base-steps "$BASE_STEPS"
python examples/smoothing/residual_noise.py "$OUT/32/finetune-plain-0-u" examples/models/digits32
G="$OUT/32"
python examples/smoothing/residual_noise.py examples/models/digits32 "$G/finetune-2_sigma-30-u" "$G/scratch-2_sigma-30-u" \
  "$G/scratch-2_sigma-10-u" "$G/finetune-14_sigma-10-u" examples/models/digits-all --samplers sde heun --no-old-sde
python examples/smoothing/sample_grid.py "$OUT/samples.png" examples/models/digits32 "$G/finetune-2_sigma-30-u" \
  "$G/scratch-2_sigma-30-u@heun" "$G/scratch-2_sigma-30-u" "$G/finetune-14_sigma-10-u"
