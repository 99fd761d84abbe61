"""Jacobian expansion: spectral norm ||dD/dx||_2 per sample (model vs empirical) and one-step sampler expansion.

Model: power iteration on J^T J, matrix-free: J v by forward-mode AD (torch.func.jvp; central differences for
ops without forward AD, e.g. custom autograd Functions), J^T u by reverse mode (torch.autograd.grad w.r.t. x only,
so nothing accumulates into parameters).  The batch is treated as independent samples: vectors are normalised
per sample.  Empirical: J = Cov_w(x_i) / (sigma^2 T) is
symmetric PSD, so power iteration on J itself with the analytic EmpiricalDenoiser.jvp.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Optional

import torch
from torch import Tensor

from memaudit.cost import Work
from memaudit.denoiser import Denoiser, as_sigma
from memaudit.empirical import EmpiricalDenoiser
from memaudit.empirical_support import DEFAULT_BUDGET, DENSE_BUDGET, find_support
from memaudit.metrics.base import SCAN, Metric, Plot, RunData, ScanContext, Series
from memaudit.metrics.helpers import device_of
from memaudit.numbers import finite, finite_or_none, fmt
from memaudit.sampling import SAMPLERS

TINY = 1e-30


def _norms(v: Tensor) -> Tensor:
    """Per-sample L2 norms as a (B, 1, ...) tensor broadcastable against v."""
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))


def _normalise(v: Tensor) -> Tensor:
    return v / _norms(v).clamp_min(TINY)


def _start_vector(x: Tensor, generator) -> Tensor:
    """A random unit vector per sample (drawn on the CPU generator, moved to x's device)."""
    v = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    return _normalise(v)


def _math_attention():
    """Force the composite (math) attention kernel, whose ops all support forward-mode AD."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _jvp(f, x: Tensor, v: Tensor) -> Tensor:
    """J v by forward-mode AD; central differences (step 1e-3 max(||x||, 1)) for ops without forward AD."""
    try:
        with _math_attention():
            return torch.func.jvp(f, (x,), (v,))[1].detach()
    except (NotImplementedError, RuntimeError):  # no forward-AD formula / autograd.Function without jvp
        h = 1e-3 * _norms(x).clamp_min(1.0)
        with torch.no_grad():
            return (f(x + h * v) - f(x - h * v)) / (2 * h)


def model_jacobian_norm(denoiser: Denoiser, x: Tensor, sigma: Tensor | float, iters: int = 10,
                        generator: torch.Generator | None = None) -> Tensor:
    """||dD/dx||_2 per sample: v <- J^T J v / ||J^T J v|| for `iters` steps, then ||J v||; (B,).
    A closed-form (empirical) model has an analytic, symmetric J: its norm comes from empirical_jacobian_norm."""
    if isinstance(denoiser, EmpiricalDenoiser):
        return empirical_jacobian_norm(denoiser, x, sigma, iters, generator)
    x = x.detach().to(device_of(denoiser, x.device))
    sigma = as_sigma(sigma, x).detach()

    def f(inp: Tensor) -> Tensor:
        return denoiser(inp, sigma)

    v = _start_vector(x, generator)
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        out = f(xg)
        for _ in range(iters):
            u = _jvp(f, x, v).to(out.dtype)
            v = _normalise(torch.autograd.grad(out, xg, u, retain_graph=True)[0].detach())
    return _norms(_jvp(f, x, v)).reshape(-1)


def empirical_jacobian_norm(empirical: EmpiricalDenoiser, x: Tensor, sigma: Tensor | float, iters: int = 20,
                            generator: torch.Generator | None = None, support_bytes: int = DEFAULT_BUDGET,
                            dense_bytes: int = DENSE_BUDGET) -> Tensor:
    """||dD*/dx||_2 = largest eigenvalue of Cov_w(x_i) / (sigma^2 T): power iteration v <- J v / ||J v||; (B,).
    Amortised (memaudit.empirical_support): where a few points carry the weight, one pass over the training set
    finds them and the iterations run on them, centred (exactly 0 for one point); where the weight is spread, the
    B x M weights are kept and each iteration is two GEMMs per pass; else each iteration streams four."""
    x = x.detach().to(empirical.points_device)
    sigma = sigma.to(x.device) if isinstance(sigma, Tensor) else sigma
    v = _start_vector(x, generator)
    with torch.no_grad():
        support = find_support(empirical, x, sigma, budget_bytes=support_bytes, dense_bytes=dense_bytes)
        jvp = support.jvp if support is not None else (lambda u: empirical.jvp(x, sigma, u))  # noqa: E731
        for _ in range(iters):
            v = _normalise(jvp(v))
        return _norms(jvp(v)).reshape(-1)


def step_expansion(denoiser: Denoiser, x: Tensor, s_cur: float, s_next: float, eps: float = 1e-3,
                   generator: torch.Generator | None = None, sampler: str = "heun", nearest=None) -> Tensor:
    """||Phi(x + delta) - Phi(x)|| / ||delta||, Phi one step s_cur -> s_next of `sampler` (both with the same
    noise, so a stochastic step's noise cancels), ||delta|| = eps ||x||; (B,)."""
    x = x.detach().to(device_of(denoiser, x.device))
    size = _norms(x)
    size = torch.where(size > TINY, size, torch.full_like(size, float(x[0].numel()) ** 0.5))
    delta = _start_vector(x, generator) * (eps * size)
    step = SAMPLERS[sampler].fn
    z = (torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
         if SAMPLERS[sampler].stochastic else None)
    same_noise = lambda like: torch.cat([z, z])  # noqa: E731 - one step draws its noise once, for both halves
    extra = {"nearest": nearest} if SAMPLERS[sampler].needs_nearest else {}
    sigmas = [float(s_cur), float(s_next)]
    with torch.no_grad():  # x + delta and x as one batch: one pass of the model (rows are independent)
        moved, base = step(denoiser, torch.cat([x + delta, x]), sigmas, same_noise, **extra).chunk(2)
    return (_norms(moved - base) / _norms(delta)).reshape(-1)


def jacobian_profile(model: Denoiser, empirical: EmpiricalDenoiser, x0: Tensor, sigmas: list[float],
                     generator: torch.Generator, iters: int = 10, sampler: str = "heun", nearest=None) -> dict:
    """Per sigma (x = x0 + sigma n): mean ||J_model||, mean ||J_emp||, their ratio, and the mean expansion of one
    `sampler` step from sigma to the next smaller sigma of the list (to 0 after the smallest)."""
    out = {"sigmas": [], "model": [], "empirical": [], "ratio": [], "step_expansion": [], "sampler": sampler}
    for sigma in sigmas:
        sigma = float(sigma)
        x = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        m = float(model_jacobian_norm(model, x, sigma, iters, generator).double().mean())
        e = float(empirical_jacobian_norm(empirical, x, sigma, iters, generator).double().mean())
        s_next = max([float(s) for s in sigmas if float(s) < sigma], default=0.0)
        out["sigmas"].append(sigma)
        out["model"].append(m)
        out["empirical"].append(e)
        out["ratio"].append(m / e if e > 0 else None)
        expansion = step_expansion(model, x, sigma, s_next, generator=generator, sampler=sampler, nearest=nearest)
        out["step_expansion"].append(float(expansion.double().mean()))
    return out


class Jacobian(Metric):
    name = "jacobian"
    scope = SCAN
    title = "Jacobian expansion"
    summary_keys = {"jacobian_ratio_max": "max of `jacobian.ratio`"}

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        cfg = ctx.config
        pick = torch.randperm(ctx.train.shape[0], generator=ctx.generator)[: cfg.jacobian_points]
        return jacobian_profile(ctx.model, ctx.empirical, ctx.train[pick.to(ctx.train.device)], ctx.sigmas,
                                ctx.generator, iters=cfg.jacobian_iters, sampler=cfg.samplers[0],
                                nearest=ctx.empirical.nearest_distance)

    def cost(self, w, sampler=None):
        """Per metric sigma and point: the empirical norm (a support pass, 2 M d; where the weight is spread, taken
        as sigma >= 1, a pass for D* and two GEMMs per power iteration, 4 M d, with the B x M weights kept, else
        four streamed GEMMs, 8 M d), the model's (the same for a closed-form model, else iters + 1 J^T J products
        through the network) and one sampler step twice."""
        points, sigmas = min(w.jacobian_points, w.num_train), w.metric_sigmas
        spread = sum(1 for s in w.extra.get("sigmas", []) if s >= 1.0)
        dense = points * w.num_train * 4 <= DENSE_BUDGET
        per_spread = 1 + 2 * (w.jacobian_iters + 1) if dense else 4 * (w.jacobian_iters + 1)
        empirical = Work(flops=2.0 * w.num_train * w.dim * points * (sigmas + spread * per_spread))
        model = empirical if w.empirical_model else Work(jacobian_rows=points * sigmas * (w.jacobian_iters + 1))
        step = w.model_rows(2 * points * sigmas * (SAMPLERS[w.samplers[0]].evals(2) - SAMPLERS[w.samplers[0]].evals(1)))
        return empirical + model + step

    def summarize(self, jac: Optional[Mapping]) -> dict:
        ratios = finite((jac or {}).get("ratio") or [])
        return {"jacobian_ratio_max": max(ratios) if ratios else None}

    def validate(self, section, c, where: str) -> None:
        c.curves(section, where, ("model", "empirical", "ratio", "step_expansion"))

    def lines(self, report: Mapping) -> list[str]:
        if self.sections(report) is None:
            return []
        value = (report.get("summary") or {}).get("jacobian_ratio_max")
        line = f"jacobian spectral norm ratio model/empirical: max {fmt(value)}"
        zero = [s for s, e in zip(self.sections(report)["sigmas"], self.sections(report)["empirical"]) if e == 0]
        if zero:
            line += (f" (undefined at sigma <= {fmt(max(zero))}: there one training image carries all the empirical "
                     "weight, so the empirical Jacobian is 0)")
        return [line]

    def plots(self, report: Mapping) -> list[Plot]:
        jac = self.sections(report)
        if not jac:
            return []
        pos = finite(list(jac["model"]) + list(jac["empirical"]))
        logy = bool(pos) and min(pos) > 0 and max(pos) / min(pos) > 20
        plots = [Plot("Jacobian spectral norm ||dD/dx||", "spectral norm", [
            Series("model", jac["sigmas"], jac["model"]),
            Series("empirical", jac["sigmas"], jac["empirical"], dash=True)], logy=logy)]
        if any(finite_or_none(v) is not None for v in jac["step_expansion"]):
            plots.append(Plot("Sampler step expansion ||Phi(x+d)-Phi(x)|| / ||d||", "expansion",
                              [Series("step expansion", jac["sigmas"], jac["step_expansion"])], include_y=(1.0,)))
        return plots


METRIC = Jacobian()
