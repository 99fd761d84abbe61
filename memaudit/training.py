"""Denoiser training with the EDM loss, used by `train` (target x0) and by fine-tuning (other targets).

sigma ~ exp(N(P_mean, P_std^2)), x = x0 + sigma n, loss = lambda(sigma) ||D(x, sigma) - target||^2
with lambda = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022).  Weights are EMA-averaged; training
state (step, optimizer, EMA, RNG) is checkpointed so an interrupted run can resume.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import math
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from memaudit.errors import SettingError, UserError, first_lines
from memaudit.fingerprints import data_fingerprint
from memaudit.models.adapters import NetworkDenoiser
from memaudit.models.native import check_output_folder, is_native, load_native, save_native

STATE_NAME = "training_state.pt"
# target(idx, x0, x_noisy, sigma) -> the regression target for D(x_noisy, sigma); idx indexes the training set
TargetFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class TrainConfig:
    """Optimisation settings for `fit`."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    p_mean: float = -1.2
    p_std: float = 1.2
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    sigma_sampling: str = "lognormal"  # EDM's log-normal, or log-uniform over the model's range (NCSN)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingError(name, getattr(self, name), ">= 1")
        if not self.lr > 0:
            raise SettingError("lr", self.lr, "> 0")
        if not 0 <= self.ema_decay < 1:
            raise SettingError("ema_decay", self.ema_decay, "in [0, 1)")
        if self.checkpoint_every < 0:
            raise SettingError("checkpoint_every", self.checkpoint_every, ">= 0 (0: only at the end)")
        if self.sigma_sampling not in SIGMA_SAMPLING:
            raise SettingError("sigma_sampling", self.sigma_sampling, f"one of {', '.join(SIGMA_SAMPLING)}")


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


SIGMA_SAMPLING = ("lognormal", "loguniform")


def sample_sigmas(n: int, config: TrainConfig, generator: torch.Generator, lo: float, hi: float) -> Tensor:
    """Training noise levels: log-normal (Karras et al. 2022: ln sigma ~ N(P_mean, P_std^2)), clamped to the
    model's range [lo, hi], or log-uniform on [lo, hi] (Song & Ermon 2019's geometric noise levels)."""
    if config.sigma_sampling == "loguniform":
        u = torch.rand(n, generator=generator)
        return (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp()
    log_sigma = config.p_mean + config.p_std * torch.randn(n, generator=generator)
    return log_sigma.exp().clamp(lo, hi)


def edm_loss(denoiser: NetworkDenoiser, x: Tensor, sigma: Tensor, target: Tensor,
             class_labels: Optional[Tensor] = None) -> Tensor:
    """Mean over the batch of lambda(sigma) * ||D(x, sigma[, c]) - target||^2 / d, with x = x0 + sigma n."""
    err = (denoiser(x, sigma, class_labels=class_labels) - target) ** 2
    weight = edm_weight(sigma, denoiser.schedule.sigma_data)
    return (weight * err.flatten(1).mean(1)).mean()


class Trainer:
    """Holds the model, its EMA copy, the optimiser and the RNG; `run` trains until config.steps."""

    def __init__(self, denoiser: NetworkDenoiser, data: Tensor, config: TrainConfig,
                 target_fn: Optional[TargetFn] = None, labels: Optional[Tensor] = None):
        config.validate()
        self.labels = labels.to(data.device) if labels is not None else None  # classes of a conditional model
        self.model = denoiser.train()
        self.ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
        self.data = data
        self.config = config
        self.target_fn = target_fn
        self.opt = torch.optim.Adam(self.model.net.parameters(), lr=config.lr, betas=(0.9, 0.99))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.last_loss = math.nan

    def train_step(self) -> float:
        """One optimiser step on a random batch; returns the loss."""
        cfg, device = self.config, self.data.device
        idx = torch.randint(0, self.data.shape[0], (cfg.batch_size,), generator=self.generator)
        x0 = self.data[idx.to(device)]
        sigma = sample_sigmas(cfg.batch_size, cfg, self.generator, self.model.sigma_min, self.model.sigma_max)
        noise = torch.randn(x0.shape, generator=self.generator).to(device)
        sigma = sigma.to(device=device, dtype=x0.dtype)
        x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
        target = x0 if self.target_fn is None else self.target_fn(idx, x0, x, sigma)
        labels = self.labels[idx.to(device)] if self.labels is not None else None
        loss = edm_loss(self.model, x, sigma, target.detach(), labels)
        if not torch.isfinite(loss):
            raise UserError(f"training diverged at step {self.step} (loss {loss.item()}); lower the learning rate")
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(cfg.warmup, 1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.net.parameters(), cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        for ema_p, p in zip(self.ema.net.parameters(), self.model.net.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.ema.net.buffers(), self.model.net.buffers()):
            ema_b.copy_(b)

    def state_bytes(self, settings: dict) -> bytes:
        """Training state as a weights-only torch file (tensors, numbers and dicts; no code)."""
        state = {"step": self.step, "model": self.model.net.state_dict(), "optimizer": self.opt.state_dict(),
                 "generator": self.generator.get_state(), "config": asdict(self.config), "settings": settings}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def load_state(self, path: Path, settings: dict) -> None:
        """Restore a checkpointed training state (loaded with weights_only=True); UserError when it was started
        with other settings (only --steps may change between the interrupted run and its resume)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any corrupt state is a user-facing error
            raise UserError(f"cannot resume from {path}: {first_lines(exc, with_type=True)}") from None
        if not isinstance(state, dict):
            raise UserError(f"cannot resume from {path}: it holds no training state")
        check_same_settings(state, asdict(self.config), settings, path)
        try:
            self.model.net.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            self.step = int(state["step"])
        except Exception as exc:  # noqa: BLE001 - any corrupt state is a user-facing error
            raise UserError(f"cannot resume from {path}: {first_lines(exc, with_type=True)}") from None

    def save(self, out: Path, history: list[dict], keep_state: bool, settings: dict) -> None:
        """Write the EMA model as a native checkpoint (atomically), plus the training state if asked."""
        extra = {STATE_NAME: self.state_bytes(settings)} if keep_state else {}
        save_native(self.ema, out, history=history, extra_files=extra)


RESUMABLE_CHANGES = ("steps", "checkpoint_every")  # settings a resumed run may change


def check_same_settings(state: dict, config: dict, settings: dict, path: Path) -> None:
    """UserError naming the settings an interrupted run was started with that differ from the resumed run's."""
    saved = {**(state.get("config") or {}), **(state.get("settings") or {})}
    given = {**config, **settings}
    changed = sorted(k for k in set(saved) | set(given)
                     if k not in RESUMABLE_CHANGES and k != "extra" and saved.get(k) != given.get(k))
    if changed:
        what = ", ".join(f"{k} {saved.get(k)!r} -> {given.get(k)!r}" for k in changed[:3])
        raise UserError(f"cannot resume from {path}: it was started with other settings ({what}); use the same "
                        "settings, or start afresh without --resume")


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM only record themselves (the list gets the signal number), so a
    training step is never cut in half; the loop checks the list between steps. A second signal of the
    same kind interrupts at once. Outside the main thread, nothing is deferred."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum, frame):
        if signum in received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fit(denoiser: NetworkDenoiser, data: Tensor, config: TrainConfig, out: Path, history: list[dict],
        target_fn: Optional[TargetFn] = None, resume: bool = False,
        progress: Optional[Callable[..., None]] = None, settings: Optional[dict] = None,
        labels: Optional[Tensor] = None) -> NetworkDenoiser:
    """Train and write `out` (native checkpoint, EMA weights); resumable from a checkpoint left in `out`.

    `settings` (the caller's run settings, e.g. data fingerprint and target) are saved with the training state;
    a resume with other settings is refused. Ctrl-C or SIGTERM stops after the current step: the state as of
    that completed step is saved to `out` and KeyboardInterrupt is raised, so a resumed run continues exactly.
    `labels` (the images' classes) train a class-conditional model on D(x, sigma, c).
    """
    out = Path(out)
    settings = {"data": data_fingerprint(data), **(settings or {})}
    if labels is not None:
        settings["labels"] = hashlib.sha256(labels.cpu().long().numpy().tobytes()).hexdigest()
    check_output_folder(out)  # before training, not after the first checkpoint interval
    trainer = Trainer(denoiser, data, config, target_fn, labels)
    if resume:
        _resume(trainer, out, settings)
    try:
        with deferred_interrupts() as received:
            while trainer.step < config.steps:
                trainer.last_loss = trainer.train_step()
                if progress is not None:
                    progress(trainer.step, f"loss {trainer.last_loss:.4f}")
                if received:
                    raise KeyboardInterrupt
                if config.checkpoint_every and trainer.step % config.checkpoint_every == 0 \
                        and trainer.step < config.steps:
                    trainer.save(out, history, keep_state=True, settings=settings)
    except KeyboardInterrupt:
        trainer.save(out, history, keep_state=True, settings=settings)
        raise
    trainer.save(out, history, keep_state=False, settings=settings)
    return trainer.ema


def _resume(trainer: Trainer, out: Path, settings: dict) -> None:
    """Load EMA weights and training state from `out` (written by an earlier, interrupted run)."""
    state_path = out / STATE_NAME
    if not (is_native(out) and state_path.is_file()):
        raise UserError(f"nothing to resume in {out}: no checkpoint with {STATE_NAME} (it is removed when a run finishes)")
    ema = load_native(out, device=trainer.data.device)
    trainer.ema.net.load_state_dict(ema.net.state_dict())
    trainer.load_state(state_path, settings)
