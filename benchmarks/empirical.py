"""Benchmark: the empirical denoiser's achieved GFLOP/s vs torch's own matmul on the same shapes, and its
peak extra memory, for B=256 queries, M=20,000 training points, d=3,072 (32x32x3).

FLOPs counted: the two GEMMs per evaluation, x @ X^T (2 B M d) and W @ X (2 B M d) = 4 B M d.
Goal: >= 90% of the matmul rate (issue 12).  Run: python benchmarks/empirical.py [--m 20000] [--d 3072]
[--repeats 3]. It also times the denoiser over the same images held as uint8 bytes (memaudit.storage: a set too
large for float32), whose chunks are converted on every pass.
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


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, default=256)
    parser.add_argument("--m", type=int, default=20000)
    parser.add_argument("--d", type=int, default=3072)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
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
    t_emp = best_time(lambda: (model(x, sigma), sync()), args.repeats)
    extra = rss_peak_mib() - base

    xf, pts = x.reshape(args.b, -1), model.points
    weights = torch.rand(args.b, args.m, generator=gen).to(device)
    t_mm = best_time(lambda: (xf @ pts.T, weights @ pts, sync()), args.repeats)

    rate_emp, rate_mm = flops / t_emp / 1e9, flops / t_mm / 1e9
    store = ImageStore(((train + 1) * 127.5).round().to(torch.uint8))
    byte_model = EmpiricalDenoiser(store, chunk_size=args.chunk)
    t_bytes = best_time(lambda: (byte_model(x, sigma), sync()), args.repeats)
    rate_bytes = flops / t_bytes / 1e9
    print(f"shapes: B={args.b} M={args.m} d={train[0].numel()} chunk={args.chunk} device={device} "
          f"threads={torch.get_num_threads()}")
    print(f"torch matmul (same two GEMMs): {t_mm * 1e3:8.1f} ms  {rate_mm:7.1f} GFLOP/s")
    print(f"empirical denoiser D*(x, s):   {t_emp * 1e3:8.1f} ms  {rate_emp:7.1f} GFLOP/s  "
          f"= {100 * rate_emp / rate_mm:5.1f}% of matmul (goal >= 90%)")
    print(f"the same over a uint8 store:   {t_bytes * 1e3:8.1f} ms  {rate_bytes:7.1f} GFLOP/s  "
          f"= {100 * rate_bytes / rate_mm:5.1f}% of matmul (chunks converted to float32 on every pass)")
    print(f"peak extra memory during D*:   {extra:8.1f} MiB (training set itself: "
          f"{pts.numel() * pts.element_size() / 2**20:.1f} MiB, a B x M float32 matrix would be "
          f"{args.b * args.m * 4 / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
