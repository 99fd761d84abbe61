"""Calibration on held-out real digits, Meehan's C_T (U against scipy) and Alaa's authenticity, against numpy."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom, mannwhitneyu

from cli_helpers import run_cli
from digits import digits_dataset
from memaudit.copying import assign, c_t, kmeans, mann_whitney_u, nn_distance, z_u
from memaudit.data import array_to_images
from memaudit.duplicates import find_duplicates
from memaudit.metrics.authenticity import METRIC as AUTH
from memaudit.metrics.base import RunData, ScanContext
from memaudit.metrics.calibration import METRIC as CAL
from memaudit.metrics.nn_ratio import training_index
from memaudit.scan import ScanConfig
from memaudit.validation import Check

ROOT = Path(__file__).resolve().parents[1]


def brute_ratios(q, t):
    d = np.sqrt(((q.reshape(len(q), -1)[:, None].astype(np.float64) - t.reshape(len(t), -1)[None]) ** 2).sum(-1))
    s = np.sort(d, 1)
    return np.where(s[:, 1] > 0, s[:, 0] / np.where(s[:, 1] > 0, s[:, 1], 1), 0.0), d


@pytest.fixture(scope="module")
def digits():
    return array_to_images(digits_dataset()).float()


def context(train, holdout, fpr, runs=()):
    index = training_index(train)
    config = ScanConfig(fpr=fpr)
    ctx = ScanContext(model=None, empirical=None, train=train, config=config, features=None, index=index,
                      duplicates=find_duplicates(index, config.dup_tol), runs={}, sigmas=[],
                      generator=torch.Generator(), task=lambda d, n: (lambda done, info="": None), holdout=holdout)
    for name, samples in runs:
        ctx.runs[name] = RunData(name, samples, [])
    return ctx


@pytest.mark.parametrize("a,b", [(np.arange(5.0), np.arange(3.0) + 0.5), (None, None)])
def test_mann_whitney_u_matches_scipy(a, b):
    if a is None:
        rng = np.random.default_rng(1)
        a, b = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 55).astype(float)  # many ties
    assert mann_whitney_u(a, b) == mannwhitneyu(a, b, alternative="less").statistic
    m, n = len(a), len(b)
    u = mannwhitneyu(a, b).statistic
    assert z_u(a, b) == pytest.approx((u - m * n / 2 + 0.5) / np.sqrt(m * n * (m + n + 1) / 12))


def test_calibrated_fpr_on_held_out_digits(digits):
    train, held = digits[:1000], digits[1000:]
    fpr = 0.05
    ctx = context(train, held, fpr)
    assert ctx.duplicates.clusters() == []  # so the brute force below needs no clusters
    section = CAL.compute(ctx)
    CAL.validate(section, Check(), "calibration")
    r, _ = brute_ratios(held.numpy(), train.numpy())
    n = len(r)
    assert section["num_holdout"] == n
    assert section["fpr"] == pytest.approx(np.mean(r < 1 / 3))
    assert section["calibrated_threshold"] == pytest.approx(np.sort(r)[int(np.floor(fpr * n))], rel=1e-5)
    # the split-half check: a threshold calibrated on one half has the target FPR on the other (binomial tolerance)
    half = section["split_half"]
    k, m = half["fpr_count"], n - n // 2
    assert binom.ppf(0.001, m, fpr) <= k <= binom.ppf(0.999, m, fpr), (k, m)
    assert abs(section["ct_baseline"]) < 3  # held-out vs held-out: no copying
    summary = CAL.summarize(section)
    assert summary["calibrated_threshold"] == section["calibrated_threshold"]
    assert summary["calibrated_memorized_fraction"] is None  # no runs


def test_ct_is_near_zero_for_held_out_digits_and_negative_for_copies(digits):
    flat = digits.reshape(len(digits), -1).numpy().astype(np.float64)
    train, test, fresh = flat[:1000], flat[1000:1400], flat[1400:]
    result = c_t(train, test, fresh, seed=0)
    assert abs(result.ct) < 3
    # the statistic by hand from the cells (centres from the same seeded k-means)
    centres = kmeans(train, 3, 0)
    lt, lp, lq = assign(train, centres), assign(test, centres), assign(fresh, centres)
    num = den = 0.0
    for j in range(3):
        gq, gp = nn_distance(fresh[lq == j], train[lt == j]), nn_distance(test[lp == j], train[lt == j])
        brute = np.sqrt(((fresh[lq == j][:, None] - train[lt == j][None]) ** 2).sum(-1)).min(1)
        np.testing.assert_allclose(gq, brute, rtol=1e-6, atol=1e-6)
        if (lq == j).sum() > 20:
            m, n = len(gq), len(gp)
            u = mannwhitneyu(gq, gp, alternative="less").statistic
            z = (u - (m * n / 2 - 0.5)) / np.sqrt(m * n * (m + n + 1) / 12)
            num, den = num + len(gp) / len(test) * z, den + len(gp) / len(test)
    assert result.ct == pytest.approx(num / den)
    copies = train[:300] + 0.01 * np.random.default_rng(0).standard_normal((300, 64))
    assert c_t(train, test, copies, seed=0).ct < -5


def test_authenticity_against_numpy(digits):
    train, held = digits[:500], digits[1000:1100]
    samples = torch.cat([train[:20] + 0.001, held[:30]])
    ctx = context(train, None, 0.01, runs=[("x", samples)])
    section = AUTH.compute(ctx, ctx.runs["x"])
    AUTH.validate(section, Check(), "authenticity")
    _, d = brute_ratios(samples.numpy(), train.numpy())
    nearest, dg = d.argmin(1), d.min(1)
    _, dt = brute_ratios(train.numpy(), train.numpy())
    np.fill_diagonal(dt, np.inf)
    want = dg > dt.min(1)[nearest]
    assert section["authentic"] == want.tolist()
    assert not any(section["authentic"][:20]) and section["authenticity"] == pytest.approx(want.mean())


def scan(capsys, tmp_path, *args):
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "scan", ROOT / "examples/models/digits32", ROOT / "examples/digits/digits32.npz",
                           "--samples", "64", "--sampler", "heun", "--quiet", "--skip", "fid", "--skip", "jacobian",
                           "--skip", "cosine", "--skip", "entropy", *args, "--json", out)
    return code, (json.loads(out.read_text()) if out.is_file() else None), err


@pytest.fixture
def held_npz(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "held.npz"
    np.savez(path, images=digits_dataset()[1000:])
    return path


def test_the_memorizing_model_has_strongly_negative_ct(capsys, tmp_path, held_npz):
    code, report, err = scan(capsys, tmp_path, "--holdout", held_npz, "--fail-on", "ct_score<-3")
    assert code == 1, err
    assert report["summary"]["ct_score"] < -5
    assert report["calibration"]["calibrated"] is True and report["data"]["holdout"]["num_images"] == 797
    assert report["summary"]["calibrated_memorized_fraction"] > 0.9


def test_without_holdout_the_threshold_is_uncalibrated_and_its_gates_fail(capsys, tmp_path, held_npz):
    code, report, err = scan(capsys, tmp_path, "--fail-on", "ct_score<-3", "--fail-on", "holdout_fpr>0.5")
    assert code == 1 and report["calibration"]["calibrated"] is False
    assert "uncalibrated" in report["calibration"]["note"]
    assert all(not g["passed"] and "unavailable" in g["reason"] for g in report["gates"])


@pytest.mark.parametrize("args,fragment", [(["--fpr", "0"], "--fpr"), (["--fpr", "1.5"], "--fpr")])
def test_bad_calibration_input_is_a_one_line_error(capsys, tmp_path, held_npz, args, fragment):
    code, _, err = scan(capsys, tmp_path, "--holdout", held_npz, *args)
    assert code == 2 and err.strip().count("\n") == 0 and fragment in err, err


def test_a_holdout_of_another_shape_is_a_one_line_error(capsys, tmp_path, held_npz):
    np.save(tmp_path / "big.npy", np.zeros((10, 16, 16), dtype=np.uint8))
    code, _, err = scan(capsys, tmp_path, "--holdout", tmp_path / "big.npy")
    assert code == 2 and err.strip().count("\n") == 0 and "shape" in err, err


def test_ct_reduces_wide_features_to_64_pca_dims_like_sklearn(digits):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    lift = rng.standard_normal((64, 100))  # a 100-dim feature space
    flat = digits.reshape(len(digits), -1).numpy().astype(np.float64) @ lift
    train, test, gen = flat[:1000], flat[1000:1400], flat[1400:]
    pca = PCA(n_components=64).fit(train)
    want = c_t(pca.transform(train), pca.transform(test), pca.transform(gen), seed=0).ct  # 64 dims: no PCA inside
    assert c_t(train, test, gen, seed=0).ct == pytest.approx(want, rel=1e-6, abs=1e-9)
