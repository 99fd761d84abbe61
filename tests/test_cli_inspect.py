"""`memaudit inspect MODEL`: the detected settings, as text or JSON; a wrong guess is one line naming the flag."""

from __future__ import annotations

import json

import pytest
import torch

from memaudit.models.native import make_unet_denoiser, save_native
from tests.cli_helpers import run_cli


@pytest.fixture()
def native(tmp_path):
    torch.manual_seed(0)
    return save_native(make_unet_denoiser((1, 8, 8), base_channels=8), tmp_path / "native")


def test_native_checkpoint_settings(native, capsys):
    code, out, err = run_cli(capsys, "inspect", native)
    assert code == 0, err
    assert "format:           native" in out and "edm" in out and "image shape:      1x8x8" in out
    code, out, _ = run_cli(capsys, "inspect", native, "--json", "--sigma-max", "40")
    info = json.loads(out)
    assert (info["format"], info["parameterisation"], info["sigma_min"], info["sigma_max"]) == \
        ("native", "edm", 0.002, 40.0)
    assert info["schedule"]["kind"] == "edm" and info["forward_check"] == "passed"


def test_torchscript_needs_the_flags_it_names(tmp_path, capsys):
    class Net(torch.nn.Module):
        def forward(self, x, noise_in):
            return x * torch.tanh(noise_in).reshape(-1, 1, 1, 1)

    torch.jit.script(Net()).save(str(tmp_path / "net.pt"))
    code, _, err = run_cli(capsys, "inspect", tmp_path / "net.pt")
    assert code == 2 and "--param" in err and "--schedule" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "inspect", tmp_path / "net.pt", "--param", "eps", "--schedule",
                             "vp-linear:steps=100", "--json")
    info = json.loads(out)
    assert code == 0 and info["schedule"]["timesteps"] == 100 and info["image_shape"] is None
    assert info["forward_check"].startswith("skipped")
    code, _, err = run_cli(capsys, "inspect", tmp_path / "net.pt", "--param", "eps", "--schedule", "vp-linear:n=3")
    assert code == 2 and "'n=3' is not name=value" in err


def test_contradicting_flag_and_empirical_are_clear_errors(native, capsys):
    code, _, err = run_cli(capsys, "inspect", native, "--param", "eps")
    assert code == 2 and "drop --param eps" in err
    code, _, err = run_cli(capsys, "inspect", "empirical")
    assert code == 2 and "DATA" in err


@pytest.mark.slow  # importing diffusers takes a few seconds
def test_diffusers_pipeline_settings(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    diffusers.DDPMScheduler(prediction_type="v_prediction", thresholding=True).save_pretrained(
        tmp_path / "pipe" / "scheduler")
    code, out, err = run_cli(capsys, "inspect", tmp_path / "pipe", "--json")
    info = json.loads(out)
    assert code == 0, err
    assert (info["format"], info["parameterisation"], info["image_shape"]) == ("diffusers", "v", [1, 8, 8])
    assert info["schedule"]["timesteps"] == 1000 and "thresholded" in info["x0_limit"]
