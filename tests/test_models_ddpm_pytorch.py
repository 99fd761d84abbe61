"""denoising-diffusion-pytorch Trainer checkpoints: memaudit's D(x, sigma) equals the library's own x0 prediction.

The reference is GaussianDiffusion.model_predictions(x_t, t).pred_x_start of the weights the Trainer samples with
(its EMA copy), at the discrete timestep t whose sigma_t = sqrt(1/abar_t - 1), fed x_t = x / sqrt(1 + sigma_t^2).
Needs the library (extra `ddpm`, which pulls torchvision); skipped without it.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from memaudit.errors import UserError
from memaudit.models.load import detect_format, load_model
from tests.cli_helpers import run_cli

from memaudit.models.ddpm_pytorch import objective_from_loss_weight

try:
    import denoising_diffusion_pytorch as ddpm
    from ema_pytorch import EMA  # installed with the library
except ImportError:
    ddpm = None
needs_library = pytest.mark.skipif(ddpm is None, reason="denoising-diffusion-pytorch is not installed (extra ddpm)")

UNET = {"dim": 8, "dim_mults": [1, 2], "channels": 1, "attn_dim_head": 4, "attn_heads": 2}
TIMESTEPS = 50


def make_diffusion(objective: str, beta_schedule: str = "linear", min_snr: bool = False):
    torch.manual_seed(0)
    unet = ddpm.Unet(**{**UNET, "dim_mults": tuple(UNET["dim_mults"])})
    return ddpm.GaussianDiffusion(unet, image_size=8, timesteps=TIMESTEPS, objective=objective,
                                  beta_schedule=beta_schedule, min_snr_loss_weight=min_snr)


def train_and_save(path, diffusion, steps: int = 30):
    """A few optimiser steps on random images with the library's loss, EMA as the Trainer keeps it, then the
    Trainer's save format {'step', 'model', 'opt', 'ema', 'scaler', 'version'}."""
    ema = EMA(diffusion, beta=0.9, update_every=1, update_after_step=0)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    data = torch.rand(16, 1, 8, 8, generator=gen)
    for _ in range(steps):
        loss = diffusion(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
    torch.save({"step": steps, "model": diffusion.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                "scaler": None, "version": "2.3.4"}, str(path))
    return ema.ema_model


def library_x0(diffusion, x, t: int, clip: bool = True):
    """The library's D: x0 predicted from x_t = x / sqrt(1 + sigma_t^2) at timestep t, clipped to [-1, 1] as its
    samplers (p_sample, ddim_sample) clip it."""
    sigma = diffusion.sqrt_recipm1_alphas_cumprod[t]
    times = torch.full((x.shape[0],), t, dtype=torch.long)
    return diffusion.model_predictions(x / torch.sqrt(1 + sigma**2), times, clip_x_start=clip).pred_x_start


@needs_library
@pytest.mark.parametrize("objective,schedule,min_snr", [("pred_noise", "linear", False),
                                                         ("pred_x0", "cosine", True),
                                                         ("pred_v", "sigmoid", False),
                                                         ("pred_v", "linear", True)])
def test_denoiser_matches_the_library(tmp_path, objective, schedule, min_snr):
    path = tmp_path / "model-1.pt"
    reference = train_and_save(path, make_diffusion(objective, schedule, min_snr)).eval()
    (tmp_path / "model-config.json").write_text(json.dumps({"unet": UNET, "diffusion": {"image_size": 8}}))
    assert detect_format(path) == "ddpm-pytorch"
    model = load_model(str(path))
    assert model.param == {"pred_noise": "eps", "pred_x0": "x0", "pred_v": "v"}[objective]
    assert model.image_shape == (1, 8, 8)
    sigmas = reference.sqrt_recipm1_alphas_cumprod.double()
    assert model.sigma_min == pytest.approx(float(sigmas[0])) and model.sigma_max == pytest.approx(float(sigmas[-1]))
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 1, 8, 8, generator=gen, dtype=torch.float32) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
    with torch.no_grad():
        for t in (0, 7, TIMESTEPS // 2, TIMESTEPS - 1):
            sigma = float(sigmas[t])
            x = x0 + sigma * noise
            expected = library_x0(reference, x, t)
            assert not torch.allclose(expected, x0, atol=1e-3)  # a trained network, not the identity
            # 1e-5 where sigma <= 1; above, float32's resolution of x = x0 + sigma n (|x| ~ sigma) is the limit
            torch.testing.assert_close(model(x, sigma), expected, atol=1e-5 * max(1.0, sigma), rtol=0)


@needs_library
def test_raw_weights_and_inline_config(tmp_path):
    path = tmp_path / "model-2.pt"
    diffusion = make_diffusion("pred_noise")
    train_and_save(path, diffusion)
    config = json.dumps({"unet": UNET, "weights": "model", "diffusion": {"objective": "pred_noise"},
                         "clip_x_start": False})
    model = load_model(str(path), model_config=config)
    assert model.x0_limit is None
    reference = diffusion.eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float32) * 3
    with torch.no_grad():
        for t in (7, TIMESTEPS - 1):
            sigma = float(reference.sqrt_recipm1_alphas_cumprod[t])
            expected = library_x0(reference, x, t, clip=False)
            assert expected.abs().max() > 1  # unclipped indeed
            torch.testing.assert_close(model(x, sigma), expected, atol=1e-5 * max(1.0, sigma), rtol=0)


@needs_library
@pytest.mark.parametrize("config,message", [
    (None, "--model-config"),
    ({"unet": {**UNET, "dim": 16}}, "does not match the network"),
    ({"unet": UNET, "diffusion": {"objective": "pred_x0"}}, "trained with objective pred_noise"),
    ({"unet": UNET, "extra": 1}, "unknown keys extra"),
    ({"unet": {**UNET, "self_condition": True}}, "self-conditioned"),
    ({"unet": {**UNET, "no_such_argument": 1}}, "Unet("),
])
def test_bad_config_is_a_clear_error(tmp_path, config, message):
    path = tmp_path / "model-1.pt"
    train_and_save(path, make_diffusion("pred_noise"), steps=1)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_model(str(path), model_config=None if config is None else json.dumps(config))


@needs_library
def test_contradicting_flags_are_refused(tmp_path):
    path = tmp_path / "model-1.pt"
    train_and_save(path, make_diffusion("pred_v"), steps=1)
    config = json.dumps({"unet": UNET})
    with pytest.raises(UserError, match="drop --param eps"):
        load_model(str(path), model_config=config, param="eps")
    with pytest.raises(UserError, match="drop --schedule"):
        load_model(str(path), model_config=config, schedule="vp-linear")


@needs_library
@pytest.mark.slow
def test_trainer_checkpoint_scans_through_the_cli(tmp_path, capsys):
    """The library's own Trainer, a few hundred steps on 100 digits (its minimum), then `memaudit scan` on its
    model-N.pt."""
    from PIL import Image

    from tests.digits import digits_dataset

    images = tmp_path / "images"
    images.mkdir()
    for i, pixels in enumerate(digits_dataset(100)):
        Image.fromarray(pixels, mode="L").save(images / f"{i:03d}.png")
    results = tmp_path / "results"
    trainer = ddpm.Trainer(make_diffusion("pred_noise"), str(images), train_batch_size=8, gradient_accumulate_every=2, train_num_steps=300,
                           save_and_sample_every=300, num_samples=4, results_folder=str(results),
                           calculate_fid=False, amp=False, convert_image_to="L")
    trainer.train()
    checkpoint = results / "model-1.pt"
    (results / "model-config.json").write_text(json.dumps({"unet": UNET, "diffusion": {"image_size": 8}}))
    code, out, err = run_cli(capsys, "scan", checkpoint, images, "--samples", "8", "--steps", "8", "--sampler",
                             "heun", "--skip", "jacobian", "--fid", "off", "--quiet", "--json", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["kind"] == "ddpm-pytorch"


def fake_checkpoint(path, objective: str, gamma: float = float("inf")):
    """A Trainer-format file with the GaussianDiffusion buffers (linear betas, 20 steps) and one weight."""
    betas = torch.linspace(1e-3, 0.2, 20, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    weight = {"pred_noise": clipped / snr, "pred_x0": clipped, "pred_v": clipped / (snr + 1)}[objective]
    state = {"model.init_conv.weight": torch.zeros(8, 1, 7, 7), "betas": betas.float(),
             "alphas_cumprod": abar.float(), "sqrt_recipm1_alphas_cumprod": torch.sqrt(1 / abar - 1).float(),
             "loss_weight": weight.float()}
    torch.save({"step": 1, "model": state, "version": "2.3.4"}, str(path))
    return state


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("gamma", [float("inf"), 5.0])
def test_objective_is_read_from_the_loss_weight(tmp_path, objective, gamma):
    assert objective_from_loss_weight(fake_checkpoint(tmp_path / "m.pt", objective, gamma)) == objective


def test_detected_without_unpickling_and_without_the_library(tmp_path, monkeypatch):
    path = tmp_path / "model-3.pt"
    fake_checkpoint(path, "pred_noise")
    assert detect_format(path) == "ddpm-pytorch"
    monkeypatch.setitem(sys.modules, "denoising_diffusion_pytorch", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'memaudit\[ddpm\]'"):
        load_model(str(path), model_config=json.dumps({"unet": UNET}))


def test_missing_model_config_names_the_flag(tmp_path, capsys):
    path = tmp_path / "model-3.pt"
    fake_checkpoint(path, "pred_noise")
    data = tmp_path / "d.npy"
    np.save(data, np.zeros((4, 8, 8), dtype=np.uint8))
    code, _, err = run_cli(capsys, "scan", path, data, "--quiet")
    assert code == 2 and "--model-config" in err and len(err.strip().splitlines()) == 1


@needs_library
def test_inspect_shows_what_the_checkpoint_records(tmp_path, capsys):
    path = tmp_path / "model-1.pt"
    train_and_save(path, make_diffusion("pred_v", "sigmoid"), steps=1)
    (tmp_path / "model-config.json").write_text(json.dumps({"unet": UNET, "diffusion": {"image_size": 8}}))
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert code == 0, err
    assert (info["format"], info["parameterisation"], info["image_shape"]) == ("ddpm-pytorch", "v", [1, 8, 8])
    assert info["schedule"]["timesteps"] == TIMESTEPS and "own alphas_cumprod" in info["schedule"]["summary"]
    code, _, err = run_cli(capsys, "inspect", path, "--model-config", '{"unet": {"dim": 4}}')
    assert code == 2 and "--model-config" in err and len(err.strip().splitlines()) == 1
