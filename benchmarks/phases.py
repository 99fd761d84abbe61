"""Wall time of each phase of a scan (the progress tasks of memaudit.scan.run_scan), and each phase's share.

    python benchmarks/phases.py MODEL DATA [--samples N] [--sampler heun ...] [--json OUT]

Phases run one after another, so a phase lasts from its task's creation to the next task's creation (the last
one to the end of the scan). Used to measure the Jacobian's share (issue 12, item 5) and to check the --dry-run
cost model (memaudit.cost) against what a scan really takes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from memaudit.cli import options as opt
from memaudit.data import load_dataset
from memaudit.scan import ScanConfig, run_scan


class PhaseClock:
    """A TaskFactory that records when each task starts; durations are the gaps between starts."""

    def __init__(self):
        self.starts: list[tuple[str, float]] = []

    def task(self, description: str, total: int):
        self.starts.append((description, time.perf_counter()))
        return lambda done, info="": None

    def durations(self, end: float) -> dict[str, float]:
        out: dict[str, float] = {}
        stops = [t for _, t in self.starts[1:]] + [end]
        for (name, start), stop in zip(self.starts, stops):
            out[name] = out.get(name, 0.0) + stop - start
        return out


def timed_scan(model_spec: str, data: str, config: ScanConfig) -> tuple[dict[str, float], float]:
    """(phase -> seconds, total seconds) of one scan, setup (index, duplicates) included as 'setup'."""
    start = time.perf_counter()
    train = load_dataset(data).images
    model = opt.load_checked_model(model_spec, train, torch.device(config.device))
    clock = PhaseClock()
    clock.starts.append(("setup", start))
    run_scan(model, train, config, model_info={"spec": model_spec}, data_info={"path": data}, task=clock.task)
    end = time.perf_counter()
    return clock.durations(end), end - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sampler", action="append")
    parser.add_argument("--json")
    args = parser.parse_args()
    config = ScanConfig(num_samples=args.samples, samplers=tuple(args.sampler or ScanConfig().samplers))
    phases, total = timed_scan(args.model, args.data, config)
    for name, secs in phases.items():
        print(f"{name:24s} {secs:8.2f} s  {100 * secs / total:5.1f} %")
    print(f"{'total':24s} {total:8.2f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"phases": phases, "total": total}, fh, indent=1)


if __name__ == "__main__":
    main()
