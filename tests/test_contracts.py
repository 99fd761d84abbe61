"""Contract tests over every registered extension: samplers, model formats, feature spaces, metrics,
parameterisations and schedules. A new table entry gets these checks for free (diffusers' SchedulerCommonTest is
the model); entries are read from the tables themselves, so none can be left out."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from memaudit.denoiser import Denoiser
from memaudit.empirical import EmpiricalDenoiser
from memaudit.features import FEATURE_SPACES, feature_space
from memaudit.metrics import METRICS, SKIP_CHOICES, summary_keys
from memaudit.metrics.base import RUN, SCAN, Metric
from memaudit.models.load import FORMATS, detect_format, load_model
from memaudit.models.native import load_native, make_unet_denoiser, save_native
from memaudit.models.parameterisations import PARAMETERISATIONS
from memaudit.models.schedules import SCHEDULES, make_schedule
from memaudit.report.schema import build_report, validate_report
from memaudit.report.schema_doc import summary_table
from memaudit.report.terminal import statements
from memaudit.resnet import ResNet18
from memaudit.sampling import SAMPLERS, SamplerConfig, sample
from memaudit.scan import ScanConfig, run_scan

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Gaussian(Denoiser):
    """Exact denoiser of N(0, 0.5^2 I) on 1x4x4 images."""

    image_shape = (1, 4, 4)

    def denoise(self, x, sigma):
        return 0.25 / (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2) * x


# ------------------------------------------------------------------------------------------------ samplers

class PointMass(Denoiser):
    """D(x, sigma) = c for every x and sigma: the data set is one image."""

    image_shape = (1, 4, 4)

    def __init__(self):
        super().__init__()
        self.c = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)

    def denoise(self, x, sigma):
        return self.c.expand_as(x)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_has_the_one_signature_and_ends_with_a_denoising_step(name):
    from memaudit.sampling import cpu_noise, karras_sigmas

    params = list(inspect.signature(SAMPLERS[name].fn).parameters)
    assert params[:5] == ["denoiser", "x", "sigmas", "noise", "callback"]
    seen = []
    sigmas = karras_sigmas(6).tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 4, 4, generator=g) * sigmas[0]
    extra = {"nearest": lambda y: (y - PointMass().c).reshape(y.shape[0], -1).norm(dim=1)} \
        if SAMPLERS[name].needs_nearest else {}
    out = SAMPLERS[name].fn(PointMass(), x, sigmas, cpu_noise(g, 8), lambda i, s, x_i, d: seen.append((i, s)),
                            **extra)
    assert [i for i, _ in seen] == list(range(6)) and all(a[1] >= b[1] for a, b in zip(seen, seen[1:]))
    # whatever noise is left at sigma_min, the last step returns D: exactly the one image
    torch.testing.assert_close(out, PointMass().c.expand_as(out), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_is_seeded(name):
    config = SamplerConfig(sampler=name, steps=5)
    near = lambda y: y.reshape(y.shape[0], -1).norm(dim=1)  # noqa: E731 - the distance to the data's mean
    a, _ = sample(Gaussian(), 6, config, seed=3, batch_size=4, nearest=near)
    assert torch.equal(a, sample(Gaussian(), 6, config, seed=3, batch_size=4, nearest=near)[0])
    assert not torch.equal(a, sample(Gaussian(), 6, config, seed=4, batch_size=4, nearest=near)[0])


# ------------------------------------------------------------------------------------- model formats

FACTORY = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, noise_in):
        return self.conv(x) * torch.tanh(noise_in).reshape(-1, 1, 1, 1)


def build():
    torch.manual_seed(0)
    return Net()
'''


def make_checkpoint(fmt: str, tmp_path: Path) -> tuple[str, dict]:
    """A small checkpoint in format `fmt` and the loader options it needs."""
    factory = tmp_path / "nets.py"
    factory.write_text(FACTORY)
    spec = importlib.util.spec_from_file_location("contract_nets", factory)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.build()
    opts = {"param": "eps", "schedule": "vp-linear"}
    if fmt == "native":
        torch.manual_seed(0)
        return str(save_native(make_unet_denoiser((1, 8, 8), base_channels=8), tmp_path / "native")), {}
    if fmt == "diffusers":
        diffusers = pytest.importorskip("diffusers")
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                     layers_per_block=1, norm_num_groups=4,
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"))
        unet.save_pretrained(tmp_path / "diff")
        diffusers.DDPMScheduler().save_pretrained(tmp_path / "diff")
        return str(tmp_path / "diff"), {}
    if fmt == "latent":  # a pipeline folder: unet/, scheduler/, vae/ (1x8x8 latents of 1x8x8 images)
        path, _ = make_checkpoint("diffusers", tmp_path)
        pipe = tmp_path / "pipe"
        diffusers = pytest.importorskip("diffusers")
        diffusers.UNet2DModel.from_pretrained(path).save_pretrained(pipe / "unet")
        diffusers.DDPMScheduler().save_pretrained(pipe / "scheduler")
        diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(4,), latent_channels=1,
                                norm_num_groups=4, sample_size=8).save_pretrained(pipe / "vae")
        return str(pipe), {}
    if fmt == "ddpm-pytorch":
        ddpm = pytest.importorskip("denoising_diffusion_pytorch")
        torch.manual_seed(0)
        unet = {"dim": 8, "dim_mults": [1, 2], "channels": 1}
        diffusion = ddpm.GaussianDiffusion(ddpm.Unet(**unet), image_size=8, timesteps=20, objective="pred_noise")
        torch.save({"step": 0, "model": diffusion.state_dict()}, str(tmp_path / "model-1.pt"))
        (tmp_path / "model-config.json").write_text(json.dumps({"unet": unet}))
        return str(tmp_path / "model-1.pt"), {}
    if fmt == "k-diffusion":
        K = pytest.importorskip("k_diffusion")
        config = K.config.load_config({"model": {
            "type": "image_v1", "input_channels": 1, "input_size": [8, 8], "mapping_out": 8, "depths": [1, 1],
            "channels": [4, 8], "self_attn_depths": [False, False], "sigma_min": 0.01, "sigma_max": 80},
            "dataset": {"type": "imagefolder"}})
        inner = K.config.make_model(config)
        torch.save({"config": config, "model": inner.state_dict(), "model_ema": inner.state_dict()},
                   str(tmp_path / "run.pth"))
        return str(tmp_path / "run.pth"), {}
    if fmt == "torchscript":
        torch.jit.script(net).save(str(tmp_path / "net.pt"))
        return str(tmp_path / "net.pt"), opts
    if fmt == "safetensors":
        save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
        return str(tmp_path / "w.safetensors"), {**opts, "factory": f"{factory}:build"}
    if fmt == "torch":
        torch.save(net.state_dict(), tmp_path / "w.pt")
        return str(tmp_path / "w.pt"), {**opts, "factory": f"{factory}:build"}
    raise AssertionError(f"no contract fixture for the model format {fmt!r}: add one here")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_model_format_is_detected_and_loads_as_a_denoiser(fmt, tmp_path):
    path, opts = make_checkpoint(fmt, tmp_path)
    assert detect_format(Path(path)) == fmt
    model = load_model(path, **opts)
    assert isinstance(model, Denoiser) and model.source["format"] == fmt
    assert 0 < model.sigma_min < model.sigma_max
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([model.sigma_min, 1.0, model.sigma_max]))
    assert out.shape == x.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------- feature spaces

def feature_spec(name: str, tmp_path: Path) -> str:
    if name == "pixels":
        return "pixels"
    if name == "torchscript":
        module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
        torch.jit.script(module).save(str(tmp_path / "f.pt"))
        return f"torchscript:{tmp_path / 'f.pt'}"
    if name == "resnet18":
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in ResNet18().state_dict().items()}, str(tmp_path / "r.safetensors"))
        return f"resnet18:{tmp_path / 'r.safetensors'}"
    if name == "inception":
        from memaudit.features import cleanfid_available, inception_cache_path

        if not (cleanfid_available() and inception_cache_path().is_file()):
            pytest.skip("clean-fid and its Inception weights are not on this machine")
        return "inception"
    raise AssertionError(f"no contract fixture for the feature space {name!r}: add one here")


@pytest.mark.parametrize("name", list(FEATURE_SPACES))
def test_every_feature_space_maps_images_to_batch_independent_features(name, tmp_path):
    space = feature_space(feature_spec(name, tmp_path), "cpu", (1, 8, 8))
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = space(x)
    assert feats.ndim == 2 and feats.shape[0] == 5 and feats.dtype == torch.float32 and feats.device.type == "cpu"
    torch.testing.assert_close(space(x[2:4]), feats[2:4], rtol=1e-4, atol=1e-5)


def test_resnet18_features_are_unit_norm_and_512_wide(tmp_path):
    space = feature_space(feature_spec("resnet18", tmp_path), "cpu", (3, 16, 16))
    feats = space(torch.rand(3, 3, 16, 16) * 2 - 1)
    assert feats.shape == (3, 512)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))


# ------------------------------------------------------------------------------------------- metrics

@pytest.fixture(scope="module")
def tiny_report(digits32_module):
    config = ScanConfig(num_samples=6, batch_size=6, samplers=("heun", "sde"), steps=4, trajectory_samples=6,
                        cosine_points=4, jacobian_points=2, jacobian_iters=2, metric_sigmas=3, fid="proxy",
                        index="ivf:nlist=2,nprobe=2")  # every cell scanned (exact), so index_recall writes its section
    return run_scan(EmpiricalDenoiser(digits32_module, temperature=2.0), digits32_module, config,
                    model_info={"spec": "empirical:T=2", "kind": "empirical", "sigma_min": 0.002,
                                "sigma_max": 80.0, "image_shape": [1, 8, 8]},
                    data_info={"path": "digits32", "num_images": 32, "image_shape": [1, 8, 8]}).report


@pytest.fixture(scope="module")
def digits32_module():
    with np.load(ROOT / "examples" / "digits" / "digits32.npz") as npz:
        return torch.from_numpy(npz["images"].astype(np.float32) / 127.5 - 1)[:, None]


@pytest.mark.parametrize("metric", METRICS, ids=[m.name for m in METRICS])
def test_every_metric_writes_a_valid_section_and_its_summary_keys(metric: Metric, tiny_report):
    assert metric.name and metric.scope in (RUN, SCAN) and metric.name in SKIP_CHOICES
    sections = metric.sections(tiny_report)
    assert sections, f"{metric.name} wrote no section"
    from memaudit.validation import Check

    if metric.scope == RUN:
        for name, section in sections.items():
            metric.validate(section, Check(), f"runs.{name}.{metric.name}")
        values = metric.summarize(sections)
    else:
        metric.validate(sections, Check(), metric.name)
        values = metric.summarize(sections)
    expected = set(metric.summary_keys) | {k.format(sampler=s) for k in metric.run_keys for s in ("heun", "sde")}
    assert set(values) == expected
    assert set(values) <= set(tiny_report["summary"])
    for key in values:
        assert key in summary_keys(["heun", "sde"])
    statements(tiny_report)  # the renderers' vocabulary holds for every metric
    metric.plots(tiny_report)
    for name in (tiny_report["runs"] if metric.scope == RUN else ()):
        metric.evidence(name, tiny_report["runs"][name][metric.name])


@pytest.mark.parametrize("metric", METRICS, ids=[m.name for m in METRICS])
def test_every_metric_can_be_skipped_and_its_gates_then_fail(metric: Metric, digits32_module):
    config = ScanConfig(num_samples=4, batch_size=4, samplers=("heun",), steps=3, trajectory_samples=4,
                        cosine_points=4, jacobian_points=2, jacobian_iters=2, metric_sigmas=3, fid="proxy",
                        skip=(metric.name,))
    report = run_scan(EmpiricalDenoiser(digits32_module), digits32_module, config,
                      model_info={"spec": "empirical", "kind": "empirical", "sigma_min": 0.002, "sigma_max": 80.0,
                                  "image_shape": [1, 8, 8]},
                      data_info={"path": "digits32", "num_images": 32, "image_shape": [1, 8, 8]}).report
    assert metric.sections(report) in ({}, None)
    validate_report(report)
    for key in metric.summary_keys:
        assert report["summary"][key] is None


def test_the_schema_doc_lists_every_metric_and_its_generated_summary_table():
    doc = (ROOT / "docs" / "report-schema.md").read_text()
    assert summary_table() in doc, "run: python -m memaudit.report.schema_doc docs/report-schema.md"
    for metric in METRICS:
        assert f"`{metric.name}`" in doc


# ---------------------------------------------------------------------------- parameterisations, schedules

@pytest.mark.parametrize("name", list(PARAMETERISATIONS))
def test_every_parameterisation_mixes_x_and_the_output_finitely(name):
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out = PARAMETERISATIONS[name].scalings(sigma, 0.5)
    assert torch.isfinite(c_skip).all() and torch.isfinite(c_out).all() and (c_out != 0).all()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_gives_finite_inputs_over_its_range(name):
    sched = make_schedule(name)
    sigma = torch.tensor([sched.sigma_min, math.sqrt(sched.sigma_min * sched.sigma_max), sched.sigma_max],
                         dtype=torch.float64)
    assert torch.isfinite(sched.c_in(sigma)).all() and torch.isfinite(sched.c_noise(sigma)).all()
    assert (sched.c_in(sigma) > 0).all()
