"""Benchmark: the empirical denoiser's achieved GFLOP/s vs torch's own matmul on the same shapes, and its
peak extra memory, for B=256 queries, M=20,000 training points, d=3,072 (32x32x3).

FLOPs counted: the two GEMMs per evaluation, x @ X^T (2 B M d) and W @ X (2 B M d) = 4 B M d.
Goal: >= 90% of the matmul rate (issue 12).  Run: python benchmarks/empirical.py [--m 20000] [--d 3072]
[--repeats 7]. It also times the denoiser over the same images held as uint8 bytes (memaudit.storage: a set too
large for float32), whose chunks are converted on every pass. The three are timed in turns (matmul, denoiser,
uint8 denoiser, matmul, ...), so a slow spell of this shared machine slows all three; each rate is the median of
its per-turn ratios to the matmul of the same turn, and the spread of those ratios is printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from memaudit.empirical import EmpiricalDenoiser
from memaudit.storage import ImageStore


def rss_peak_mib() -> float:
    """Peak resident memory of this process (VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_in_turns(fns: list, repeats: int) -> list[list[float]]:
    """Each of `fns` run once per turn, `repeats` turns after a warm-up turn: times[turn][i]."""
    for fn in fns:
        fn()
    return [[seconds(fn) for fn in fns] for _ in range(repeats)]


def ratio_summary(turns: list[list[float]], i: int) -> tuple[float, float, float]:
    """Median, min and max over the turns of (matmul time / time of fns[i]) in the same turn."""
    ratios = sorted(turn[0] / turn[i] for turn in turns)
    return ratios[len(ratios) // 2], ratios[0], ratios[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, default=256)
    parser.add_argument("--m", type=int, default=20000)
    parser.add_argument("--d", type=int, default=3072)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    train = (torch.rand(args.m, 3, 32, 32 * args.d // 3072, generator=gen) * 2 - 1).to(device)
    x = (train[: args.b] + 0.5 * torch.randn(args.b, *train.shape[1:], generator=gen).to(device))
    sigma = torch.full((args.b,), 0.5, device=device)
    model = EmpiricalDenoiser(train, chunk_size=args.chunk)
    flops = 4.0 * args.b * args.m * train[0].numel()

    base = rss_peak_mib()
    reset_peak()
    base = min(base, rss_peak_mib())
    model(x, sigma), sync()
    extra = rss_peak_mib() - base

    xf, pts = x.reshape(args.b, -1), model.points
    weights = torch.rand(args.b, args.m, generator=gen).to(device)
    store = ImageStore(((train + 1) * 127.5).round().to(torch.uint8))
    byte_model = EmpiricalDenoiser(store, chunk_size=args.chunk)
    turns = timed_in_turns([lambda: (xf @ pts.T, weights @ pts, sync()), lambda: (model(x, sigma), sync()),
                            lambda: (byte_model(x, sigma), sync())], args.repeats)
    t_mm, t_emp, t_bytes = (sorted(turn[i] for turn in turns)[len(turns) // 2] for i in range(3))
    rate_mm, rate_emp, rate_bytes = (flops / t / 1e9 for t in (t_mm, t_emp, t_bytes))
    (emp, emp_lo, emp_hi), (byt, byt_lo, byt_hi) = ratio_summary(turns, 1), ratio_summary(turns, 2)
    print(f"shapes: B={args.b} M={args.m} d={train[0].numel()} chunk={args.chunk} device={device} "
          f"threads={torch.get_num_threads()}")
    print(f"median of {len(turns)} turns")
    print(f"torch matmul (same two GEMMs): {t_mm * 1e3:8.1f} ms  {rate_mm:7.1f} GFLOP/s")
    print(f"empirical denoiser D*(x, s):   {t_emp * 1e3:8.1f} ms  {rate_emp:7.1f} GFLOP/s  "
          f"= {100 * emp:5.1f}% of matmul (turns {100 * emp_lo:.1f}-{100 * emp_hi:.1f}%; goal >= 90%)")
    print(f"the same over a uint8 store:   {t_bytes * 1e3:8.1f} ms  {rate_bytes:7.1f} GFLOP/s  "
          f"= {100 * byt:5.1f}% of matmul (turns {100 * byt_lo:.1f}-{100 * byt_hi:.1f}%; chunks converted on every "
          "pass)")
    print(f"peak extra memory during D*:   {extra:8.1f} MiB (training set itself: "
          f"{pts.numel() * pts.element_size() / 2**20:.1f} MiB, a B x M float32 matrix would be "
          f"{args.b * args.m * 4 / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
