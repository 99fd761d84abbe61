"""The scan of a latent model: run_scan on latents, plus the decoded samples' NN ratio in pixel space.

The training set is encoded once, z_i = s (E(x_i) - b) (cached, memaudit.latents); the scan samples and measures
in latent space (empirical denoiser, entropy, score cosine, Jacobian, NN ratio against the z_i), and the
`decoded` metric compares each run's decoded samples G(z / s + b) to the pixel training images. The returned
samples are the decoded images, so the HTML pairs show pictures. Metrics defined on pixels only (DiffMemorize's
uint8 quantisation, FID) are skipped, and flags that work on pixels (--features, --match-*) are refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from torch import Tensor

from memaudit.errors import UserError
from memaudit.fingerprints import data_fingerprint
from memaudit.latents import EncodedTrain, train_latents
from memaudit.metrics import decoded
from memaudit.metrics.nn_ratio import training_index
from memaudit.models.latent import LatentModel, describe
from memaudit.scan import NoteFn, ScanConfig, ScanResult, TaskFactory, run_scan, training_duplicates

PIXEL_ONLY = ("diffmemorize", "fid")  # metrics defined on pixels, skipped in latent space
LATENT_STD_RANGE = (0.2, 5.0)  # latents scaled well have std ~1; outside this range the factor is suspect


def check_config(config: ScanConfig) -> None:
    """UserError for the flags that act on pixels, which a latent scan's metrics do not see."""
    if config.features not in (None, "pixels"):
        raise UserError(f"--features {config.features} embeds pixel images; a latent model is measured in latent "
                        "space and in decoded pixels: drop --features")
    if config.match_flips or config.match_shifts:
        raise UserError("--match-flips/--match-shifts transform pixel images; they do not apply to a latent model")


def latent_config(config: ScanConfig) -> ScanConfig:
    """The config with the pixel-only metrics skipped."""
    return replace(config, skip=tuple(config.skip) + tuple(m for m in PIXEL_ONLY if m not in config.skip))


def encoded_train(model: LatentModel, train: Tensor, workdir: Optional[Path], note: NoteFn) -> EncodedTrain:
    """The training latents: those the model was built on (empirical + --vae), else from the cache."""
    if model.encoded is not None and model.encoded.data == data_fingerprint(train):
        return model.encoded
    return train_latents(model.autoencoder, train, workdir, note)


def check_latent_scale(encoded: EncodedTrain, model: LatentModel, note: NoteFn) -> None:
    """A warning when the scaled training latents' std is far from 1 (a wrong scaling factor, or none set)."""
    std = float(encoded.latents.double().std())
    lo, hi = LATENT_STD_RANGE
    if not lo <= std <= hi:
        note(f"warning: the training latents have std {std:.3g} with scaling factor "
             f"{model.autoencoder.scale:g} ({model.autoencoder.scale_source}); a diffusion model trained on "
             "well-scaled latents sees std ~1: check --latent-scale")


def decoded_space(model: LatentModel, train: Tensor, config: ScanConfig, note: NoteFn) -> decoded.DecodedSpace:
    """The pixel training images, their neighbour index and near-duplicate clusters, and the decoder."""
    pixels = train.to(config.device)
    index = training_index(pixels)
    return decoded.DecodedSpace(model.decode, pixels, index, training_duplicates(index, config.dup_tol, note))


def run_latent_scan(model: LatentModel, train: Tensor, config: ScanConfig, *, model_info: dict, data_info: dict,
                    task: Optional[TaskFactory] = None, workdir: Optional[Path] = None, resume: bool = False,
                    note: Optional[NoteFn] = None, holdout: Optional[Tensor] = None) -> ScanResult:
    """run_scan on the training set's latents (cached under `workdir`), with the decoded pixel-space NN ratio
    per run; the result's samples are the decoded images. `train`, `holdout`: pixel images in [-1, 1]."""
    note = note or (lambda line: None)
    config.validate()
    check_config(config)
    encoded = encoded_train(model, train, workdir, note)
    check_latent_scale(encoded, model, note)
    config = latent_config(config)
    space = decoded_space(model, train, config, note)
    held = model.encode(holdout) if holdout is not None else None
    info = {**model_info, "latent": describe(model)}
    result = run_scan(model, encoded.latents, config, model_info=info,
                      data_info={**data_info, "latents": encoded.info()}, task=task, workdir=workdir,
                      resume=resume, note=note, holdout=held, context={decoded.SPACE: space})
    if result is None:  # a torchrun rank other than 0 (memaudit.distributed)
        return None
    result.samples = {name: space.decoded(name, s) for name, s in result.samples.items()}
    worse_of_both(result.report["summary"], list(result.report["runs"]))
    return result


GATED_BOTH = ("memorized_fraction", "memorized_fraction_lower", "memorized_fraction_upper")


def worse_of_both(summary: dict, samplers: list[str]) -> None:
    """For a latent model the gate names `memorized_fraction` (and _lower, _upper, _{sampler}) read the worse of
    the latent-space and the decoded pixel-space value (in place): a copy in either space fails a gate on it
    (fail closed). Each space's own values stay in the report: `runs.<sampler>.nn_ratio` (latent) and
    `runs.<sampler>.decoded` (pixels, also gateable as `decoded_memorized_fraction...`)."""
    from memaudit.metrics.base import sampler_key

    keys = [(k, decoded.PREFIX + k) for k in GATED_BOTH]
    keys += [(sampler_key("memorized_fraction_{sampler}", s), decoded.PREFIX + sampler_key(
        "memorized_fraction_{sampler}", s)) for s in samplers]
    for latent_key, pixel_key in keys:
        values = [v for v in (summary.get(latent_key), summary.get(pixel_key)) if v is not None]
        if latent_key in summary:
            summary[latent_key] = max(values) if values else None
