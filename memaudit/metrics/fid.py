"""Frechet distance between Gaussian fits of two image sets.

FID (Heusel et al. 2017) via clean-fid (Parmar et al. 2022) when it is installed and its Inception weights are
available; otherwise, and always in addition, an offline *proxy*: the same Frechet distance in a pixel-PCA space
fitted on the training set.  The proxy needs no network and no weights but is NOT comparable with published FID
numbers; use it only to compare runs on the same training set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from memaudit.cost import Work
from memaudit.errors import UserError, first_lines
from memaudit.storage import rows_per_chunk
from memaudit.features import INCEPTION_FILE, cleanfid_available, inception_cache_path, inception_features  # noqa: F401
from memaudit.metrics.base import SCAN, Metric, RunData, ScanContext
from memaudit.numbers import finite_or_none, fmt
from memaudit.pca import MAX_PCA_FIT, eigh as _eigh, pca_basis  # noqa: F401 (MAX_PCA_FIT: cost)

FID_MODES = ("auto", "clean-fid", "proxy", "off")
PROJECT_ROWS = 4096  # training images projected at a time (a float64 copy of all of them would be 2x the set)


@dataclass
class FIDResult:
    """value None means unavailable (message says why); kind is 'clean-fid' or 'proxy'."""

    value: Optional[float]
    kind: str
    message: str


def _psd_sqrt(c: Tensor) -> Tensor:
    """Symmetric PSD square root V diag(sqrt(max(l, 0))) V^T by eigh."""
    vals, vecs = _eigh(c)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), in float64 via eigh."""
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(c, dtype=torch.float64, device=mu1.device) for c in (cov1, cov2))
    cov1, cov2 = cov1.reshape(mu1.numel(), -1), cov2.reshape(mu1.numel(), -1)
    s1 = _psd_sqrt(cov1)
    middle = s1 @ cov2 @ s1
    tr_covmean = _eigh(middle)[0].clamp_min(0).sqrt().sum()
    diff = mu1 - mu2.to(mu1.device)
    value = diff @ diff + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_covmean
    return max(float(value), 0.0)


def _gaussian(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (rows = observations)."""
    return feats.mean(0), torch.cov(feats.T).reshape(feats.shape[1], feats.shape[1])


def fid_proxy(samples: Tensor, train: Tensor, dims: int = 64) -> float:
    """Frechet distance of Gaussian fits in the top-`dims` pixel-PCA space of the training set (offline proxy,
    not comparable with published FID)."""
    if samples.shape[0] < 2 or train.shape[0] < 2:
        raise UserError("the FID proxy needs at least 2 samples and 2 training images")
    if samples[0].numel() != train[0].numel():
        raise UserError("samples and training images have different sizes; cannot compare them")
    mean, basis = pca_basis(train, dims)
    def project(x: Tensor) -> Tensor:  # one float64 copy of the chunk, centred in place
        centred = x.reshape(x.shape[0], -1).to(basis.device, torch.float64, copy=True)
        return centred.sub_(mean) @ basis

    mu1, c1 = _gaussian(project(samples))
    step = rows_per_chunk(int(math.prod(train.shape[1:])), PROJECT_ROWS, 8)
    mu2, c2 = _gaussian(torch.cat([project(train[a:a + step]) for a in range(0, train.shape[0], step)]))
    return frechet_distance(mu1, c1, mu2, c2)


def clean_fid(samples: Tensor, train: Tensor, device) -> FIDResult:
    """FID between samples and training images with clean-fid's Inception (pool3, mode 'clean'), computed in
    memory from features of the images quantised to uint8 (as clean-fid's folders hold them); no download."""
    if not cleanfid_available():
        return FIDResult(None, "clean-fid", "clean-fid is not installed (pip install 'memaudit[fid]')")
    if samples.shape[0] < 2 or train.shape[0] < 2:
        return FIDResult(None, "clean-fid", "FID needs at least 2 samples and 2 training images")
    try:
        features = inception_features(device)
        mu1, c1 = _gaussian(_batched(features, samples).double())
        mu2, c2 = _gaussian(_batched(features, train).double())
    except UserError as exc:
        return FIDResult(None, "clean-fid", str(exc))
    except Exception as exc:  # noqa: BLE001 - the optional package's failure is reported, not raised
        return FIDResult(None, "clean-fid", f"clean-fid failed: {first_lines(exc, with_type=True)[:200]}")
    counts = f"{samples.shape[0]} samples vs {train.shape[0]} training images"
    return FIDResult(frechet_distance(mu1, c1, mu2, c2), "clean-fid", f"clean-fid (Inception, mode=clean), {counts}")


def _batched(features: Callable[[Tensor], Tensor], images: Tensor, batch: int = 64) -> Tensor:
    return torch.cat([features(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def proxy_result(samples: Tensor, train: Tensor, dims: int = 64) -> FIDResult:
    """fid_proxy wrapped as a FIDResult (value None with the reason if it cannot be computed)."""
    try:
        value = fid_proxy(samples, train, dims)
    except UserError as exc:
        return FIDResult(None, "proxy", str(exc))
    return FIDResult(value, "proxy", f"offline pixel-PCA({dims}) Frechet distance; not comparable with published FID")


def compute_fid(samples: Tensor, train: Tensor, device, mode: str = "auto") -> list[FIDResult]:
    """'auto': clean-fid if installed, plus the proxy; 'clean-fid' or 'proxy': only that one; 'off': []."""
    if mode not in FID_MODES:
        raise UserError(f"unknown FID mode {mode!r}; choose one of {', '.join(FID_MODES)}")
    results = []
    if mode == "clean-fid" or (mode == "auto" and cleanfid_available()):
        results.append(clean_fid(samples, train, device))
    if mode in ("auto", "proxy"):
        results.append(proxy_result(samples, train))
    return results


FID_KINDS = ("clean-fid", "proxy")


class FID(Metric):
    name = "fid"
    scope = SCAN
    title = "Quality (Frechet distance)"
    summary_keys = {"fid": "value of the `clean-fid` entry of `fid`", "fid_proxy": "value of the `proxy` entry of `fid`"}

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> Optional[list]:
        if ctx.config.fid == "off":
            return None
        first = ctx.runs[next(iter(ctx.runs))].samples
        return [asdict(r) for r in compute_fid(first, ctx.train.to("cpu"), ctx.config.device, mode=ctx.config.fid)]

    def cost(self, w, sampler=None):
        """The proxy, in float64 (counted twice): the PCA fit on min(M, 5000) images (covariance or Gram matrix and
        its eigh, 6 n^3 at the measured eigh rate), then the training set and the samples projected on 64 directions."""
        fit = min(w.num_train, MAX_PCA_FIT)
        n = min(fit, w.dim)
        fitting = 2.0 * fit * w.dim * n
        return Work(flops=2 * (fitting + 2.0 * (w.num_train + w.num_samples) * w.dim * 64), eigh_flops=6.0 * n ** 3)

    def summarize(self, entries: Optional[list]) -> dict:
        out = {"fid": None, "fid_proxy": None}
        for entry in entries or []:
            key = {"clean-fid": "fid", "proxy": "fid_proxy"}.get(entry.get("kind"))
            if key and out[key] is None:
                out[key] = finite_or_none(entry.get("value"))
        return out

    def validate(self, entries, c, where: str) -> None:
        for i, entry in enumerate(c.list(entries, where)):
            at = f"{where}[{i}]"
            c.dict(entry, at, ("value", "kind", "message"))
            c.num(entry["value"], f"{at}.value", nullable=True)
            if entry["kind"] not in FID_KINDS:
                c.fail(f"{at}.kind", f"must be one of {list(FID_KINDS)}, got {entry['kind']!r}")
            c.str(entry["message"], f"{at}.message")

    def lines(self, report: Mapping) -> list[str]:
        out = []
        for entry in self.sections(report) or []:
            label = "FID (clean-fid)" if entry.get("kind") == "clean-fid" else "FID proxy"
            message = f" - {entry['message']}" if entry.get("message") else ""
            out.append(f"{label}: {fmt(entry.get('value'), 5)}{message}")
        return out


METRIC = FID()
