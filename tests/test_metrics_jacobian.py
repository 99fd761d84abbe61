"""Jacobian spectral norms vs numpy SVD of full Jacobians; Heun-step expansion vs its closed form."""

import numpy as np
import pytest
import torch
from torch import nn

from jacobians import jacobian_of
from memaudit.denoiser import Denoiser
from memaudit.empirical import EmpiricalDenoiser
from memaudit.sampling import SAMPLERS
from memaudit.storage import ImageStore
from memaudit import empirical_support
from memaudit.empirical_support import DENSE_BUDGET, DenseWeights, Support, find_support, smallest_support
from memaudit.metrics.jacobian import empirical_jacobian_norm, jacobian_profile, model_jacobian_norm, step_expansion

SHAPE = (1, 2, 3)  # d = 6
# torch.func scripts some of its own helpers on first use, which warns on torch >= 2.9
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
# singular values with clear gaps so a few dozen power iterations converge to machine precision
SPECTRUM = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1], dtype=torch.float64)


class MLPDenoiser(Denoiser):
    """D(x, s) = A x / (1 + s^2) + MLP([x, log s]): nonlinear, sigma-dependent, per-sample independent."""

    image_shape = SHAPE

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(SPECTRUM) @ q.T)
        self.net = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 6)).double()

    def denoise(self, x, sigma):
        flat = x.reshape(x.shape[0], -1)
        h = torch.cat([flat, sigma.log().reshape(-1, 1)], 1)
        lin = (flat @ self.a.T) / (1 + sigma.reshape(-1, 1) ** 2)
        return (lin + 0.3 * self.net(h)).reshape(x.shape)


class AttentionDenoiser(Denoiser):
    """Self-attention over the 6 pixels (scaled_dot_product_attention has no forward-AD on CPU kernels)."""

    image_shape = SHAPE

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.qkv = nn.Linear(1, 12).double()

    def denoise(self, x, sigma):
        tokens = x.reshape(x.shape[0], 1, 6, 1)
        q, k, v = self.qkv(tokens).split(4, dim=-1)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return (x.reshape(x.shape[0], 6) @ torch.diag(SPECTRUM) + att.sum(-1).reshape(-1, 6)).reshape(x.shape)


class Square(torch.autograd.Function):
    """x^2 with a backward but no forward-AD rule (forces the finite-difference J v)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class CustomOpDenoiser(MLPDenoiser):
    def denoise(self, x, sigma):
        return super().denoise(x, sigma) + 0.1 * Square.apply(x)


class Linear(Denoiser):
    def __init__(self, a):
        super().__init__()
        self.a = a

    def denoise(self, x, sigma):
        return self.a * x


def full_jacobian_norm(fn, x, sigma):
    """Spectral norm of each sample's d x d Jacobian from torch.autograd.functional.jacobian + numpy."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(1, *SHAPE), sigma).reshape(-1), xi.reshape(-1))
        out.append(np.linalg.norm(jac.detach().numpy(), 2))
    return np.array(out)


@pytest.mark.parametrize("sigma", [0.1, 1.0, 10.0])
def test_model_norm_matches_svd(sigma):
    model = MLPDenoiser().eval()
    x = torch.randn(4, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    est = model_jacobian_norm(model, x, sigma, iters=40, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(est.numpy(), full_jacobian_norm(model, x, sigma), rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("cls,rtol", [(AttentionDenoiser, 1e-6), (CustomOpDenoiser, 1e-4)])
def test_model_norm_without_forward_ad_kernels(cls, rtol):
    model = cls().eval()
    x = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    est = model_jacobian_norm(model, x, 0.3, iters=40)
    np.testing.assert_allclose(est.numpy(), full_jacobian_norm(model, x, 0.3), rtol=rtol)
    assert all(p.grad is None for p in model.parameters())


def test_model_norm_is_per_sample():
    model = MLPDenoiser(seed=3).eval()
    x = torch.randn(5, *SHAPE, dtype=torch.float64)
    batch = model_jacobian_norm(model, x, 0.5, iters=40)
    single = torch.cat([model_jacobian_norm(model, x[i:i + 1], 0.5, iters=40) for i in range(5)])
    assert torch.allclose(batch, single, rtol=1e-6)
    with torch.no_grad():  # also works when the caller has autograd off
        assert torch.allclose(model_jacobian_norm(model, x, 0.5, iters=40), batch, rtol=1e-6)


def anisotropic_train(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, dtype=torch.float64, generator=g) * SPECTRUM).reshape(n, *SHAPE), g


@pytest.mark.parametrize("temperature,k", [(1.0, None), (2.0, None), (1.0, 8)])
def test_empirical_norm_matches_eigenvalues(temperature, k):
    train, g = anisotropic_train(30, 0)
    emp = EmpiricalDenoiser(train.float(), temperature=temperature, k=k, chunk_size=7)
    x = (train[:5] + 3.0 * torch.randn(5, *SHAPE, dtype=torch.float64, generator=g)).float()
    est = empirical_jacobian_norm(emp, x, 3.0, iters=100, generator=g)
    ref = np.linalg.eigvalsh(jacobian_of(emp, x, 3.0).double().numpy())[:, -1]
    np.testing.assert_allclose(est.numpy(), ref, rtol=1e-4)
    if k is None:  # independent check of the analytic Jacobian with autograd
        np.testing.assert_allclose(est.numpy(), full_jacobian_norm(emp, x, 3.0), rtol=1e-3)


def test_model_and_empirical_agree_on_the_empirical_denoiser():
    train, g = anisotropic_train(20, 0)
    emp = EmpiricalDenoiser(train)
    x = train[:4] + 3.0 * torch.randn(4, *SHAPE, dtype=torch.float64, generator=g)
    a = model_jacobian_norm(emp, x, 3.0, iters=40, generator=g)
    b = empirical_jacobian_norm(emp, x, 3.0, iters=80, generator=g)
    ref = np.linalg.eigvalsh(jacobian_of(emp, x, 3.0).numpy())[:, -1]
    np.testing.assert_allclose(a.numpy(), ref, rtol=1e-8)
    np.testing.assert_allclose(b.numpy(), ref, rtol=1e-8)


def heun_factor(a, s, s_next):
    """Closed form of one Heun step for D(x) = a x: x' = c x."""
    h = s_next - s
    if s_next == 0:
        return 1 + h * (1 - a) / s
    euler = 1 + h * (1 - a) / s
    return 1 + 0.5 * h * (1 - a) * (1 / s + euler / s_next)


@pytest.mark.parametrize("a,s,s_next", [(0.5, 2.0, 1.0), (0.9, 1.0, 0.2), (0.0, 0.5, 0.1), (1.5, 3.0, 2.5),
                                        (0.3, 0.7, 0.0)])
def test_step_expansion_linear_closed_form(a, s, s_next):
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x[0] = 0  # zero input: delta falls back to eps * sqrt(d)
    est = step_expansion(Linear(a), x, s, s_next, generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(est.numpy(), abs(heun_factor(a, s, s_next)), rtol=1e-9)


@pytest.mark.parametrize("sampler", ["euler", "sde", "edm-sde", "ddpm", "pc"])
def test_step_expansion_is_one_step_of_x_plus_delta_against_one_of_x_with_the_same_noise(sampler):
    """A nonlinear model (MLPDenoiser): the metric, which steps x + delta and x as one batch, equals two separate
    calls of the sampler's step with the same noise z, ||Phi(x + delta) - Phi(x)|| / ||delta||."""
    model = MLPDenoiser()
    x = torch.randn(5, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    got = step_expansion(model, x, 1.5, 0.7, generator=torch.Generator().manual_seed(9), sampler=sampler)
    gen = torch.Generator().manual_seed(9)  # the metric's draws, in its order: delta's direction, then z
    norms = lambda t: t.reshape(5, -1).norm(dim=1).reshape(5, 1, 1, 1)  # noqa: E731
    delta = torch.randn(x.shape, generator=gen, dtype=torch.float32).double()
    delta = delta / norms(delta) * 1e-3 * norms(x)
    z = torch.randn(x.shape, generator=gen, dtype=torch.float32).double()
    step = SAMPLERS[sampler].fn
    with torch.no_grad():
        diff = step(model, x + delta, [1.5, 0.7], lambda like: z) - step(model, x, [1.5, 0.7], lambda like: z)
    want = diff.reshape(5, -1).norm(dim=1) / delta.reshape(5, -1).norm(dim=1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


def test_profile():
    train, g = anisotropic_train(25, 0)
    emp = EmpiricalDenoiser(train)
    sigmas = [6.0, 3.0, 1.0]
    out = jacobian_profile(emp, emp, train[:4], sigmas, g, iters=30)
    assert out["sigmas"] == sigmas
    assert all(len(out[key]) == 3 for key in ("model", "empirical", "ratio", "step_expansion"))
    np.testing.assert_allclose(out["ratio"], 1.0, rtol=1e-3)
    assert all(v >= 0 for v in out["step_expansion"])

    lin = jacobian_profile(Linear(0.5), emp, train[:3], [1.0, 0.25], g, iters=5)
    np.testing.assert_allclose(lin["model"], 0.5, rtol=1e-5)
    np.testing.assert_allclose(lin["step_expansion"], [abs(heun_factor(0.5, 1.0, 0.25)), 0.5], rtol=1e-3)
    np.testing.assert_allclose(np.array(lin["model"]) / np.array(lin["empirical"]), lin["ratio"])


@pytest.mark.parametrize("sigma,dense_bytes,kind", [(0.05, DENSE_BUDGET, Support), (0.3, DENSE_BUDGET, Support),
                                                   (3.0, DENSE_BUDGET, DenseWeights), (3.0, 0, type(None))])
def test_amortised_empirical_norm_matches_the_eigenvalues_of_the_weighted_covariance(sigma, dense_bytes, kind):
    """M = 3000 points in R^16: the power iteration on the top-weight support (one pass over the training set),
    on all M weights kept (a large sigma, where no small support holds the weight), or streamed (they do not fit)
    gives the largest eigenvalue of Cov_w / sigma^2 computed in numpy from all M weights."""
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(3000, 1, 4, 4, generator=gen)
    x = train[:6] + 0.5 * sigma * torch.randn(6, 1, 4, 4, generator=gen)
    model = EmpiricalDenoiser(train, chunk_size=700)  # chunks that do not divide M
    budget = 6 * 16 * 4 * 200  # at most 200 points per sample
    assert type(find_support(model, x, sigma, budget_bytes=budget, dense_bytes=dense_bytes)) is kind
    got = empirical_jacobian_norm(model, x, sigma, iters=200, generator=torch.Generator().manual_seed(1),
                                  support_bytes=budget, dense_bytes=dense_bytes)
    pts, xs = train.reshape(3000, -1).double().numpy(), x.reshape(6, -1).double().numpy()
    want = []
    for row in xs:
        logits = -((pts - row) ** 2).sum(1) / (2 * sigma**2)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        centred = pts - w @ pts
        want.append(np.linalg.eigvalsh((centred * w[:, None]).T @ centred / sigma**2).max())
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("block_rows", [50, 10**6])
def test_dense_weights_jvp_is_the_weighted_covariance_times_v_and_reads_a_uint8_store(block_rows, monkeypatch):
    """DenseWeights.jvp against Cov_w v / sigma^2 in float64 numpy, over a float32 set and the same set kept as
    uint8 bytes (converted chunk by chunk; the values equal the float32 set's), in blocks of 50 rows (which
    divide neither the chunks nor M) or one block per chunk."""
    monkeypatch.setattr(empirical_support, "BLOCK_BYTES", block_rows * 48 * 4)
    gen = torch.Generator().manual_seed(5)
    u8 = torch.randint(0, 256, (900, 3, 4, 4), dtype=torch.uint8, generator=gen)
    floats = u8.float() / 127.5 - 1
    x = floats[:4] + 2.0 * torch.randn(4, 3, 4, 4, generator=gen)
    v = torch.randn(4, 3, 4, 4, generator=gen)
    pts, xs, vs = (t.reshape(len(t), -1).double().numpy() for t in (floats, x, v))
    want = []
    for row, vec in zip(xs, vs):
        logits = -((pts - row) ** 2).sum(1) / (2 * 2.0**2)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        centred = pts - w @ pts
        want.append((centred * w[:, None]).T @ (centred @ vec) / 2.0**2)
    for train in (floats, ImageStore(u8)):
        dense = find_support(EmpiricalDenoiser(train, chunk_size=128), x, 2.0, budget_bytes=4 * 48 * 4 * 5)
        assert isinstance(dense, DenseWeights)
        np.testing.assert_allclose(dense.jvp(v).reshape(4, -1).double().numpy(), np.array(want), rtol=2e-4, atol=1e-5)


def test_support_bound_holds_against_the_full_softmax():
    """The left-out weight of the support, computed from all M softmax weights in float64, is at most tol."""
    gen = torch.Generator().manual_seed(3)
    train = torch.randn(2000, 1, 4, 4, generator=gen)
    x = train[:5] + 0.4 * torch.randn(5, 1, 4, 4, generator=gen)
    model = EmpiricalDenoiser(train)
    for tol in (1e-3, 1e-7):
        support = find_support(model, x, 0.4, tol=tol, budget_bytes=5 * 16 * 4 * 400)  # <= 400 points
        assert support is not None and support.size < 2000
        logits = -((x.reshape(5, 1, -1).double() - train.reshape(1, 2000, -1).double()) ** 2).sum(-1) / (2 * 0.16)
        w = torch.softmax(logits, 1)
        top = w.topk(support.size, 1).values.sum(1)
        assert float((1 - top).max()) <= tol * (1 + 1e-6)


def test_smallest_support_is_the_first_s_whose_bound_holds():
    """Hand-made logits: M = 10, rows of top-4 logits; the bound (M - S) exp(l_S - lse_S) read off by hand."""
    logits = torch.tensor([[0.0, -30.0, -31.0, -32.0], [0.0, -1.0, -40.0, -41.0]])
    # row 0: S = 1 gives 9 exp(0 - 0) = 9 > tol; S = 2: 8 exp(-30 - lse(0, -30)) = 8 e^-30 = 7.5e-13 <= 1e-7
    # row 1: S = 2: 8 exp(-1 - lse(0, -1)) = 8 * 0.27 > tol; S = 3: 7 exp(-40 - lse) = 1.9e-17 -> S = 3
    assert smallest_support(logits, 10, 1e-7) == 3
    assert smallest_support(logits[:, :2], 10, 1e-7) is None  # row 1 needs 3 points
    assert smallest_support(logits, 4, 1e-7) == 4  # S_max = M: nothing is left out


def test_a_single_dominant_point_has_jacobian_exactly_zero_not_rounding_noise():
    """x on a training image at small sigma: all the weight is on that image, so J = Cov_w / sigma^2 = 0. The
    centred support sum gives 0; the uncentred streamed sum gives float32 cancellation of size eps ||x||^2 / sigma^2."""
    gen = torch.Generator().manual_seed(4)
    train = torch.rand(500, 3, 8, 8, generator=gen) * 2 - 1
    model = EmpiricalDenoiser(train)
    x = train[:4].clone()
    exact = empirical_jacobian_norm(model, x, 0.02, iters=5, generator=torch.Generator().manual_seed(1))
    assert float(exact.abs().max()) == 0.0
    streamed = empirical_jacobian_norm(model, x, 0.02, iters=5, generator=torch.Generator().manual_seed(1),
                                       support_bytes=0, dense_bytes=0)
    assert float(streamed.max()) > 0  # the noise the support removes


def test_profile_ratio_is_none_where_the_empirical_norm_is_zero():
    train, g = anisotropic_train(25, 0)
    emp = EmpiricalDenoiser(train.float())
    out = jacobian_profile(Linear(0.5), emp, train[:3].float(), [3.0, 1e-3], g, iters=5)
    assert out["empirical"][1] == 0.0 and out["ratio"][1] is None
    assert out["ratio"][0] == pytest.approx(out["model"][0] / out["empirical"][0])
