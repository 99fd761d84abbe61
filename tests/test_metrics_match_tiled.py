"""Planted copies the plain NN ratio misses: a copy of a duplicated training image (duplicate-aware ratio), a
mirrored copy (`match` with --match-flips) and a half-image copy (`tiled_l2`); each against a numpy brute force."""

import numpy as np
import pytest
import torch

from digits import digits_dataset
from memaudit.data import array_to_images
from memaudit.duplicates import find_duplicates
from memaudit.metrics.base import RunData, ScanContext
from memaudit.metrics.match import METRIC as MATCH
from memaudit.metrics.nn_ratio import METRIC as NN
from memaudit.metrics.nn_ratio import training_index
from memaudit.metrics.tiled_l2 import METRIC as TILED
from memaudit.scan import ScanConfig
from memaudit.transforms import shift, transforms
from memaudit.validation import Check

T = 1 / 3


def flat(x):
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def dists(a, b):
    return np.sqrt(((flat(a)[:, None] - flat(b)[None]) ** 2).sum(-1))


def ratio_from(d, labels):
    """Brute-force duplicate-aware ratio from a full (N, M) distance matrix."""
    out = []
    for row in d:
        order = np.argsort(row, kind="stable")
        first = order[0]
        other = [j for j in order if labels[j] != labels[first]]
        d2 = row[other[0]]
        out.append(0.0 if d2 == 0 else row[first] / d2)
    return np.array(out)


@pytest.fixture(scope="module")
def planted():
    digits = array_to_images(digits_dataset(1600)).float()
    train = digits[:300].clone()
    rng = np.random.default_rng(0)
    train = torch.cat([train, (train[5:6] + torch.from_numpy(rng.uniform(-0.06, 0.06, (1, 1, 8, 8))).float())])
    plain = np.arange(len(train))
    held = digits[1000:1600]
    # a mirrored copy: the first training digit whose mirror image the plain ratio does not flag
    mirrored = next(i for i in range(300) if ratio_from(dists(train[i:i + 1].flip(-1), train), plain)[0] > 0.5)
    # a half copy: left half of training digit a, right half of a held-out digit, not flagged as a whole
    for a in range(10, 300):
        half = torch.cat([train[a:a + 1, ..., :4], held[a:a + 1, ..., 4:]], -1)
        if ratio_from(dists(half, train), plain)[0] > 0.5:
            break
    samples = torch.cat([(train[5:6] + train[300:301]) / 2, train[mirrored:mirrored + 1].flip(-1), half,
                         held[-5:]])
    return train, samples, {"duplicate": 0, "mirrored": 1, "half": 2, "fresh": slice(3, 8)}


def context(train, flips=False, shifts=0):
    index = training_index(train)
    config = ScanConfig(match_flips=flips, match_shifts=shifts)
    return ScanContext(model=None, empirical=None, train=train, config=config, features=None, index=index,
                       duplicates=find_duplicates(index, config.dup_tol), runs={}, sigmas=[],
                       generator=torch.Generator(), task=lambda d, n: (lambda done, info="": None))


def test_duplicate_aware_ratio_catches_a_copy_of_a_duplicated_image(planted):
    train, samples, at = planted
    ctx = context(train)
    assert ctx.duplicates.clusters() == [[5, 300]]
    section = NN.compute(ctx, RunData("planted", samples, []))
    want = ratio_from(dists(samples, train), ctx.duplicates.labels)
    got = np.array([s["ratio"] for s in section["samples"]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    plain = ratio_from(dists(samples, train), np.arange(len(train)))
    assert plain[at["duplicate"]] > 0.9 and got[at["duplicate"]] < 0.1  # missed plainly, caught dup-aware
    assert section["memorized_fraction_plain"] < section["memorized_fraction"]


def test_a_mirrored_copy_is_caught_only_with_match_flips(planted):
    train, samples, at = planted
    run = RunData("planted", samples, [])
    off = MATCH.compute(context(train), run)
    assert off["enabled"] is False and MATCH.summarize({"planted": off})["match_memorized_fraction"] is None
    ctx = context(train, flips=True)
    section = MATCH.compute(ctx, run)
    MATCH.validate(section, Check(), "match")
    d = np.minimum(dists(samples, train), dists(samples.flip(-1), train))  # min over {identity, flip}
    want = ratio_from(d, ctx.duplicates.labels)
    got = np.array([s["ratio"] for s in section["samples"]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert got[at["mirrored"]] < 1e-6 and section["samples"][at["mirrored"]]["transform"] == "flip"
    plain = NN.compute(ctx, run)["samples"][at["mirrored"]]["ratio"]
    assert plain > 0.5  # the unflipped ratio misses it
    assert all(r > T for r in got[at["fresh"]])


def test_shifts_search_every_offset_against_numpy(planted):
    train, samples, _ = planted
    moved = shift(train[20:21], 1, -1)
    run = RunData("planted", torch.cat([moved, samples[3:]]), [])
    ctx = context(train, shifts=1)
    section = MATCH.compute(ctx, run)
    assert len(section["transforms"]) == 9 == len(transforms(False, 1))
    d = np.min([dists(shift(run.samples, dy, dx), train) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 0)
    np.testing.assert_allclose([s["ratio"] for s in section["samples"]], ratio_from(d, ctx.duplicates.labels),
                               rtol=1e-4, atol=1e-6)


def tile_reference(samples, train, labels):
    """min over the 2 x 2 tiles of the per-tile duplicate-aware ratio (1 where d2 = 0), by brute force."""
    out = np.full(len(samples), np.inf)
    for y in (slice(0, 4), slice(4, 8)):
        for x in (slice(0, 4), slice(4, 8)):
            d = dists(samples[..., y, x], train[..., y, x])
            for n, row in enumerate(d):
                order = np.argsort(row, kind="stable")
                d2 = next(row[j] for j in order if labels[j] != labels[order[0]])
                out[n] = min(out[n], 1.0 if d2 == 0 else row[order[0]] / d2)
    return out


def test_a_half_image_copy_is_caught_by_the_tiled_ratio(planted):
    train, samples, at = planted
    ctx = context(train)
    run = RunData("planted", samples, [])
    section = TILED.compute(ctx, run)
    TILED.validate(section, Check(), "tiled_l2")
    assert section["grid"] == 2
    got = np.array([s["tile_ratio"] for s in section["samples"]])
    np.testing.assert_allclose(got, tile_reference(samples, train, ctx.duplicates.labels), rtol=1e-4, atol=1e-6)
    assert got[at["half"]] < 1e-6 and section["samples"][at["half"]]["tile"] in (0, 2)  # a left tile
    assert NN.compute(ctx, run)["samples"][at["half"]]["ratio"] > 0.5  # the whole-image ratio misses it
    # Carlini's tiled L2 (max over tiles) to the nearest training image, by brute force
    nearest = dists(samples, train).argmin(1)
    carlini = [max(np.sqrt(((flat(samples[n:n + 1, ..., y, x]) - flat(train[nearest[n]:nearest[n] + 1, ..., y, x]))
                            ** 2).mean()) for y in (slice(0, 4), slice(4, 8)) for x in (slice(0, 4), slice(4, 8)))
               for n in range(len(samples))]
    np.testing.assert_allclose([s["carlini_tiled_l2"] for s in section["samples"]], carlini, rtol=1e-4, atol=1e-6)
    summary = TILED.summarize({"planted": section})
    assert summary["tiled_memorized_fraction"] == section["memorized_fraction"]
    assert summary["carlini_tiled_l2_min"] == pytest.approx(min(carlini), rel=1e-4)


@pytest.mark.parametrize("value", ["-1", "9"])
def test_bad_match_shifts_is_a_one_line_error(capsys, tmp_path, value):
    from pathlib import Path

    from cli_helpers import run_cli

    root = Path(__file__).resolve().parents[1]
    code, _, err = run_cli(capsys, "scan", root / "examples/models/digits32", root / "examples/digits/digits32.npz",
                           "--match-shifts", value, "--quiet")
    assert code == 2 and err.strip().count("\n") == 0 and "--match-shifts" in err, err
