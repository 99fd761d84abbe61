"""Sampling a class-conditional model in a scan: the samples of each run split over the classes of the data.

Class c of the K classes the training labels hold draws n_c = floor(N / K) samples (+1 for the first N mod K
classes) from ClassBound(model, c), seeded with seed + c, each class resumable on its own; the run's samples
are the classes' samples in class order, with their labels. An unconditional model ignores the data's labels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from memaudit.conditioning import ClassBound, num_classes
from memaudit.errors import UserError

# Scan-level metrics that query the model on noisy training points, comparing it with the unconditional
# empirical denoiser: not defined for a class-conditional model here, so they are skipped (with a note).
UNCONDITIONAL_ONLY = ("score_cosine", "jacobian")


@dataclass(frozen=True)
class ClassPlan:
    """How many samples each class draws, in class order."""

    counts: dict[int, int]

    def seed(self, seed: int, c: int) -> int:
        return (seed + c) % 2**63


def class_plan(model: Any, labels: Optional[Tensor], num_samples: int, labels_problem: str) -> Optional[ClassPlan]:
    """The per-class split for a class-conditional model (None for an unconditional one); UserError when the
    data has no labels, labels outside the model's classes, or fewer samples than classes."""
    n = num_classes(model)
    if n is None:
        return None
    if labels is None:
        raise UserError(f"the model is class-conditional ({n} classes) but {labels_problem}: put each class's "
                        "images in its own subfolder of DATA, or save a 'labels' array beside 'images' in the .npz")
    classes = sorted(int(c) for c in labels.unique().tolist())
    if classes[-1] >= n:
        raise UserError(f"DATA holds class label {classes[-1]} but the model has {n} classes (0..{n - 1}): "
                        "the labels must be the model's class ids")
    if num_samples < len(classes):
        raise UserError(f"--samples {num_samples} is below the {len(classes)} classes of DATA: each class needs "
                        f"at least one sample (pass --samples {len(classes)} or more)")
    base, extra = divmod(num_samples, len(classes))
    return ClassPlan({c: base + (1 if i < extra else 0) for i, c in enumerate(classes)})


def without_unconditional_metrics(config: Any, note: Callable[[str], None]) -> Any:
    """The scan config with UNCONDITIONAL_ONLY metrics skipped (a note says so)."""
    todo = [m for m in UNCONDITIONAL_ONLY if m not in config.skip]
    if todo:
        note(f"note: {', '.join(todo)} compare the model with the unconditional empirical denoiser on noisy "
             "training points; skipped for a class-conditional model")
    return dataclasses.replace(config, skip=tuple(config.skip) + tuple(todo))


class ClassStore:
    """A sample store whose entries of sampler S are kept as 'S.class-C' (each class resumes on its own)."""

    def __init__(self, store: Any, c: int):
        self.store, self.suffix = store, f".class-{c}"
        self.folder = store.folder

    def load(self, sampler: str, *args):
        return self.store.load(sampler + self.suffix, *args)

    def save(self, sampler: str, batches) -> None:
        self.store.save(sampler + self.suffix, batches)


def sample_classes(sample_run: Callable, model: Any, sampler: str, config: Any, store: Any, plan: ClassPlan,
                   record: int, **kwargs) -> Any:
    """One sampler run of a conditional model: sample_run per class (ClassBound model, n_c samples, its seed),
    joined in class order; the result carries `labels`, the class of each sample."""
    parts, labels = [], []
    per_class_record = -(-record // len(plan.counts)) if record else 0
    for c, count in plan.counts.items():
        cfg = dataclasses.replace(config, num_samples=count, seed=plan.seed(config.seed, c))
        parts.append(sample_run(ClassBound(model, c), sampler, cfg, ClassStore(store, c), record=per_class_record,
                                **kwargs))
        labels.append(torch.full((count,), c, dtype=torch.long))
    first = parts[0]
    return dataclasses.replace(first, samples=torch.cat([p.samples for p in parts]),
                               trajectories=[t for p in parts for t in p.trajectories],
                               resumed=sum(p.resumed for p in parts), checked=sum(p.checked for p in parts),
                               labels=torch.cat(labels))
