"""Class-conditional k-diffusion models: D(x, sigma, c) equals k-diffusion's own denoiser wrapper given the label
(image_transformer_v1's class_cond; image_v1's mapping_cond as a one-hot vector, confirmed by --num-classes), and
a wrong --num-classes is an error naming the flag. Needs k-diffusion (extra `kdiffusion`)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memaudit.conditioning import ClassBound
from memaudit.errors import UserError
from memaudit.models.load import load_model
from tests.cli_helpers import run_cli

os.environ.setdefault("K_DIFFUSION_USE_COMPILE", "0")  # the transformer's torch.compile takes a minute on CPU
K = pytest.importorskip("k_diffusion")

MODEL = {"type": "image_v1", "input_channels": 1, "input_size": [8, 8], "patch_size": 1, "mapping_out": 16,
         "depths": [1, 1], "channels": [8, 16], "self_attn_depths": [False, False], "has_variance": False,
         "dropout_rate": 0.0, "augment_prob": 0.0, "sigma_data": 0.5, "sigma_min": 1e-2, "sigma_max": 80}
MAPPING = {"model": {**MODEL, "mapping_cond_dim": 3}, "dataset": {"type": "imagefolder", "location": "unused"}}
TRANSFORMER = {"model": {"type": "image_transformer_v1", "input_channels": 1, "input_size": [8, 8],
                         "patch_size": [2, 2], "width": 64, "depth": 1, "dropout_rate": 0.0, "sigma_data": 0.5,
                         "sigma_min": 1e-2, "sigma_max": 80},
               "dataset": {"type": "imagefolder", "location": "unused", "num_classes": 3}}
SIGMAS = (0.01, 0.1, 1.0, 10.0, 80.0)


def save(path, config: dict):
    """A freshly built model with perturbed weights (the class embeddings matter), saved as train.py saves."""
    config = K.config.load_config(copy.deepcopy(config))
    torch.manual_seed(0)
    inner = K.config.make_model(config)
    with torch.no_grad():
        for p in inner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"config": config, "model": inner.state_dict(), "model_ema": inner.state_dict()}, str(path))
    return K.config.make_denoiser_wrapper(config)(inner).eval()


@pytest.mark.parametrize("config,key", [(MAPPING, "mapping_cond"), (TRANSFORMER, "class_cond")])
def test_conditional_denoiser_matches_k_diffusion(tmp_path, config, key):
    path = tmp_path / "run.pth"
    reference = save(path, config)
    model = load_model(str(path), num_classes=3 if key == "mapping_cond" else None)
    assert model.num_classes == 3
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    labels = torch.tensor([0, 1, 2])
    cond = F.one_hot(labels, 3).float() if key == "mapping_cond" else labels
    with torch.no_grad():
        for sigma in SIGMAS:
            x = x0 + sigma * noise
            expected = reference(x, torch.full((3,), sigma), **{key: cond})
            torch.testing.assert_close(model(x, sigma, class_labels=labels), expected,
                                       atol=1e-5 * max(1.0, sigma), rtol=0)
        x = x0 + noise
        assert not torch.allclose(ClassBound(model, 0)(x, 1.0), ClassBound(model, 2)(x, 1.0), atol=1e-4)


def test_mapping_cond_needs_the_num_classes_flag(tmp_path, capsys):
    path = tmp_path / "run.pth"
    save(path, MAPPING)
    with pytest.raises(UserError, match="pass --num-classes 3"):
        load_model(str(path))
    with pytest.raises(UserError, match="--num-classes 2 does not match"):
        load_model(str(path), num_classes=2)
    code, out, err = run_cli(capsys, "inspect", path, "--num-classes", "3")
    assert code == 0 and "class-conditional, 3 classes" in out, err
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 2 and "--num-classes 3" in err and len(err.strip().splitlines()) == 1


def test_transformer_class_count_is_read_and_checked(tmp_path, capsys):
    path = tmp_path / "run.pth"
    save(path, TRANSFORMER)
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0 and "class-conditional, 3 classes" in out, err
    code, _, err = run_cli(capsys, "inspect", path, "--num-classes", "4")
    assert code == 2 and "drop --num-classes 4" in err
    data = tmp_path / "train.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=(rng.random((9, 8, 8)) * 255).astype(np.uint8), labels=np.arange(9) % 3)
    code, out, err = run_cli(capsys, "scan", path, data, "--samples", "6", "--steps", "4", "--sampler", "heun",
                             "--fid", "off", "--quiet", "--json", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [e["num_samples"] for e in report["per_class"]["runs"]["heun"]] == [2, 2, 2]
