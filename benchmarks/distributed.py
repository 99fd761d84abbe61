"""Sampling wall time with one process and with torchrun ranks (issue 12, item 4), in the same run.

    python benchmarks/distributed.py [--ranks 2] [--samples 2048] [--threads 1]
    python benchmarks/distributed.py --model empirical --data SET.npy --samples 256 --metrics

Runs `memaudit scan` (by default on the bundled example) with the metrics that do not grow with the samples'
sampling skipped, once with --samples N and once with --samples 8 (the fixed cost: start-up, loading, index),
each as one process and as `torchrun --nproc_per_node R`; sampling time = wall(N) - wall(8). With --metrics
the per-sample metrics the ranks share (NN search, entropy and D* along the trajectories) run too, so the
difference is sampling plus those. Each rank gets --threads torch threads, so R ranks use R x threads cores:
run it where that many are free. Checks that the JSON reports are byte-identical.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "digits32")
DATA = str(ROOT / "examples" / "digits" / "digits32.npz")
FLAGS = ["--sampler", "heun", "--steps", "18", "--batch-size", "64", "--skip", "jacobian", "--fid", "off", "--quiet"]
SAMPLING_ONLY = ["--skip", "entropy", "--skip", "cosine"]  # (cosine: the trajectory and noisy-training-point kinds)


def wall(ranks: int, samples: int, out: Path, threads: int, model: str = MODEL, data: str = DATA,
         flags: list[str] = FLAGS + SAMPLING_ONLY) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MEMAUDIT_CACHE": str(out.parent / "cache")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1 \
        else [sys.executable]
    cmd = [*launcher, "-m", "memaudit", "scan", model, data, "--samples", str(samples), *flags, "--json", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--metrics", action="store_true", help="also run the per-sample metrics the ranks share")
    args = parser.parse_args()
    flags = FLAGS if args.metrics else FLAGS + SAMPLING_ONLY
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = []
        for ranks in (1, args.ranks):
            fixed = wall(ranks, 8, folder / f"fixed-{ranks}.json", args.threads, args.model, args.data, flags)
            total = wall(ranks, args.samples, folder / f"full-{ranks}.json", args.threads, args.model, args.data,
                         flags)
            rows.append((ranks, fixed, total, total - fixed))
        same = (folder / "full-1.json").read_bytes() == (folder / f"full-{args.ranks}.json").read_bytes()
    what = "sampling + shared metrics" if args.metrics else "sampling"
    print(f"{'ranks':>5} {'fixed s':>8} {'total s':>8} {what + ' s':>10}  ({args.samples} samples, heun 18 steps, "
          f"{args.threads} thread(s) per rank)")
    for ranks, fixed, total, sampling in rows:
        print(f"{ranks:5d} {fixed:8.2f} {total:8.2f} {sampling:10.2f}")
    print(f"{what} speed-up with {args.ranks} ranks: {rows[0][3] / rows[1][3]:.2f}x; JSON byte-identical: {same}")


if __name__ == "__main__":
    main()
