"""Per-training-image attribution and the DiffMemorize-compatible ratio, against numpy brute force."""

import numpy as np
import pytest
import torch

from digits import digits_dataset
from memaudit.data import array_to_images
from memaudit.duplicates import find_duplicates
from memaudit.metrics.attribution import METRIC as ATTR
from memaudit.metrics.base import RunData, ScanContext
from memaudit.metrics.diffmemorize import METRIC as DM
from memaudit.metrics.nn_ratio import training_index
from memaudit.scan import ScanConfig
from memaudit.validation import Check


def context(train):
    index = training_index(train)
    config = ScanConfig()
    return ScanContext(model=None, empirical=None, train=train, config=config, features=None, index=index,
                       duplicates=find_duplicates(index, config.dup_tol), runs={}, sigmas=[],
                       generator=torch.Generator(), task=lambda d, n: (lambda done, info="": None))


@pytest.fixture(scope="module")
def planted():
    digits = array_to_images(digits_dataset(1400)).float()
    train, fresh = digits[:400], digits[1000:1010]
    g = torch.Generator().manual_seed(0)
    picks = [7, 7, 12, 7, 3, 12]
    copies = train[picks] + 0.02 * torch.randn(len(picks), 1, 8, 8, generator=g)
    return train, torch.cat([copies, fresh]), picks


def test_attribution_groups_copies_by_training_image_most_copied_first(planted):
    train, samples, picks = planted
    ctx = context(train)
    section = ATTR.compute(ctx, RunData("x", samples, []))
    ATTR.validate(section, Check(), "attribution")
    # brute force: nearest training image and the d1/d2 rule
    d = np.sqrt(((samples.reshape(len(samples), -1).double().numpy()[:, None]
                  - train.reshape(len(train), -1).double().numpy()[None]) ** 2).sum(-1))
    s = np.sort(d, 1)
    ratio, nearest = s[:, 0] / s[:, 1], d.argmin(1)
    copied = np.flatnonzero(ratio < 1 / 3)
    counts = {}
    for i in copied:
        counts.setdefault(int(nearest[i]), []).append(int(i))
    want = sorted(counts.items(), key=lambda kv: (-len(kv[1]), min(ratio[kv[1]]), kv[0]))
    got = [(e["train_index"], sorted(e["samples"])) for e in section["images"]]
    assert got == [(k, sorted(v)) for k, v in want]
    assert [e["train_index"] for e in section["images"]][:3] == [7, 12, 3]  # the planted counts 3, 2, 1
    assert [e["count"] for e in section["images"]][:3] == [3, 2, 1]
    assert section["distinct_reproduced"] == len(want)
    assert ATTR.summarize({"x": section}) == {"distinct_reproduced": len(want), "max_copies_per_image": 3}
    first = section["images"][0]
    assert first["samples"][0] == min(counts[7], key=lambda i: ratio[i])  # closest copy first


def test_diffmemorize_ratio_as_their_script_computes_it(planted):
    train, samples, picks = planted
    ctx = context(train)
    section = DM.compute(ctx, RunData("x", samples, []))
    DM.validate(section, Check(), "diffmemorize")

    def u8(x):  # their PNGs: uint8 pixels, as floats
        return np.clip(np.round((x.double().numpy() + 1) * 127.5), 0, 255).reshape(len(x), -1)

    d = np.sqrt(((u8(samples)[:, None] - u8(train)[None]) ** 2).sum(-1)) / np.sqrt(64)
    s = np.sort(d, 1)
    np.testing.assert_allclose(section["ratios"], s[:, 0] / s[:, 1], rtol=1e-5)
    assert section["memorized_fraction"] == pytest.approx(np.mean(s[:, 0] / s[:, 1] < 1 / 3))
    assert section["mean_nn_distance"] == pytest.approx(s[:, 0].mean(), rel=1e-5)
