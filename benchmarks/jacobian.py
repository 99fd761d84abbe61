"""The empirical Jacobian's power iteration, streamed vs amortised (issue 12, item 5), at CIFAR shape.

    python benchmarks/jacobian.py [--points 20000] [--batch 16] [--iters 10]

Streamed: every power iteration is one pass over the training set (EmpiricalDenoiser.jvp). Amortised: one
pass finds the support of the softmax weights (EmpiricalDenoiser.support: the top S points, with a proven bound
of 1e-7 on the weight left out) and the iterations run on it; where no support under the memory budget holds
the bound, it falls back to streaming. Same process, same inputs: the ratio is what to read.
"""

from __future__ import annotations

import argparse
import time

import torch

from memaudit.empirical import EmpiricalDenoiser
from memaudit.metrics.jacobian import empirical_jacobian_norm


class Streamed:
    """The same denoiser with no support: every power iteration streams the training set."""

    def __init__(self, model: EmpiricalDenoiser):
        self.model, self.points = model, model.points

    def support(self, *args, **kwargs):
        return None

    def jvp(self, *args):
        return self.model.jvp(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    train = torch.rand((args.points, 3, 32, 32), generator=gen) * 2 - 1
    model = EmpiricalDenoiser(train)
    x0 = train[: args.batch]
    print(f"M = {args.points} images of 3x32x32, {args.batch} points, {args.iters} power iterations, "
          f"{torch.get_num_threads()} thread(s)")
    for sigma in (0.05, 0.5, 5.0, 20.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=gen)
        times, norms = [], []
        for target in (Streamed(model), model):
            start = time.perf_counter()
            norms.append(empirical_jacobian_norm(target, x, sigma, iters=args.iters,
                                                 generator=torch.Generator().manual_seed(1)))
            times.append(time.perf_counter() - start)
        support = model.support(x, sigma)
        print(f"sigma {sigma:g}: streamed {times[0]:.2f} s, amortised {times[1]:.2f} s, ratio "
              f"{times[1] / times[0]:.3f}, support {'none (streamed)' if support is None else support[0].shape[1]}, "
              f"max |difference| {float((norms[0] - norms[1]).abs().max()):.1e}")


if __name__ == "__main__":
    main()
