"""Fine-tuning: the training loop regresses onto the seed papers' targets (Eq. 11's switch at sigma_c, the power
law below it, the kernel average), unconditioning really fixes the network's noise input, checkpoints record
the action, and an interrupted fine-tune resumes to the same weights."""

import math

import numpy as np
import pytest
import torch

from memaudit import finetune as finetune_module
from memaudit.errors import UserError
from memaudit.finetune import finetune, trainable
from memaudit.models.load import load_model
from memaudit.models.native import load_native, make_unet_denoiser, save_native
from memaudit.smoothing.kernel import KernelSmoothedDenoiser
from memaudit.empirical import EmpiricalDenoiser
from memaudit.smoothing.targets import SmoothingConfig, make_target
from memaudit.training import STATE_NAME, TrainConfig


@pytest.fixture
def tiny(tmp_path):
    """A tiny native UNet checkpoint (with a training history), loaded back as `load_model` does."""
    torch.manual_seed(0)
    save_native(make_unet_denoiser((1, 8, 8), base_channels=8), tmp_path / "orig", history=[{"action": "train"}])
    return lambda: load_model(str(tmp_path / "orig"))


def numpy_power_law_target(idx, x, train, sigma, schedule, k):
    """Eq. 11 by brute force: mu above sigma_c, else sum_j w_j mu_j over the k nearest training images to mu
    (mu first), w_j proportional to ||x - mu_j||^(-(d-2)/T), in float64 numpy."""
    pts = train.reshape(len(train), -1).double().numpy()
    xs = x.reshape(len(x), -1).double().numpy()
    out = []
    for i, row, s in zip(idx.tolist(), xs, sigma.double().numpy()):
        if s > schedule["sigma_c"]:
            out.append(pts[i])
            continue
        order = np.argsort(((pts - pts[i]) ** 2).sum(1), kind="stable")[:k]
        T = max(schedule["c"] / s, 1.0) if schedule["per_sigma"] else schedule["c"]
        logw = -(pts.shape[1] - 2) / (2 * T) * np.log(((row - pts[order]) ** 2).sum(1))
        w = np.exp(logw - logw.max())
        out.append((w / w.sum()) @ pts[order])
    return np.stack(out)


@pytest.mark.parametrize("temperature,schedule", [("2", {"c": 2.0, "per_sigma": False, "sigma_c": math.inf}),
                                                  ("3/sigma", {"c": 3.0, "per_sigma": True, "sigma_c": 3.0})])
def test_the_temperature_target_is_eq_11(digits32, temperature, schedule):
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 32, (8,), generator=gen)
    x0 = digits32[idx]
    sigma = torch.tensor([0.05, 0.3, 0.7, 1.0, 2.0, 2.9, 3.1, 40.0])
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    target = make_target(digits32, SmoothingConfig(temperature=temperature, k=5))
    got = target(idx, x0, x, sigma)
    want = numpy_power_law_target(idx, x, digits32, sigma, schedule, 5)
    np.testing.assert_allclose(got.reshape(8, -1).numpy(), want, atol=2e-5)
    if schedule["per_sigma"]:
        torch.testing.assert_close(got[-2:], x0[-2:])  # above sigma_c: the clean image itself


def test_the_kernel_target_is_the_kernel_smoothed_empirical_denoiser(digits32):
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 32, (4,), generator=gen)
    x0 = digits32[idx]
    sigma = torch.tensor([0.05, 0.3, 1.0, 3.0])
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    got = make_target(digits32, SmoothingConfig(kernel=0.3, kernel_samples=8))(idx, x0, x, sigma)
    want = KernelSmoothedDenoiser(EmpiricalDenoiser(digits32), 0.3, 8)(x, sigma)
    torch.testing.assert_close(got, want)


def test_the_training_loop_regresses_onto_the_target(tmp_path, tiny, digits32, monkeypatch):
    calls = []

    def recording_fit(*args, target_fn, **kwargs):
        def target(idx, x0, x, sigma):
            calls.append((idx, x0, x, sigma, target_fn(idx, x0, x, sigma)))
            return calls[-1][4]
        return real_fit(*args, target_fn=target, **kwargs)

    real_fit = finetune_module.fit
    monkeypatch.setattr(finetune_module, "fit", recording_fit)
    config = TrainConfig(steps=3, batch_size=6, seed=0, checkpoint_every=0, p_mean=-1.0, p_std=0.5)
    finetune(tiny(), digits32, SmoothingConfig(temperature="1.5", k=4), config, tmp_path / "s")
    assert len(calls) == 3
    for idx, x0, x, sigma, target in calls:
        torch.testing.assert_close(x0, digits32[idx])  # the target knows each pair's clean source
        want = numpy_power_law_target(idx, x, digits32, sigma, {"c": 1.5, "per_sigma": False, "sigma_c": math.inf}, 4)
        np.testing.assert_allclose(target.reshape(6, -1).numpy(), want, atol=2e-5)


def test_unconditioned_network_receives_the_constant(tmp_path, tiny, digits32):
    model, seen = tiny(), []
    model.net.register_forward_hook(lambda net, inputs, output: seen.append(inputs[1].detach().clone()))
    config = TrainConfig(steps=3, batch_size=8, seed=0, checkpoint_every=0)
    finetune(model, digits32, SmoothingConfig(uncondition=True), config, tmp_path / "u")
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
    tuned = finetune(tiny(), digits32, SmoothingConfig(temperature="7/sigma", k=8), config, tmp_path / "s",
                     info={"model": "orig"})
    assert any(not torch.equal(p, q) for p, q in zip(before.net.parameters(), tuned.net.parameters()))
    loaded = load_native(tmp_path / "s")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x, 0.5), tuned(x, 0.5))
    assert loaded.fixed_noise_input is None
    assert loaded.history[0] == {"action": "train"}
    assert loaded.history[1] == {"action": "smooth", "model": "orig", "steps": 20, "batch_size": 16, "lr": 1e-3,
                                 "seed": 0, "target": "temperature", "temperature": "7/sigma", "sigma_collapse": 7.0,
                                 "k": 8, "denominator": "sigma", "knn_features": "pixels", "uncondition": False}
    assert not (tmp_path / "s" / STATE_NAME).exists()


def test_both_flags_smooth_the_unconditioned_network(tmp_path, tiny, digits32):
    config = TrainConfig(steps=2, batch_size=4, checkpoint_every=0)
    finetune(tiny(), digits32, SmoothingConfig("2", 4, uncondition=True), config, tmp_path / "b")
    entry = load_native(tmp_path / "b").history[-1]
    assert entry["action"] == "smooth+uncondition" and entry["temperature"] == "2"
    assert entry["noise_input"] == pytest.approx(-0.3)


def test_interrupted_finetune_resumes_to_the_same_weights(tmp_path, tiny, digits32):
    config = TrainConfig(steps=16, batch_size=8, seed=2, checkpoint_every=5)
    smooth = SmoothingConfig(temperature="2", k=4, uncondition=True)
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
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny(), digits32, smooth, config, tmp_path / "c", progress=interrupt)
    with pytest.raises(UserError, match="other settings"):
        finetune(tiny(), digits32, SmoothingConfig(temperature="3", k=4, uncondition=True), config, tmp_path / "c",
                 resume=True)


@pytest.mark.parametrize("config,message", [
    (SmoothingConfig(temperature="0.5"), "temperature must be >= 1"),
    (SmoothingConfig(temperature="2", k=0), "k must be >= 1"),
    (SmoothingConfig(temperature="two"), "temperature must be a positive number"),
    (SmoothingConfig(temperature="2", kernel=0.5), "not combined with a temperature"),
    (SmoothingConfig(kernel=-1.0), "kernel must be a finite bandwidth"),
    (SmoothingConfig(temperature="2", denominator="both"), "denominator must be one of"),
])
def test_bad_settings_are_user_errors(config, message):
    with pytest.raises(UserError, match=message):
        config.validate()


def test_the_empirical_model_cannot_be_finetuned(digits32):
    with pytest.raises(UserError, match="only a network can be fine-tuned"):
        trainable(load_model("empirical:T=2", train=digits32))
