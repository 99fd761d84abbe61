"""Carlini's adaptive L2 against a numpy brute force on real digits: copies score ~0, held-out digits do not."""

import numpy as np
import pytest
import torch

from digits import digits_dataset
from memaudit.data import array_to_images
from memaudit.empirical import EmpiricalDenoiser
from memaudit.metrics.adaptive_l2 import METRIC, adaptive_l2
from memaudit.scan import ScanConfig, run_scan


def brute_force(samples: np.ndarray, train: np.ndarray, n: int = 50, alpha: float = 0.5) -> np.ndarray:
    s, t = samples.reshape(len(samples), -1).astype(np.float64), train.reshape(len(train), -1).astype(np.float64)
    d = np.sort(np.sqrt(((s[:, None] - t[None]) ** 2).sum(-1)), axis=1)[:, :n]
    return d[:, 0] / (alpha * d.mean(1))


def test_formula_on_sorted_distances():
    dist = np.array([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(adaptive_l2(dist), [0.0, 2.0, 0.0])


def test_scan_section_matches_brute_force():
    digits = array_to_images(digits_dataset(300))
    train, held_out = digits[:200], digits[200:210]
    config = ScanConfig(num_samples=4, samplers=("heun",), steps=3, skip=("entropy", "cosine", "jacobian", "fid"))
    model = EmpiricalDenoiser(train)
    result = run_scan(model, train, config, model_info={"spec": "empirical"}, data_info={"path": "digits"})
    section = result.report["runs"]["heun"]["adaptive_l2"]
    want = brute_force(result.samples["heun"].numpy(), train.numpy())
    np.testing.assert_allclose(section["scores"], want, rtol=1e-5, atol=1e-6)
    assert section["neighbours"] == 50 and section["fraction"] == 1.0  # the empirical sampler copies
    assert result.report["summary"]["adaptive_l2_min"] == pytest.approx(min(want), abs=1e-6)
    held = brute_force(held_out.numpy(), train.numpy())
    assert (held > 0.3).all()  # fresh digits are not copies by this measure either
    assert set(METRIC.summarize({"heun": section})) == {"adaptive_l2_min", "adaptive_l2_fraction"}
