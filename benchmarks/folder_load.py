"""Loading an image folder: one decoding thread vs the parallel decode vs a content-hash cache hit, in one run.

    python benchmarks/folder_load.py [--images 2000] [--size 32] [--rounds 3]

Writes --images random RGB PNGs of --size x --size to a temporary folder, then times memaudit.data.load_dataset
on it (median of --rounds): with DECODE_WORKERS = 1 and no cache (the old serial load), with the default
workers and no cache, the first load with the cache (decode + file hashes + the .npy written), and a cache hit
(file hashes + the .npy memory-mapped + its sha256 checked).  Every result is checked byte-identical to the
serial load.  Prints a table with each time's ratio to the serial load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memaudit.data as data  # noqa: E402


def write_folder(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def timed(load, rounds: int, before=None) -> tuple[float, bytes]:
    """Median seconds of `rounds` calls of load() (each after before()), and the loaded pixels' bytes."""
    times = []
    for _ in range(rounds):
        if before is not None:
            before()
        start = time.perf_counter()
        dataset = load()
        times.append(time.perf_counter() - start)
    return statistics.median(times), dataset.images.numpy().tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workers = data.DECODE_WORKERS
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "images", Path(tmp) / "cache"
        folder.mkdir()
        write_folder(folder, args.images, args.size)

        def clear_cache() -> None:
            for entry in cache.glob("*"):
                entry.unlink()

        data.DECODE_WORKERS = 1
        serial, reference = timed(lambda: data.load_dataset(folder, cache_dir="off"), args.rounds)
        data.DECODE_WORKERS = workers
        rows = [("serial decode (1 thread, no cache)", serial, reference),
                (f"parallel decode ({workers} threads, no cache)",
                 *timed(lambda: data.load_dataset(folder, cache_dir="off"), args.rounds)),
                ("first load with the cache (decode + hash + write)",
                 *timed(lambda: data.load_dataset(folder, cache_dir=cache), args.rounds, before=clear_cache)),
                ("cache hit (hash + mmap + check)",
                 *timed(lambda: data.load_dataset(folder, cache_dir=cache), args.rounds))]
    print(f"{args.images} PNGs of {args.size}x{args.size}x3, median of {args.rounds}, os.cpu_count() = "
          f"{os.cpu_count()}, OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'load':<52}{'seconds':>9}{'vs serial':>11}  identical")
    for name, seconds, pixels in rows:
        print(f"{name:<52}{seconds:>9.3f}{serial / seconds:>10.1f}x  {pixels == reference}")


if __name__ == "__main__":
    main()
