"""k-diffusion checkpoints: memaudit's D(x, sigma) equals k-diffusion's own denoiser wrapper, and its own sampler.

The model is trained here with k-diffusion's loss and EMA for a few steps and saved as its train.py saves
({'config', 'model', 'model_ema', ...}). Needs k-diffusion (extra `kdiffusion`, which pulls torchvision).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from memaudit.errors import UserError
from memaudit.models.load import detect_format, load_model
from memaudit.sampling import SAMPLERS, karras_sigmas
from tests.cli_helpers import run_cli

K = pytest.importorskip("k_diffusion")

CONFIG = {
    "model": {"type": "image_v1", "input_channels": 1, "input_size": [8, 8], "patch_size": 1, "mapping_out": 16,
              "depths": [1, 1], "channels": [8, 16], "self_attn_depths": [False, False], "has_variance": False,
              "dropout_rate": 0.0, "augment_prob": 0.0, "sigma_data": 0.5, "sigma_min": 1e-2, "sigma_max": 80,
              "sigma_sample_density": {"type": "lognormal", "mean": -1.2, "std": 1.2}},
    "dataset": {"type": "imagefolder", "location": "unused"},
}


def train_and_save(path, steps: int = 30, config: dict = CONFIG, with_config: bool = True):
    """k-diffusion's loss, optimiser step and ema_update, then train.py's checkpoint layout."""
    config = K.config.load_config(copy.deepcopy(config))
    torch.manual_seed(0)
    inner = K.config.make_model(config)
    inner_ema = copy.deepcopy(inner)
    model, model_ema = (K.config.make_denoiser_wrapper(config)(m) for m in (inner, inner_ema))
    density = K.config.make_sample_density(config["model"])
    opt = torch.optim.Adam(inner.parameters(), lr=1e-3)
    data = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for _ in range(steps):
        loss = model.loss(data, torch.randn_like(data), density([16])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        K.utils.ema_update(model, model_ema, 0.9)
    obj = {"model": inner.state_dict(), "model_ema": inner_ema.state_dict(), "opt": opt.state_dict(),
           "epoch": 0, "step": steps, "gns_stats": None}
    if with_config:
        obj["config"] = config
    torch.save(obj, str(path))
    return model_ema.eval()


def test_denoiser_matches_k_diffusion(tmp_path):
    path = tmp_path / "run_00000030.pth"
    reference = train_and_save(path)
    assert detect_format(path) == "k-diffusion"
    model = load_model(str(path))
    assert model.image_shape == (1, 8, 8)
    assert (model.sigma_min, model.sigma_max) == (1e-2, 80.0)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        for sigma in (0.01, 0.1, 0.5, 2.0, 10.0, 80.0):
            x = x0 + sigma * noise
            expected = reference(x, torch.full((3,), sigma))
            assert not torch.allclose(expected, x0, atol=1e-3)
            torch.testing.assert_close(model(x, sigma), expected, atol=1e-5 * max(1.0, sigma), rtol=0)


def test_heun_samples_match_k_diffusions_sampler(tmp_path):
    """memaudit's Heun with k-diffusion's sample_heun on the same sigmas and start noise: the same samples."""
    path = tmp_path / "run.pth"
    reference = train_and_save(path)
    model = load_model(str(path))
    sigmas = karras_sigmas(12, model.sigma_min, model.sigma_max)
    torch.testing.assert_close(sigmas.float(), K.sampling.get_sigmas_karras(12, model.sigma_min, model.sigma_max))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * float(sigmas[0])
    with torch.no_grad():
        expected = K.sampling.sample_heun(reference, x.clone(), sigmas.float(), disable=True)
        got = SAMPLERS["heun"].fn(model, x.clone(), [float(s) for s in sigmas])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_old_checkpoint_needs_model_config(tmp_path):
    path = tmp_path / "old.pth"
    reference = train_and_save(path, steps=2, with_config=False)
    with pytest.raises(UserError, match="--model-config"):
        load_model(str(path))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    model = load_model(str(path), model_config=str(tmp_path / "config.json"))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x, 1.0), reference(x, torch.ones(2)), atol=1e-5, rtol=0)


def test_conditioned_models_and_flags_are_refused(tmp_path):
    path = tmp_path / "run.pth"
    train_and_save(path, steps=1)
    for flags, message in (({"param": "eps"}, "drop --param eps"), ({"schedule": "edm"}, "drop --schedule edm")):
        with pytest.raises(UserError, match=message):
            load_model(str(path), **flags)
    conditioned = {**CONFIG, "dataset": {**CONFIG["dataset"], "num_classes": 10}}
    with pytest.raises(UserError, match="num_classes"):
        load_model(str(path), model_config=json.dumps(conditioned))


def test_scans_through_the_cli(tmp_path, capsys):
    path = tmp_path / "run.pth"
    train_and_save(path, steps=5)
    data = tmp_path / "train.npy"
    np.save(data, (np.random.default_rng(0).random((8, 8, 8)) * 255).astype(np.uint8))
    code, out, err = run_cli(capsys, "scan", path, data, "--samples", "4", "--steps", "4", "--sampler", "heun",
                             "--skip", "jacobian", "--fid", "off", "--quiet", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["model"]["kind"] == "k-diffusion"


def test_inspect_shows_the_config(tmp_path, capsys):
    path = tmp_path / "run.pth"
    train_and_save(path, steps=1)
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert code == 0, err
    assert (info["format"], info["parameterisation"], info["image_shape"]) == ("k-diffusion", "edm", [1, 8, 8])
    assert (info["sigma_min"], info["sigma_max"], info["schedule"]["sigma_data"]) == (0.01, 80.0, 0.5)
    code, _, err = run_cli(capsys, "inspect", path, "--schedule", "edm")
    assert code == 2 and "drop --schedule edm" in err
