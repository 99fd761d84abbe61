"""A realistic fake scan report (and matching sample/training tensors) for the report-layer tests."""

from __future__ import annotations

import numpy as np
import torch

from memaudit.metrics.nn_ratio import section as nn_ratio_section
from memaudit.report.schema import build_report

NUM_SAMPLES = 32
NUM_TRAIN = 50
SHAPE = [1, 8, 8]
SAMPLERS = ("heun", "sde")


def karras_sigmas(steps: int = 12, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def entropy_section(sigmas, h) -> dict:
    """An entropy section from per-sigma, per-sample entropies (S, N), as memaudit.metrics.entropy writes it."""
    h = np.asarray(h, dtype=np.float64)
    points = np.exp(h).mean(1)
    below = np.flatnonzero(points < 2)
    return {"sigmas": list(map(float, sigmas)), "mean": h.mean(1).tolist(), "median": np.median(h, 1).tolist(),
            "min": h.min(1).tolist(), "effective_points_mean": points.tolist(), "final_mean": float(h.mean(1)[-1]),
            "collapse_sigma": float(sigmas[below[0]]) if len(below) else 0.0}


def curve_section(sigmas, values) -> dict:
    """A {"sigmas", "mean", "std"} section from per-sigma, per-point values (S, N)."""
    v = np.asarray(values, dtype=np.float64)
    return {"sigmas": list(map(float, sigmas)), "mean": v.mean(1).tolist(), "std": v.std(1).tolist()}


def make_report(seed: int = 0, gates=(), samplers=SAMPLERS, with_optional: bool = True) -> dict:
    """Build a report with the real section builders from seeded random per-sample measurements."""
    rng = np.random.default_rng(seed)
    sigmas = karras_sigmas()
    runs = {}
    for k, sampler in enumerate(samplers):
        d2 = rng.uniform(5.0, 10.0, NUM_SAMPLES)
        ratio = rng.uniform(0.34, 1.0, NUM_SAMPLES)
        ratio[: 3 + 2 * k] = rng.uniform(0.01, 0.3, 3 + 2 * k)  # a few memorized samples, more for later runs
        d1 = ratio * d2
        nearest = rng.integers(0, NUM_TRAIN, NUM_SAMPLES)
        # entropy falls from ~log(K) at large sigma to ~0 at the end of sampling
        entropy = np.outer(np.linspace(3.4, 0.05 + 0.1 * k, len(sigmas)), np.ones(NUM_SAMPLES))
        entropy = np.clip(entropy + rng.normal(0, 0.03, entropy.shape), 0, None)
        traj = np.clip(rng.uniform(0, 0.4, (len(sigmas), NUM_SAMPLES)) * np.linspace(1, 0.1, len(sigmas))[:, None], 0, 2)
        runs[sampler] = {
            "nn_ratio": nn_ratio_section(ratio, d1, d2, nearest, threshold=1 / 3),
            "entropy": entropy_section(sigmas, entropy),
            "trajectory_cosine": curve_section(sigmas, traj),
        }
    optional: dict = {}
    if with_optional:
        jac_model = 1.0 + 30.0 / (1.0 + sigmas)
        jac_emp = 1.0 + 60.0 / (1.0 + sigmas)
        optional = {
            "score_cosine": curve_section(sigmas, rng.uniform(0, 0.5, (len(sigmas), 16)) * np.linspace(1, 0.2, len(sigmas))[:, None]),
            "jacobian": {"sigmas": sigmas.tolist(), "model": jac_model.tolist(), "empirical": jac_emp.tolist(),
                         "ratio": (jac_model / jac_emp).tolist(), "step_expansion": (1.0 + 0.1 * np.log1p(sigmas)).tolist()},
            "fid": [{"value": None, "kind": "clean-fid", "message": "clean-fid not installed; pip install memaudit[fid]"},
                    {"value": 42.5 + seed, "kind": "proxy", "message": "Frechet distance of raw pixels"}],
        }
    return build_report(
        model={"spec": "checkpoints/digits.safetensors", "kind": "native", "sigma_min": 0.002, "sigma_max": 80.0,
               "image_shape": SHAPE},
        data={"path": "examples/digits/digits.npz", "num_images": NUM_TRAIN, "image_shape": SHAPE},
        settings={"num_samples": NUM_SAMPLES, "seed": seed, "samplers": list(samplers), "steps": len(sigmas),
                  "threshold": 1 / 3, "features": "pixels", "topk": 32, "device": "cpu", "batch_size": 64},
        runs=runs, gates=gates, sections=optional,
    )


def make_tensors(seed: int = 0, samplers=SAMPLERS) -> tuple[dict, torch.Tensor]:
    """Per-run sample tensors and a training tensor in [-1, 1] matching make_report's shapes."""
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(NUM_TRAIN, *SHAPE, generator=g) * 2 - 1
    samples = {s: torch.rand(NUM_SAMPLES, *SHAPE, generator=g) * 2 - 1 for s in samplers}
    return samples, train
