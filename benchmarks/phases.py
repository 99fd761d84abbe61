"""Wall time of each phase of a scan (the progress tasks of memaudit.scan.run_scan), and each phase's share.

    python benchmarks/phases.py MODEL DATA [--samples N] [--sampler heun ...] [--json OUT]

Each phase's peak RSS is measured too (Linux VmHWM, reset at each phase). Phases run one after another, so a phase lasts from its task's creation to the next task's creation (the last
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


def peak_rss_gb() -> float:
    """This process's peak resident memory since the last reset_peak() (Linux VmHWM), in GiB."""
    with open("/proc/self/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return kb / 2**20


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux: 5 > /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


class PhaseClock:
    """A TaskFactory that records when each task starts, and the peak RSS of the phase before it; durations
    are the gaps between starts."""

    def __init__(self):
        self.starts: list[tuple[str, float]] = []
        self.peaks: list[float] = []

    def task(self, description: str, total: int):
        self.peaks.append(peak_rss_gb())
        reset_peak()
        self.starts.append((description, time.perf_counter()))
        return lambda done, info="": None

    def peak_by_phase(self) -> dict[str, float]:
        """phase -> its largest peak RSS (GiB) over its occurrences."""
        out: dict[str, float] = {}
        for (name, _), peak in zip(self.starts, self.peaks + [peak_rss_gb()]):
            out[name] = max(out.get(name, 0.0), peak)
        return out

    def durations(self, end: float) -> dict[str, float]:
        out: dict[str, float] = {}
        stops = [t for _, t in self.starts[1:]] + [end]
        for (name, start), stop in zip(self.starts, stops):
            out[name] = out.get(name, 0.0) + stop - start
        return out


def timed_scan(model_spec: str, data: str, config: ScanConfig) -> tuple[dict[str, float], float, dict]:
    """(phase -> seconds, total seconds, phase -> peak RSS GiB) of one scan, setup (loading, index,
    duplicates) included as 'setup'."""
    start = time.perf_counter()
    reset_peak()
    train = load_dataset(data).data  # as the CLI holds it: float32, or a uint8 ImageStore for a large set
    model = opt.load_checked_model(model_spec, train, torch.device(config.device))
    clock = PhaseClock()
    clock.starts.append(("setup", start))
    run_scan(model, train, config, model_info={"spec": model_spec}, data_info={"path": data}, task=clock.task)
    end = time.perf_counter()
    return clock.durations(end), end - start, clock.peak_by_phase()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sampler", action="append")
    parser.add_argument("--steps", type=int, default=ScanConfig().steps)
    parser.add_argument("--json")
    args = parser.parse_args()
    config = ScanConfig(num_samples=args.samples, samplers=tuple(args.sampler or ScanConfig().samplers),
                        steps=args.steps)
    phases, total, peaks = timed_scan(args.model, args.data, config)
    for name, secs in phases.items():
        print(f"{name:24s} {secs:8.2f} s  {100 * secs / total:5.1f} %  peak RSS {peaks.get(name, 0):5.2f} GiB")
    print(f"{'total':24s} {total:8.2f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"phases": phases, "total": total, "peak_rss_gib": peaks}, fh, indent=1)


if __name__ == "__main__":
    main()
