"""diffusers scheduler fields, one by one: memaudit's D(x, sigma) equals the x0 the scheduler's own `step` predicts
(`pred_original_sample`, after its clipping or thresholding) at the timesteps it visits, or the field is refused.

DDPM/DDIM-style schedulers take x_t = sqrt(abar_t) x and the UNet at t; Euler-style ones take x itself, the UNet at
scale_model_input(x) and their (possibly fractional) t; sigma_t = sqrt((1 - abar_t) / abar_t) from their own abar.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memaudit.errors import UserError
from memaudit.models import scheduler_fields
from memaudit.models.load import load_model
from tests.cli_helpers import run_cli

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.slow,  # importing diffusers takes a few seconds
              pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")]  # diffusers' numpy 2 calls


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def folder_with(tmp_path, unet, scheduler):
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    scheduler.save_pretrained(tmp_path / "pipe" / "scheduler")
    return str(tmp_path / "pipe")


def vp_reference(scheduler, unet, timesteps):
    """(x, sigma, the scheduler's pred_original_sample) at each timestep, for a DDPM/DDIM-style scheduler."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for t in timesteps:
        t = int(t)
        abar = scheduler.alphas_cumprod[t]
        x_t = torch.randn(2, 1, 8, 8, generator=gen) * 1.5
        with torch.no_grad():
            out = unet(x_t, t).sample
            x0 = scheduler.step(out, t, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
        sigma = float(torch.sqrt((1 - abar.double()) / abar.double()))
        rows.append((x_t / torch.sqrt(abar), sigma, x0))
    return rows


def assert_matches(model, rows):
    with torch.no_grad():
        for x, sigma, expected in rows:
            torch.testing.assert_close(model(x, sigma), expected, atol=1e-5 * max(1.0, sigma), rtol=0)


DDPM_FIELDS = [
    {"prediction_type": "epsilon"}, {"prediction_type": "sample"}, {"prediction_type": "v_prediction"},
    {"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"}, {"beta_schedule": "sigmoid"},
    {"num_train_timesteps": 50},
    {"trained_betas": np.linspace(1e-3, 0.05, 100).tolist(), "num_train_timesteps": 100},
    {"clip_sample": True, "clip_sample_range": 0.5},
    {"clip_sample": False},
    {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
]


@pytest.mark.parametrize("fields", DDPM_FIELDS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items())[:40])
def test_ddpm_field_matches_the_schedulers_step(tmp_path, unet, fields):
    fields = {"clip_sample": False, **fields}
    scheduler = diffusers.DDPMScheduler(**fields)
    model = load_model(folder_with(tmp_path, unet, scheduler))
    n = scheduler.config.num_train_timesteps
    rows = vp_reference(scheduler, unet, [0, 3, n // 2, n - 1])
    assert_matches(model, rows)
    if fields.get("clip_sample") or fields.get("thresholding"):  # the limit is really active here
        raw = load_model(folder_with(tmp_path / "raw", unet, diffusers.DDPMScheduler(
            **{**fields, "clip_sample": False, "thresholding": False})))
        with torch.no_grad():
            assert not torch.allclose(raw(rows[-1][0], rows[-1][1]), rows[-1][2], atol=1e-3)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_ddim_timestep_spacing_leaves_d_as_it_is(tmp_path, unet, spacing, offset):
    """timestep_spacing and steps_offset choose the timesteps DDIM visits; at each of them D is the step's x0."""
    scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, clip_sample=True,
                                        set_alpha_to_one=False)
    scheduler.set_timesteps(7)
    model = load_model(folder_with(tmp_path, unet, scheduler))
    assert_matches(model, vp_reference(scheduler, unet, scheduler.timesteps[::2]))


@pytest.mark.parametrize("fields", [{"timestep_spacing": "linspace"}, {"timestep_spacing": "leading"},
                                    {"use_karras_sigmas": True}, {"prediction_type": "v_prediction"}],
                         ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_euler_matches_its_step_at_fractional_timesteps(tmp_path, unet, fields):
    scheduler = diffusers.EulerDiscreteScheduler(**fields)
    model = load_model(folder_with(tmp_path, unet, scheduler))
    scheduler.set_timesteps(6)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            sigma = float(scheduler.sigmas[i])
            x = torch.randn(2, 1, 8, 8, generator=gen) * (1 + sigma)
            out = unet(scheduler.scale_model_input(x, t), t).sample
            expected = scheduler.step(out, t, x).pred_original_sample
            torch.testing.assert_close(model(x, sigma), expected, atol=1e-5 * max(1.0, sigma), rtol=0)


@pytest.mark.parametrize("make,message", [
    (lambda: diffusers.DDPMScheduler(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
    (lambda: diffusers.EulerDiscreteScheduler(timestep_type="continuous"), "timestep_type='continuous'"),
    (lambda: diffusers.EulerDiscreteScheduler(interpolation_type="log_linear"), "interpolation_type 'log_linear'"),
    (lambda: diffusers.LCMScheduler(), "LCMScheduler is not a discrete VP"),
    (lambda: diffusers.EDMEulerScheduler(), "EDMEulerScheduler is not a discrete VP"),
])
def test_fields_that_change_d_otherwise_are_refused(tmp_path, unet, make, message):
    with pytest.raises(UserError, match=message) as exc:
        load_model(folder_with(tmp_path, unet, make()))
    assert "--param and --schedule" in str(exc.value)


def test_unknown_fields_and_beta_schedules_are_refused(tmp_path, unet, monkeypatch, capsys):
    path = folder_with(tmp_path, unet, diffusers.DDPMScheduler())
    monkeypatch.setattr(scheduler_fields, "KNOWN", scheduler_fields.KNOWN - {"steps_offset"})
    with pytest.raises(UserError, match="unknown scheduler field steps_offset=0"):
        load_model(path)
    monkeypatch.undo()
    config_path = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "beta_schedule": "quadratic"}))
    np.save(tmp_path / "d.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    code, _, err = run_cli(capsys, "scan", path, tmp_path / "d.npy", "--quiet")
    assert code == 2 and "diffusers cannot build its DDPMScheduler" in err and len(err.strip().splitlines()) == 1


def test_overrides_skip_the_scheduler_config(tmp_path, unet):
    model = load_model(folder_with(tmp_path, unet, diffusers.LCMScheduler()), param="eps", schedule="vp-linear")
    assert model.x0_limit is None and model.param == "eps"


@pytest.mark.parametrize("name", scheduler_fields.VP_SCHEDULERS)
def test_every_vp_scheduler_class_loads_with_its_defaults(tmp_path, unet, name):
    """Each listed class's default config passes the field table (no field of it is unknown to memaudit)."""
    try:
        scheduler = getattr(diffusers, name)()
    except ImportError as exc:  # e.g. DPMSolverSDEScheduler needs torchsde
        pytest.skip(str(exc).strip().splitlines()[0])
    model = load_model(folder_with(tmp_path, unet, scheduler))
    assert model.schedule.alphas_cumprod.shape == (scheduler.config.num_train_timesteps,)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.isfinite(model(x, 1.0)).all()
