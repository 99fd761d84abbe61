"""The scan's work folder: finished sampling batches kept on disk so an interrupted scan can resume exactly.

Layout: <root>/scan-<tag>/ (mode 0700), tag = sha256 of everything that shapes the samples.  Each batch is
written once, as its own weights-only torch file; a small manifest per sampler lists the batch files with
their sizes and sha256 digests and is replaced atomically after each batch, so saving is linear in the
number of batches.  Nothing saved is trusted on resume: the manifest must match the tag, every file its
digest, the sizes must add up to at most the samples asked for, shapes and values must be those of finite
images; then `spot_check` re-draws a few saved samples from their recorded generator state.  A folder
that fails any check is not used (the scan samples afresh and says why).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from memaudit.atomic import atomic_path, write_text_atomic
from memaudit.sampling import Batch, Trajectory

MANIFEST_VERSION = 1


class Inconsistent(Exception):
    """A saved batch or manifest that must not be resumed (the message says what is wrong)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _trajectory_payload(t: Optional[Trajectory]) -> Optional[dict]:
    if t is None:
        return None
    # the per-step tensors as lists: stacking them would copy the trajectory (up to 256 MiB) once more
    return {"sigmas": torch.tensor(t.sigmas, dtype=torch.float64), "xs": list(t.xs),
            "denoised": list(t.denoised), "rows": -1 if t.rows is None else int(t.rows)}


def _trajectory(payload: Optional[dict]) -> Optional[Trajectory]:
    if payload is None:
        return None
    rows = int(payload["rows"])
    return Trajectory(payload["sigmas"].tolist(), list(payload["xs"]), list(payload["denoised"]),
                      None if rows < 0 else rows)


class _HashingWriter:
    """A file that torch.save writes to: each write goes to disk and into a sha256, and an OSError (disk full)
    is kept, since torch.save reports it as a RuntimeError."""

    def __init__(self, fh):
        self.fh, self.sha, self.error = fh, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            written = self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha.update(data)
        return written

    def flush(self) -> None:
        self.fh.flush()


def save_streamed(payload: dict, fh) -> str:
    """torch.save(payload) straight into the open file `fh` (no in-memory copy of the batch: up to
    TRAJECTORY_BYTES of trajectories); the sha256 of what was written. A failed write raises its OSError."""
    writer = _HashingWriter(fh)
    try:
        torch.save(payload, writer)
    except Exception:
        if writer.error is not None:
            raise writer.error from None
        raise
    return writer.sha.hexdigest()


class SampleStore:
    """Per-sampler batches in a work folder, tagged with a fingerprint of everything that shapes them."""

    def __init__(self, root: Optional[Path], fingerprint: dict):
        self.tag = _sha256(json.dumps(fingerprint, sort_keys=True).encode())[:16]
        self.folder = Path(root) / f"scan-{self.tag}" if root is not None else None
        self._entries: dict[str, list[dict]] = {}  # per sampler: the manifest entries written or resumed

    def manifest_path(self, sampler: str) -> Path:
        return self.folder / f"{_safe(sampler)}.json"

    def _make_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # samples of a private model stay private, whatever the umask

    def save(self, sampler: str, batches: list[Batch]) -> None:
        """Write the newest of `batches` once and replace the sampler's manifest (all of them listed)."""
        if self.folder is None:
            return
        self._make_folder()
        index = len(batches) - 1
        batch = batches[-1]
        name = f"{_safe(sampler)}-{index:06d}.pt"
        payload = {"samples": batch.samples, "generator_before": batch.generator_before,
                   "generator_after": batch.generator_after, "trajectory": _trajectory_payload(batch.trajectory)}
        with atomic_path(self.folder / name) as tmp:
            with open(tmp, "wb") as fh:
                digest = save_streamed(payload, fh)
        entries = self._entries.get(sampler, [])[:index] + [{"file": name, "size": int(batch.samples.shape[0]),
                                                     "sha256": digest}]
        manifest = {"version": MANIFEST_VERSION, "tag": self.tag, "sampler": sampler, "batches": entries}
        write_text_atomic(self.manifest_path(sampler), json.dumps(manifest, indent=1) + "\n")
        self._entries[sampler] = entries

    def load(self, sampler: str, num_samples: int, image_shape: tuple) -> tuple[list[Batch], Optional[str]]:
        """(saved batches, None), or ([], why they cannot be used); ([], None) when nothing was saved."""
        if self.folder is None or not self.manifest_path(sampler).is_file():
            return [], None
        try:
            entries, batches = self._read(sampler, num_samples, tuple(image_shape))
        except Inconsistent as exc:
            return [], str(exc)
        self._entries[sampler] = entries
        return batches, None

    def _read_manifest(self, sampler: str) -> dict:
        try:
            manifest = json.loads(self.manifest_path(sampler).read_text())
        except (OSError, ValueError) as exc:
            raise Inconsistent(f"its manifest is unreadable ({type(exc).__name__})") from None
        if not isinstance(manifest, dict) or manifest.get("tag") != self.tag or manifest.get("sampler") != sampler:
            raise Inconsistent("its manifest belongs to other settings")
        if not isinstance(manifest.get("batches"), list):
            raise Inconsistent("its manifest lists no batches")
        return manifest

    def _read(self, sampler: str, num_samples: int, image_shape: tuple) -> tuple[list[dict], list[Batch]]:
        entries = self._read_manifest(sampler)["batches"]
        batches, done = [], 0
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("file") != f"{_safe(sampler)}-{i:06d}.pt":
                raise Inconsistent(f"batch {i} of its manifest is malformed")
            batch = self._read_batch(entry, image_shape)
            done += batch.samples.shape[0]
            batches.append(batch)
        if done > num_samples:
            raise Inconsistent(f"it holds {done} samples, more than the {num_samples} asked for")
        return entries, batches

    def _read_batch(self, entry: dict, image_shape: tuple) -> Batch:
        path = self.folder / entry["file"]
        try:
            data = path.read_bytes()
        except OSError:
            raise Inconsistent(f"{entry['file']} is missing") from None
        if _sha256(data) != entry.get("sha256"):
            raise Inconsistent(f"{entry['file']} does not match its recorded digest")
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            samples = payload["samples"]
            batch = Batch(samples, payload["generator_before"], payload["generator_after"],
                          _trajectory(payload.get("trajectory")))
        except Exception as exc:  # noqa: BLE001 - any unreadable batch is not resumed
            raise Inconsistent(f"{entry['file']} is unreadable ({type(exc).__name__})") from None
        if not isinstance(samples, Tensor) or tuple(samples.shape[1:]) != image_shape \
                or samples.shape[0] != entry.get("size") or samples.shape[0] < 1:
            raise Inconsistent(f"{entry['file']} does not hold {entry.get('size')} images of shape {image_shape}")
        if not samples.is_floating_point() or not torch.isfinite(samples).all():
            raise Inconsistent(f"{entry['file']} holds non-finite values")
        for state in (batch.generator_before, batch.generator_after):
            if not isinstance(state, Tensor) or state.dtype != torch.uint8:
                raise Inconsistent(f"{entry['file']} lacks its generator state")
        return batch


def _safe(name: str) -> str:
    """A sampler name as a file-name part."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
