"""NN ratio metric vs numpy brute force on real digits, duplicates and noise."""

import numpy as np
import pytest
import torch

from digits import digits_dataset
from memaudit.data import array_to_images
from memaudit.errors import UserError
from memaudit.features import FeatureSpace, feature_space
from memaudit.metrics.nn_ratio import nn_ratios, section


def memorized_fraction(ratio, threshold=1 / 3):
    r = torch.as_tensor(ratio)
    return section(r, r, torch.ones_like(r), torch.zeros(len(r), dtype=torch.long), threshold)["memorized_fraction"]


def numpy_ratios(samples: np.ndarray, train: np.ndarray):
    s = samples.reshape(len(samples), -1).astype(np.float64)
    t = train.reshape(len(train), -1).astype(np.float64)
    d = np.sqrt(((s[:, None] - t[None]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")
    d1, d2 = d[np.arange(len(s)), order[:, 0]], d[np.arange(len(s)), order[:, 1]]
    ratio = np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1), 0.0)
    return ratio, d1, d2, order[:, 0]


@pytest.fixture(scope="module")
def digits():
    return array_to_images(digits_dataset(300))


def test_duplicates_memorized_noise_not(digits):
    train = digits[:200]
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(20, *train.shape[1:], generator=g) * 2 - 1
    held_out = digits[200:230]
    samples = torch.cat([train[[5, 17, 42]], noise, held_out])
    result = nn_ratios(samples, train, batch_size=7)
    ratio, d1, d2, nearest = numpy_ratios(samples.numpy(), train.numpy())
    np.testing.assert_allclose(result.ratio.numpy(), ratio, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.d1.numpy(), d1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.d2.numpy(), d2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.nearest.numpy(), nearest)
    assert result.ratio[:3].tolist() == [0.0, 0.0, 0.0]
    assert result.d1[:3].tolist() == [0.0, 0.0, 0.0]
    assert (result.ratio[3:23] > 0.8).all()  # noise is about equally far from everything
    mem = memorized_fraction(result.ratio)
    assert mem == pytest.approx(float((ratio < 1 / 3).mean()))
    assert 3 / len(samples) <= mem < 0.5


def test_duplicate_training_images_give_ratio_zero():
    train = torch.tensor([[1.0, 2.0], [1.0, 2.0], [5.0, 5.0]]).reshape(3, 1, 1, 2)
    result = nn_ratios(train[:1], train)
    assert result.d2.item() == 0.0 and result.ratio.item() == 0.0
    assert memorized_fraction(result.ratio) == 1.0


def test_feature_space(digits):
    train, samples = digits[:100], digits[100:130]
    proj = torch.randn(64, 5, generator=torch.Generator().manual_seed(3))
    feats = FeatureSpace("projection", lambda x: x.reshape(x.shape[0], -1) @ proj)
    result = nn_ratios(samples, train, features=feats, batch_size=16)
    ratio, _, _, nearest = numpy_ratios(feats(samples).numpy(), feats(train).numpy())
    np.testing.assert_allclose(result.ratio.numpy(), ratio, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.nearest.numpy(), nearest)


def test_needs_two_training_images():
    with pytest.raises(UserError):
        nn_ratios(torch.zeros(2, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_memorized_fraction_threshold():
    ratio = torch.tensor([0.0, 0.2, 1 / 3, 0.5, 0.9])
    assert memorized_fraction(ratio) == pytest.approx(2 / 5)
    assert memorized_fraction(ratio, threshold=0.6) == pytest.approx(4 / 5)
    assert memorized_fraction(torch.tensor([0.5, float("nan")])) == pytest.approx(1 / 2)  # non-finite: memorized


def test_histogram_clips_into_last_bin():
    ratio = torch.tensor([0.0, 0.05, 0.1, 0.49, 0.5, 0.99, 1.0, 1.7, 3.0])
    hist = section(ratio, ratio, torch.ones(9), torch.zeros(9, dtype=torch.long), bins=4)["histogram"]
    np.testing.assert_allclose(hist["bin_edges"], [0, 0.25, 0.5, 0.75, 1.0])
    ref, _ = np.histogram(np.minimum(ratio.numpy(), 1.0), bins=4, range=(0, 1))
    assert hist["counts"] == ref.tolist() == [3, 1, 1, 4]


def test_worst_pairs_sorted_with_index_ties():
    r = torch.tensor([0.5, 0.1, 0.1, 0.0, 0.7])
    pick = lambda n: section(r, r, torch.ones(5), torch.zeros(5, dtype=torch.long), worst=n)["worst"]  # noqa: E731
    assert pick(3) == [3, 1, 2]
    assert pick(10) == [3, 1, 2, 0, 4]
    assert pick(0) == []


class Flatten4(torch.nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)[:, :4] * 2


class NotFlat(torch.nn.Module):
    def forward(self, x):
        return x * 2


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def test_load_feature_extractor(tmp_path, digits):
    good = tmp_path / "good.pt"
    torch.jit.script(Flatten4()).save(str(good))
    feats = feature_space(f"torchscript:{good}", "cpu", (1, 8, 8))
    x = digits[:6]
    assert torch.allclose(feats(x), x.reshape(6, -1)[:, :4] * 2)
    result = nn_ratios(digits[50:60], digits[:50], features=feats)
    ratio, *_ = numpy_ratios((digits[50:60].reshape(10, -1)[:, :4] * 2).numpy(),
                             (digits[:50].reshape(50, -1)[:, :4] * 2).numpy())
    np.testing.assert_allclose(result.ratio.numpy(), ratio, rtol=1e-5, atol=1e-6)


def test_load_feature_extractor_errors(tmp_path):
    bad_shape = tmp_path / "notflat.pt"
    torch.jit.script(NotFlat()).save(str(bad_shape))
    feats = feature_space(str(bad_shape), "cpu")  # a bare path is a TorchScript file
    with pytest.raises(UserError, match=r"\(B, F\)"):
        feats(torch.zeros(2, 1, 4, 4))
    with pytest.raises(UserError):
        feature_space(f"torchscript:{bad_shape}", "cpu", (1, 4, 4))
    pickle = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, str(pickle))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    for path in (pickle, garbage, tmp_path / "missing.pt"):
        with pytest.raises(UserError, match="TorchScript"):
            feature_space(f"torchscript:{path}", "cpu")
