"""Fine-tuning: the smoothing target is the kNN softmax at temperature T, unconditioning really fixes the network's
noise input, checkpoints record the action, and an interrupted fine-tune resumes to the same weights."""

import math

import numpy as np
import pytest
import torch

from memaudit import finetune as finetune_module
from memaudit.errors import UserError
from memaudit.finetune import FinetuneConfig, finetune, smoothing_target, trainable
from memaudit.models.load import load_model
from memaudit.models.native import load_native, make_unet_denoiser, save_native
from memaudit.training import STATE_NAME, TrainConfig


@pytest.fixture
def tiny(tmp_path):
    """A tiny native UNet checkpoint (with a training history), loaded back as `load_model` does."""
    torch.manual_seed(0)
    save_native(make_unet_denoiser((1, 8, 8), base_channels=8), tmp_path / "orig", history=[{"action": "train"}])
    return lambda: load_model(str(tmp_path / "orig"))


def numpy_knn_softmax(x, train, sigma, temperature, k, h=0.0):
    """sum over the k nearest x_i of softmax(-||x - x_i||^2 / (2 max(sigma^2 T, h^2))) x_i, in float64 numpy."""
    x, pts = x.reshape(len(x), -1).double().numpy(), train.reshape(len(train), -1).double().numpy()
    out = []
    for row, s in zip(x, sigma.double().numpy()):
        d2 = ((row[None] - pts) ** 2).sum(1)
        idx = np.argsort(d2)[:k]
        logits = -d2[idx] / (2 * max(s**2 * temperature, h**2))
        w = np.exp(logits - logits.max())
        out.append((w / w.sum()) @ pts[idx])
    return np.stack(out)


@pytest.mark.parametrize("temperature,k", [(2.0, 5), (1.0, 32), (4.0, 1)])
def test_smoothing_target_is_the_knn_softmax_at_temperature_t(digits32, temperature, k):
    gen = torch.Generator().manual_seed(1)
    x0 = digits32[torch.randint(0, 32, (8,), generator=gen)]
    sigma = torch.tensor([0.05, 0.3, 0.7, 1.0, 2.0, 3.0, 8.0, 40.0])
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    got = smoothing_target(digits32, temperature, k)(x0, x, sigma)
    want = numpy_knn_softmax(x, digits32, sigma, temperature, k)
    np.testing.assert_allclose(got.reshape(8, -1).numpy(), want, atol=2e-5)


@pytest.mark.parametrize("k,h", [(5, 1.5), (64, 0.5)])
def test_smoothing_target_with_a_bandwidth_floor(digits32, k, h):
    gen = torch.Generator().manual_seed(1)
    x0 = digits32[torch.randint(0, 32, (8,), generator=gen)]
    sigma = torch.tensor([0.002, 0.05, 0.3, 0.7, 1.0, 2.0, 8.0, 40.0])
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    got = smoothing_target(digits32, 2.0, k, bandwidth=h)(x0, x, sigma)
    np.testing.assert_allclose(got.reshape(8, -1).numpy(), numpy_knn_softmax(x, digits32, sigma, 2.0, k, h), atol=2e-5)
    if h > 1:  # at small sigma the floored target stays a blend of neighbours instead of collapsing onto x0
        assert (got[:2] - x0[:2]).abs().amax() > 0.1


def test_bandwidth_is_recorded_in_the_history(tmp_path, tiny, digits32):
    config = TrainConfig(steps=2, batch_size=4, checkpoint_every=0)
    finetune(tiny(), digits32, FinetuneConfig(2.0, 4, bandwidth=1.5), config, tmp_path / "h")
    entry = load_native(tmp_path / "h").history[-1]
    assert entry["action"] == "smooth" and entry["bandwidth"] == 1.5 and entry["k"] == 4


def test_smoothing_target_is_not_x0_at_large_sigma_and_is_at_small(digits32):
    x0 = digits32[:4]
    target = smoothing_target(digits32, 2.0, 64)
    small, large = torch.full((4,), 0.01), torch.full((4,), 5.0)
    torch.testing.assert_close(target(x0, x0, small), x0, atol=1e-5, rtol=0)
    assert (target(x0, x0, large) - x0).abs().amax() > 0.3


def test_unconditioned_network_receives_the_constant(tmp_path, tiny, digits32):
    model, seen = tiny(), []
    model.net.register_forward_hook(lambda net, inputs, output: seen.append(inputs[1].detach().clone()))
    config = TrainConfig(steps=3, batch_size=8, seed=0, checkpoint_every=0)
    finetune(model, digits32, FinetuneConfig(temperature=None, uncondition=True), config, tmp_path / "u")
    constant = math.log(math.exp(config.p_mean)) / 4  # EDM c_noise = ln(sigma)/4 at the median training sigma
    assert len(seen) >= 3 and all(torch.allclose(v, torch.full_like(v, constant)) for v in seen)
    loaded, seen[:] = load_native(tmp_path / "u"), []
    loaded.net.register_forward_hook(lambda net, inputs, output: seen.append(inputs[1].detach().clone()))
    loaded(torch.randn(5, 1, 8, 8), torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0]))
    assert loaded.fixed_noise_input == pytest.approx(constant)
    torch.testing.assert_close(seen[0], torch.full((5,), constant))


def test_finetune_changes_weights_and_writes_a_checkpoint_with_history(tmp_path, tiny, digits32):
    before = tiny()
    config = TrainConfig(steps=20, batch_size=16, lr=1e-3, seed=0, checkpoint_every=0)
    tuned = finetune(tiny(), digits32, FinetuneConfig(temperature=2.0, k=8), config, tmp_path / "s",
                     info={"model": "orig"})
    assert any(not torch.equal(p, q) for p, q in zip(before.net.parameters(), tuned.net.parameters()))
    loaded = load_native(tmp_path / "s")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x, 0.5), tuned(x, 0.5))
    assert loaded.fixed_noise_input is None
    assert loaded.history[0] == {"action": "train"}
    assert loaded.history[1] == {"action": "smooth", "model": "orig", "steps": 20, "batch_size": 16, "lr": 1e-3,
                                 "seed": 0, "temperature": 2.0, "k": 8}
    assert not (tmp_path / "s" / STATE_NAME).exists()


def test_training_loop_regresses_onto_the_knn_softmax(tmp_path, tiny, digits32, monkeypatch):
    calls = []

    def recording_fit(*args, target_fn, **kwargs):
        def target(x0, x, sigma):
            calls.append((x0, x, sigma, target_fn(x0, x, sigma)))
            return calls[-1][3]
        return real_fit(*args, target_fn=target, **kwargs)

    real_fit = finetune_module.fit
    monkeypatch.setattr(finetune_module, "fit", recording_fit)
    config = TrainConfig(steps=3, batch_size=6, seed=0, checkpoint_every=0, p_mean=1.0, p_std=0.5)  # sigma ~ e
    finetune(tiny(), digits32, FinetuneConfig(temperature=3.0, k=4), config, tmp_path / "s")
    assert len(calls) == 3
    for x0, x, sigma, target in calls:
        want = numpy_knn_softmax(x, digits32, sigma, 3.0, 4)
        np.testing.assert_allclose(target.reshape(6, -1).numpy(), want, atol=2e-5)
        assert (target - x0).abs().amax() > 0.1  # a blend of neighbours, not the clean image


def test_both_flags_smooth_the_unconditioned_network(tmp_path, tiny, digits32):
    config = TrainConfig(steps=2, batch_size=4, checkpoint_every=0)
    finetune(tiny(), digits32, FinetuneConfig(2.0, 4, uncondition=True), config, tmp_path / "b")
    entry = load_native(tmp_path / "b").history[-1]
    assert entry["action"] == "smooth+uncondition" and entry["temperature"] == 2.0
    assert entry["noise_input"] == pytest.approx(-0.3)


def test_interrupted_finetune_resumes_to_the_same_weights(tmp_path, tiny, digits32):
    config = TrainConfig(steps=16, batch_size=8, seed=2, checkpoint_every=5)
    smooth = FinetuneConfig(temperature=2.0, k=4, uncondition=True)
    straight = finetune(tiny(), digits32, smooth, config, tmp_path / "a")

    def interrupt(step, info):
        if step == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny(), digits32, smooth, config, tmp_path / "b", progress=interrupt)
    assert (tmp_path / "b" / STATE_NAME).exists()
    resumed = finetune(tiny(), digits32, smooth, config, tmp_path / "b", resume=True)
    for p, q in zip(straight.net.parameters(), resumed.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert load_native(tmp_path / "b").history == load_native(tmp_path / "a").history


@pytest.mark.parametrize("config,message", [
    (FinetuneConfig(temperature=0.5), "temperature must be >= 1"),
    (FinetuneConfig(temperature=2.0, k=0), "k must be >= 1"),
    (FinetuneConfig(temperature=None), "nothing to fine-tune"),
    (FinetuneConfig(temperature=2.0, bandwidth=-1.0), "bandwidth must be >= 0"),
    (FinetuneConfig(temperature=None, uncondition=True, bandwidth=1.0), "give --temperature too"),
])
def test_bad_settings_are_user_errors(config, message):
    with pytest.raises(UserError, match=message):
        config.validate()


def test_the_empirical_model_cannot_be_finetuned(digits32):
    with pytest.raises(UserError, match="only a network can be fine-tuned"):
        trainable(load_model("empirical:T=2", train=digits32))
