"""A latent model's NN ratio in decoded pixel space: d1/d2 of each decoded sample G(z / s + b) to its nearest and
second-nearest distinct pixel training image, memorized if < threshold (the rule of memaudit.metrics.nn_ratio).

For a latent model every other metric is in latent space (its samples z against the encoded training set);
this one says whether the images it makes copy training images. Gate it with `decoded_memorized_fraction_upper`.
For a pixel-space model the section says it was not computed and its gates fail (nn_ratio is already in pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional

from torch import Tensor

from memaudit.duplicates import Duplicates
from memaudit.metrics import nn_ratio
from memaudit.metrics.base import RUN, Histogram, Metric, Note, PairGrid, RunData, ScanContext
from memaudit.neighbors import NeighborIndex
from memaudit.numbers import fmt

SPACE = "decoded_space"  # the ScanContext.cache key a latent scan puts its DecodedSpace under
PREFIX = "decoded_"
NOT_LATENT = "not a latent model: nn_ratio is measured on its samples, which are pixels"


@dataclass
class DecodedSpace:
    """The decoder, the pixel training images with their neighbour index and near-duplicate clusters, and each
    run's decoded samples (decoded once)."""

    decode: Callable[[Tensor], Tensor]
    train: Tensor
    index: NeighborIndex
    duplicates: Duplicates
    images: dict = field(default_factory=dict)

    def decoded(self, sampler: str, samples: Tensor) -> Tensor:
        if sampler not in self.images:
            self.images[sampler] = self.decode(samples).cpu()
        return self.images[sampler]


class Decoded(Metric):
    name = "decoded"
    scope = RUN
    title = "Decoded samples of a latent model: NN ratio in pixel space"
    summary_keys = {PREFIX + key: f"as `{key}`, of the runs' `decoded` sections (latent models: the NN ratio of "
                                  "the decoded samples to the pixel training images)"
                    for key in nn_ratio.METRIC.summary_keys}
    run_keys = {PREFIX + "memorized_fraction_{sampler}": "that run's `decoded.memorized_fraction`"}

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        space = ctx.cache.get(SPACE)
        if space is None:
            return {"computed": False, "reason": NOT_LATENT}
        images = space.decoded(run.sampler, run.samples)
        nn = nn_ratio.nn_ratios(images, space.train, index=space.index, duplicates=space.duplicates)
        return {"computed": True, "space": "decoded pixels",
                **nn_ratio.section(nn.ratio, nn.d1, nn.d2, nn.nearest, threshold=ctx.config.threshold,
                                   ratio_plain=nn.ratio_plain)}

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        computed = {name: (s if (s or {}).get("computed") else {}) for name, s in sections.items()}
        values = nn_ratio.METRIC.summarize(computed)
        return {PREFIX + key: value for key, value in values.items()}

    def validate(self, section, c, where: str) -> None:
        c.dict(section, where, ("computed",))
        c.bool(section["computed"], f"{where}.computed")
        if section["computed"]:
            nn_ratio.METRIC.validate(section, c, where)

    def lines(self, report: Mapping) -> list[str]:
        parts = [f"{name} {fmt(s.get('memorized_fraction'))} [{fmt(s.get('memorized_fraction_lower'))}, "
                 f"{fmt(s.get('memorized_fraction_upper'))}]"
                 for name, s in sorted(self.sections(report).items()) if s.get("computed")]
        return [f"decoded pixel space (latent model): memorized fraction {', '.join(parts)} (95 % interval); the "
                "other metrics are in latent space"] if parts else []

    def evidence(self, run: str, section: Mapping) -> list:
        if not section.get("computed"):
            return []
        out = []
        for item in nn_ratio.METRIC.evidence(run, section):
            if isinstance(item, PairGrid):
                item = replace(item, title="Decoded worst pairs: decoded sample | nearest training image",
                               file="decoded")
            elif isinstance(item, Histogram):
                item = replace(item, title=f"Decoded NN ratio histogram ({run})")
            elif isinstance(item, Note):
                item = Note("decoded pixel space: " + item.text)
            out.append(item)
        return out


METRIC = Decoded()
