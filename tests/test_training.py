"""Training: the EDM loss decreases, checkpoints round-trip, and an interrupted run resumes exactly."""

import pytest
import torch

from memaudit.errors import UserError
from memaudit.models.native import load_native, make_unet_denoiser
from memaudit.training import STATE_NAME, TrainConfig, edm_weight, fit


def tiny_model():
    torch.manual_seed(0)
    return make_unet_denoiser((1, 8, 8), base_channels=8, channel_mult=(1, 2))


def test_edm_weight_formula():
    sigma = torch.tensor([0.1, 0.5, 2.0])
    torch.testing.assert_close(edm_weight(sigma, 0.5), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)


def test_loss_decreases_and_checkpoint_round_trips(tmp_path, digits32):
    losses = []
    config = TrainConfig(steps=60, batch_size=32, lr=2e-3, seed=0, checkpoint_every=0)
    model = fit(tiny_model(), digits32, config, tmp_path / "m", [{"action": "train"}],
                progress=lambda step, info: losses.append(float(info.split()[-1])))
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    loaded = load_native(tmp_path / "m")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x, 0.7), model(x, 0.7))
    assert loaded.history == [{"action": "train"}]
    assert not (tmp_path / "m" / STATE_NAME).exists()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, digits32):
    config = TrainConfig(steps=24, batch_size=16, seed=3, checkpoint_every=10)
    straight = fit(tiny_model(), digits32, config, tmp_path / "a", [])

    def interrupt(step, info):
        if step == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), digits32, config, tmp_path / "b", [], progress=interrupt)
    assert (tmp_path / "b" / STATE_NAME).exists()
    resumed = fit(tiny_model(), digits32, config, tmp_path / "b", [], resume=True)
    for p, q in zip(straight.net.parameters(), resumed.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_resume_without_checkpoint_is_a_user_error(tmp_path, digits32):
    with pytest.raises(UserError, match="nothing to resume"):
        fit(tiny_model(), digits32, TrainConfig(steps=2), tmp_path / "none", [], resume=True)
