"""Scan time and peak memory by training-set size, on synthetic uint8 data (issue 12's acceptance).

    python benchmarks/scale.py [--cases cifar-1k,cifar-10k,...] [--workdir DIR] [--keep]

Each case writes a random uint8 .npy (N, H, W, 3) and runs, as its own process under /usr/bin/time -v,
`python -m memaudit scan empirical DATA` with the case's settings (the closed-form model: its cost is the
training set's, so the scan's own scaling is what is measured). Prints wall seconds, peak RSS, the uint8 set's
size, RSS minus the set, and seconds per 1000 images (constant when time grows linearly in M). The float
budget (MEMAUDIT_FLOAT_BUDGET, 1 GiB) decides whether a set is held as float32 or stays uint8: both are shown.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCAN = ["--samples", "64", "--steps", "12", "--sampler", "heun", "--quiet"]
BIG = ["--samples", "8", "--steps", "4", "--sampler", "euler", "--skip", "jacobian", "--skip", "cosine",
       "--skip", "entropy", "--fid", "off", "--quiet"]  # the 256x256 case: does it fit at all
CASES = {
    "cifar-1k": (1_000, 32, SCAN), "cifar-10k": (10_000, 32, SCAN), "cifar-50k": (50_000, 32, SCAN),
    "128-2k": (2_000, 128, SCAN), "128-10k": (10_000, 128, SCAN),
    "256-30k": (30_000, 256, BIG),
}


def make_data(path: Path, count: int, side: int) -> None:
    """Random uint8 images (count, side, side, 3), written in blocks (never all in memory)."""
    if path.exists():
        return
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, side, side, 3))
    for start in range(0, count, 1000):
        stop = min(start + 1000, count)
        out[start:stop] = rng.integers(0, 256, (stop - start, side, side, 3), dtype=np.uint8)
    out.flush()
    del out


def run_case(name: str, folder: Path) -> dict:
    count, side, flags = CASES[name]
    data = folder / f"{name}.npy"
    make_data(data, count, side)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "memaudit", "scan", "empirical", str(data), *flags,
           "--json", str(folder / f"{name}.json"), "--workdir", str(folder / "work")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"case": name, "M": count, "shape": f"3x{side}x{side}", "rc": proc.returncode, "wall_s": wall,
            "peak_rss_gb": int(rss.group(1)) / 2**20 if rss else float("nan"),
            "set_gb": count * 3 * side * side / 2**30, "tail": proc.stderr.strip().splitlines()[-25:]
            if proc.returncode else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="cifar-1k,cifar-10k,cifar-50k,128-2k,128-10k")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="memaudit-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'case':10s} {'M':>7s} {'shape':>10s} {'wall s':>8s} {'peak RSS GB':>12s} {'uint8 set GB':>13s} "
          f"{'RSS - set':>10s} {'s / 1k img':>11s} rc   (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    for name in args.cases.split(","):
        r = run_case(name, folder)
        print(f"{r['case']:10s} {r['M']:7d} {r['shape']:>10s} {r['wall_s']:8.1f} {r['peak_rss_gb']:12.2f} "
              f"{r['set_gb']:13.3f} {r['peak_rss_gb'] - r['set_gb']:10.2f} {1000 * r['wall_s'] / r['M']:11.2f} "
              f"{r['rc']}", flush=True)
        for line in r["tail"]:
            print("   ", line)


if __name__ == "__main__":
    main()
