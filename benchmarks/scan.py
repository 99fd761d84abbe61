"""Benchmark: full `memaudit scan` time for 1,000 samples (heun + sde) on the bundled digits models.

Prints the wall time of each stage (sampling per sampler, metrics, score cosine, Jacobian, FID) and the total.
Run: python benchmarks/scan.py [--samples 1000] [--model examples/models/digits-all] [--device cpu]
       [--skip NAME ...] [--compare]
--compare also times the scan without the detection metrics of issue 10 (the "plain" scan) and prints the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from memaudit.scan import ScanConfig, run_scan
from memaudit.data import load_images
from memaudit.models.load import load_model

# the metrics issue 10 added to the default scan (match and ct_score/calibration do no work without their flags)
DETECTION = ("attribution", "diffmemorize", "match", "tiled_l2", "authenticity", "ct_score", "calibration")


class StageTimer:
    """A task factory for run_scan that records how long each stage took."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, description: str, total: int):
        start = time.perf_counter()

        def advance(done: int, info: str = "") -> None:
            self.times[description] = time.perf_counter() - start

        return advance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/models/digits-all")
    parser.add_argument("--data", default="examples/digits/digits.npz")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", action="append", default=[], help="a metric section to skip (repeatable)")
    parser.add_argument("--compare", action="store_true", help="also time the plain scan and print the ratio")
    parser.add_argument("--rounds", type=int, default=1, help="with --compare: run plain/default in ABBA order this "
                        "many times (the first run of a process is slower: warm-up) and compare the sums")
    args = parser.parse_args()
    train = load_images(args.data)
    model = load_model(args.model, device=args.device, train=train.to(args.device))
    plain, default = ("plain", tuple(args.skip) + DETECTION), ("default", tuple(args.skip))
    order = [default]
    if args.compare:
        order = [run for i in range(args.rounds) for run in ((plain, default) if i % 2 == 0 else (default, plain))]
    totals: dict[str, float] = {}
    if args.compare:  # a short untimed scan first: the first scan of a process pays torch's warm-up
        run_scan(model, train, ScanConfig(num_samples=64, device=args.device), model_info={}, data_info={})
    for label, skip in order:
        config = ScanConfig(num_samples=args.samples, device=args.device, skip=skip)
        timer = StageTimer()
        start = time.perf_counter()
        result = run_scan(model, train, config, model_info={"spec": args.model}, data_info={"path": args.data},
                          task=timer)
        total = time.perf_counter() - start
        totals[label] = totals.get(label, 0.0) + total
        print(f"[{label}] model={args.model} data={args.data} ({train.shape[0]} images {tuple(train.shape[1:])}) "
              f"samples={args.samples} samplers={','.join(config.samplers)} steps={config.steps} "
              f"device={args.device} threads={torch.get_num_threads()} skip={','.join(skip) or '-'}")
        for stage, seconds in timer.times.items():
            print(f"  {stage:<14} {seconds:7.2f} s")
        print(f"  {'total':<14} {total:7.2f} s   memorized_fraction={result.report['summary']['memorized_fraction']}")
    if args.compare:
        print(f"default / plain = {totals['default'] / totals['plain']:.3f} (sums over {args.rounds} round(s))")


if __name__ == "__main__":
    main()
