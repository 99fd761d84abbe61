"""The --dry-run cost model against measured phase times (issue 12, item 6: within 2x of each phase's time).

    python benchmarks/dry_run.py [MODEL DATA [--samples N]] ...

For each MODEL DATA pair: the plan (memaudit.scan.dry_run, rates measured now) and then the scan itself, its
phases timed by benchmarks/phases.py, in the same process; prints predicted / measured per phase. Phases under
0.2 s measured are shown but not judged (timer noise and Python overhead dominate them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from phases import timed_scan  # noqa: E402

from memaudit import cost  # noqa: E402
from memaudit.cli import options as opt  # noqa: E402
from memaudit.data import load_dataset  # noqa: E402
from memaudit.metrics import METRICS  # noqa: E402
from memaudit.scan import ScanConfig, dry_run  # noqa: E402

JUDGED = 0.2  # seconds: shorter measured phases are not judged


def compare(model_spec: str, data: str, samples: int) -> bool:
    """Print predicted vs measured per phase; True when every judged phase is within 2x."""
    train = load_dataset(data).images
    model = opt.load_checked_model(model_spec, train, torch.device("cpu"))
    config = ScanConfig(num_samples=samples)
    lines = dry_run(model, train, config)
    predicted = {}
    for line in lines[2:-2]:
        predicted[line[:28].strip()] = float(line.split()[-2])
    measured, total, _ = timed_scan(model_spec, data, config)
    measured["setup (index, duplicates)"] = measured.pop("setup")
    print(f"\n{model_spec} on {data}: {train.shape[0]} images of {'x'.join(map(str, train.shape[1:]))}, "
          f"{samples} samples per sampler")
    print(f"{'phase':28s} {'predicted':>10s} {'measured':>10s} {'ratio':>7s}")
    ok = True
    for name, secs in measured.items():
        guess = predicted.get(name)
        ratio = guess / secs if guess is not None and secs > 0 else float("nan")
        judged = secs >= JUDGED
        ok &= (not judged) or (0.5 <= ratio <= 2.0)
        print(f"{name:28s} {guess if guess is not None else float('nan'):10.2f} {secs:10.2f} {ratio:7.2f}"
              f"{'' if judged else '  (not judged: < 0.2 s)'}")
    print(f"{'total':28s} {sum(predicted.values()):10.2f} {total:10.2f} {sum(predicted.values()) / total:7.2f}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="*", help="MODEL DATA MODEL DATA ...")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    pairs = args.pairs or ["examples/models/digits32", "examples/digits/digits32.npz"]
    results = [compare(pairs[i], pairs[i + 1], args.samples) for i in range(0, len(pairs), 2)]
    print("\nevery judged phase within 2x:", all(results))


if __name__ == "__main__":
    main()
