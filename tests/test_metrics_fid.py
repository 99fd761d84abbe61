"""Frechet distance vs closed forms and scipy.linalg.sqrtm; pixel-PCA proxy; clean-fid fails fast offline."""

import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from digits import digits_dataset
from memaudit.data import array_to_images
from memaudit.errors import UserError
from memaudit import features as featmod
from memaudit.metrics import fid as fidmod
from memaudit.metrics.fid import FIDResult, clean_fid, compute_fid, fid_proxy, frechet_distance


def scipy_frechet(mu1, c1, mu2, c2):
    covmean = linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def random_spd(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    a, b = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    ref = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(ref, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


@pytest.mark.parametrize("seed,rank", [(1, None), (2, None), (3, 3)])
def test_matches_scipy_sqrtm(seed, rank):
    rng = np.random.default_rng(seed)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = random_spd(d, rng), random_spd(d, rng, rank)
    value = frechet_distance(torch.tensor(mu1), torch.tensor(c1), mu2, c2)  # torch and numpy inputs
    assert value == pytest.approx(scipy_frechet(mu1, c1, mu2, c2), rel=1e-6, abs=1e-8)
    assert value == pytest.approx(frechet_distance(mu2, c2, mu1, c1), rel=1e-8)  # symmetric


def numpy_proxy(samples: np.ndarray, train: np.ndarray, dims: int) -> float:
    t = train.reshape(len(train), -1).astype(np.float64)
    s = samples.reshape(len(samples), -1).astype(np.float64)
    mean = t.mean(0)
    _, _, vt = np.linalg.svd(t - mean, full_matrices=False)
    basis = vt[:min(dims, len(t) - 1, t.shape[1])].T
    ps, pt = (s - mean) @ basis, (t - mean) @ basis
    return scipy_frechet(ps.mean(0), np.cov(ps, rowvar=False), pt.mean(0), np.cov(pt, rowvar=False))


@pytest.fixture(scope="module")
def digits():
    return array_to_images(digits_dataset(400))


def test_proxy_matches_numpy_pca(digits):
    train, samples = digits[:300], digits[300:]
    for dims in (8, 20):
        assert fid_proxy(samples, train, dims) == pytest.approx(numpy_proxy(samples.numpy(), train.numpy(), dims),
                                                                rel=1e-5)
    # more pixels than images: the Gram-matrix branch, dims capped at M - 1
    small = train[:12]
    assert fid_proxy(samples, small, 64) == pytest.approx(numpy_proxy(samples.numpy(), small.numpy(), 64), rel=1e-5)


def test_proxy_of_itself_is_zero_and_grows_with_shift(digits):
    train = digits[:300]
    assert fid_proxy(train, train) == pytest.approx(0, abs=1e-6)
    shifts = [fid_proxy(train + s, train) for s in (0.05, 0.2, 0.5)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]
    noise = torch.rand(100, *train.shape[1:], generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert fid_proxy(noise, train) > fid_proxy(digits[300:], train)


def test_proxy_errors():
    with pytest.raises(UserError):
        fid_proxy(torch.zeros(1, 1, 4, 4), torch.randn(5, 1, 4, 4))
    with pytest.raises(UserError):
        fid_proxy(torch.zeros(3, 1, 4, 4), torch.randn(5, 1, 5, 5))


def test_clean_fid_unavailable_here_is_fast():
    start = time.time()
    result = clean_fid(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), "cpu")
    assert time.time() - start < 5
    assert isinstance(result, FIDResult) and result.value is None and result.kind == "clean-fid"
    if not fidmod.cleanfid_available():
        assert result.message == "clean-fid is not installed (pip install 'memaudit[fid]')"


def test_clean_fid_without_weights_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setattr(featmod, "_import_cleanfid", lambda: types.SimpleNamespace())
    monkeypatch.setattr(featmod, "inception_cache_path", lambda: tmp_path / fidmod.INCEPTION_FILE)
    result = clean_fid(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), "cpu")
    assert result.value is None and "Inception weights" in result.message and "\n" not in result.message


def test_clean_fid_is_the_frechet_distance_of_inception_features(monkeypatch, tmp_path):
    """With a stand-in for clean-fid's network and resizer, the FID is the Frechet distance (scipy's sqrtm) of the
    features of the uint8-quantised images, as clean-fid computes it from PNG folders."""
    import sys

    proj = torch.randn(64 * 3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class FakeInception(torch.nn.Module):
        def forward(self, batch):  # (B, 3, H, W) floats 0..255, as clean-fid feeds its Inception
            return (batch.double().reshape(batch.shape[0], -1) / 255) @ proj

    features_mod = types.SimpleNamespace(build_feature_extractor=lambda mode, device=None: FakeInception())
    resize_mod = types.SimpleNamespace(build_resizer=lambda mode: (lambda a: a.astype(np.float32)))
    monkeypatch.setitem(sys.modules, "cleanfid", types.SimpleNamespace(features=features_mod, resize=resize_mod))
    monkeypatch.setitem(sys.modules, "cleanfid.features", features_mod)
    monkeypatch.setitem(sys.modules, "cleanfid.resize", resize_mod)
    weights = tmp_path / fidmod.INCEPTION_FILE
    weights.write_bytes(b"x")
    monkeypatch.setattr(featmod, "_import_cleanfid", lambda: types.SimpleNamespace())
    monkeypatch.setattr(featmod, "inception_cache_path", lambda: weights)
    g = torch.Generator().manual_seed(1)
    samples, train = torch.rand(30, 1, 8, 8, generator=g) * 2 - 1, torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    result = clean_fid(samples, train, "cpu")

    def feats(x):
        u8 = np.round((np.clip(x.numpy(), -1, 1) + 1) * 127.5).astype(np.float64)  # what a PNG holds
        rgb = np.repeat(u8, 3, axis=1)
        return (rgb.reshape(len(rgb), -1) / 255) @ proj.numpy()

    a, b = feats(samples), feats(train)
    covmean = linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)).real
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False) + np.cov(b, rowvar=False)
                                                           - 2 * covmean)
    assert result.kind == "clean-fid" and result.value == pytest.approx(want, rel=1e-6)
    assert "30 samples vs 40 training images" in result.message


def test_compute_fid_modes(digits):
    samples, train = digits[300:340], digits[:300]
    assert compute_fid(samples, train, "cpu", mode="off") == []
    auto = compute_fid(samples, train, "cpu")
    assert auto[-1].kind == "proxy" and auto[-1].value == pytest.approx(fid_proxy(samples, train))
    assert "not comparable" in auto[-1].message
    if not fidmod.cleanfid_available():
        assert len(auto) == 1
    only = compute_fid(samples, train, "cpu", mode="clean-fid")
    assert len(only) == 1 and only[0].kind == "clean-fid"
    too_few = compute_fid(samples[:1], train, "cpu", mode="proxy")
    assert too_few[0].value is None and "at least 2" in too_few[0].message
    with pytest.raises(UserError):
        compute_fid(samples, train, "cpu", mode="fast")


def test_proxy_accumulated_over_many_chunks_matches_numpy_pca(digits, monkeypatch):
    """The PCA fit sums the covariance (rows) and the Gram matrix (columns) over chunks: with chunks of a few
    rows/columns it still equals numpy's one-shot PCA."""
    import memaudit.storage

    monkeypatch.setattr(memaudit.storage, "CHUNK_BYTES", 8 * 64 * 7)  # 7 float64 rows of 64 pixels
    train, samples = digits[:300], digits[300:]
    assert fid_proxy(samples, train, 20) == pytest.approx(numpy_proxy(samples.numpy(), train.numpy(), 20), rel=1e-5)
    small = train[:12]
    assert fid_proxy(samples, small, 64) == pytest.approx(numpy_proxy(samples.numpy(), small.numpy(), 64), rel=1e-5)
