"""Loading checkpoints in every format: same D(x, sigma) across formats, safe unpickling, one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from memaudit.errors import UserError
from memaudit.models.adapters import NetworkDenoiser
from memaudit.models.load import check_model_on_data, load_model
from memaudit.models.native import CONFIG_NAME, save_native
from memaudit.models.schedules import make_schedule

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

MODULE = "memaudit_test_tinynet"
FACTORY_SOURCE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv -> + noise embedding -> tanh -> conv: a tiny scriptable net(x_in, noise_in)."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.inp = nn.Conv2d(channels, 8, 3, padding=1)
        self.emb = nn.Linear(4, 8)
        self.out = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x, noise_in):
        feats = torch.stack([torch.sin(noise_in / 100), torch.cos(noise_in / 100), torch.tanh(noise_in),
                             noise_in / 1000], dim=1)
        return self.out(torch.tanh(self.inp(x) + self.emb(feats)[:, :, None, None]))


class NaNNet(TinyNet):
    def forward(self, x, noise_in):
        return super().forward(x, noise_in) * float("nan")


def build():
    torch.manual_seed(0)
    return TinyNet(1)


def build_rgb():
    return TinyNet(3)


def build_nan():
    return NaNNet(1)


def build_with(channels=1, seed=0):
    torch.manual_seed(seed)
    return TinyNet(channels)


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = build()

    def forward(self, x, noise_in):
        return self.inner(x, noise_in)


class LearnedVariance(TinyNet):
    """Mean and variance channels, as guided-diffusion's learn_sigma nets return."""

    def forward(self, x, noise_in):
        out = super().forward(x, noise_in)
        return torch.cat([out, torch.full_like(out, 7.0)], dim=1)


def build_wrapped():
    return Wrapped()


def build_learned_variance():
    torch.manual_seed(0)
    return LearnedVariance(1)


def not_module():
    return 3


def raises():
    raise ValueError("boom")


def build_with_marker():
    import os
    open(os.environ["MEMAUDIT_TEST_MARKER"], "w").close()
    return build()
'''

SIGMAS = torch.tensor([0.02, 0.3, 1.0, 7.0])


@pytest.fixture(scope="session")
def factory_file(tmp_path_factory):
    """The tiny-network module on disk and importable as MODULE; yields its path."""
    folder = tmp_path_factory.mktemp("factory")
    path = folder / f"{MODULE}.py"
    path.write_text(FACTORY_SOURCE)
    sys.path.insert(0, str(folder))
    yield path
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


@pytest.fixture()
def tiny(factory_file):
    """(module, trained-looking TinyNet with perturbed weights, reference eps/vp-linear denoiser)."""
    module = __import__(MODULE)
    net = module.build()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module, net, NetworkDenoiser(net, "eps", make_schedule("vp-linear")).eval()


def inputs(channels=1, size=8):
    x = torch.randn(len(SIGMAS), channels, size, size, generator=torch.Generator().manual_seed(0))
    return x * (1 + SIGMAS[:, None, None, None])


def assert_same_denoiser(a, b, channels=1, size=8):
    x = inputs(channels, size)
    with torch.no_grad():
        torch.testing.assert_close(a(x, SIGMAS), b(x, SIGMAS), atol=1e-6, rtol=0)


# ---- the same model in every format -------------------------------------------------------------

def test_torchscript_statedict_and_native_give_the_same_denoiser(tiny, tmp_path, factory_file):
    _, net, reference = tiny
    opts = dict(param="eps", schedule="vp-linear")
    script = tmp_path / "model.pt"
    torch.jit.script(net).save(str(script))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    save_file(net.state_dict(), str(tmp_path / "weights.safetensors"))
    loaded = {
        "torchscript": load_model(str(script), **opts),
        "torch-statedict+module-factory": load_model(str(tmp_path / "weights.pt"), factory=f"{MODULE}:build",
                                                     **opts),
        "safetensors+file-factory": load_model(str(tmp_path / "weights.safetensors"),
                                               factory=f"{factory_file}:build", **opts),
    }
    for denoiser in loaded.values():
        assert_same_denoiser(denoiser, reference)
    for name, denoiser in loaded.items():
        folder = tmp_path / f"native-{name}"
        save_native(denoiser, folder)
        factory = denoiser.net.architecture["kwargs"].get("factory")
        assert_same_denoiser(load_model(str(folder), factory=factory), reference)
    assert loaded["torchscript"].source == {"format": "torchscript", "path": str(script)}


def test_native_round_trip_of_torchscript_keeps_fine_tuned_weights(tiny, tmp_path):
    _, net, _ = tiny
    torch.jit.script(net).save(str(tmp_path / "model.pt"))
    denoiser = load_model(str(tmp_path / "model.pt"), param="v", schedule="vp-cosine", sigma_max=100.0)
    with torch.no_grad():  # stand-in for fine-tuning: the native copy must carry the new weights
        for p in denoiser.parameters():
            p.mul_(1.5)
    save_native(denoiser, tmp_path / "native")
    assert (tmp_path / "native" / "network.pt").is_file()
    again = load_model(str(tmp_path / "native"))
    assert (again.param, again.schedule.kind, again.sigma_max) == ("v", "vp-cosine", 100.0)
    assert_same_denoiser(again, denoiser)
    save_native(again, tmp_path / "native2")  # a reloaded TorchScript model can be saved again
    assert_same_denoiser(load_model(str(tmp_path / "native2")), denoiser)


def test_pickled_module_loads_only_with_trust_pickle(tiny, tmp_path):
    _, net, reference = tiny
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(str(path), param="eps", schedule="vp-linear")
    assert_same_denoiser(load_model(str(path), param="eps", schedule="vp-linear", trust_pickle=True), reference)


# ---- diffusers ------------------------------------------------------------------------------------

def tiny_unet(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 norm_num_groups=8, layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def numpy_cosine_abar(n):
    f = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))


@pytest.mark.slow  # importing diffusers takes a few seconds
def test_diffusers_folder_matches_direct_unet_calls_and_survives_native(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet(diffusers).eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="v_prediction")
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    scheduler.save_pretrained(tmp_path / "pipe" / "scheduler")
    denoiser = load_model(str(tmp_path / "pipe"))
    assert (denoiser.param, denoiser.image_shape) == ("v", (1, 8, 8))
    abar = numpy_cosine_abar(100)
    # diffusers' own abar (float32, what its sampler uses), within float32 of the closed form
    np.testing.assert_array_equal(denoiser.schedule.alphas_cumprod.numpy(), scheduler.alphas_cumprod.numpy())
    np.testing.assert_allclose(denoiser.schedule.alphas_cumprod.numpy(), abar, rtol=1e-4)

    steps = [0, 3, 50, 99]
    a = scheduler.alphas_cumprod[steps][:, None, None, None]
    sigma = torch.sqrt((1 - a) / a).flatten()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * (1 + sigma[:, None, None, None])
    with torch.no_grad():
        x_t = torch.sqrt(a) * x  # VP input x / sqrt(1 + sigma^2)
        v = unet(x_t, torch.tensor(steps, dtype=torch.float32)).sample
        expected = torch.sqrt(a) * x_t - torch.sqrt(1 - a) * v  # x0 = sqrt(a) x_t - sqrt(1 - a) v
        expected = expected.clamp(-1, 1)  # DDPMScheduler's default clip_sample=True, as its step clips x0
        torch.testing.assert_close(denoiser(x, sigma), expected, atol=1e-4, rtol=1e-4)

    save_native(denoiser, tmp_path / "native")
    config = json.loads((tmp_path / "native" / CONFIG_NAME).read_text())
    assert config["architecture"]["name"] == "diffusers" and len(config["alphas_cumprod"]) == 100
    again = load_model(str(tmp_path / "native"))
    assert torch.equal(again.schedule.alphas_cumprod, denoiser.schedule.alphas_cumprod)
    assert (again.sigma_min, again.sigma_max) == (denoiser.sigma_min, denoiser.sigma_max)
    assert_same_denoiser(again, denoiser)

    flat = tmp_path / "flat"  # UNet folder with scheduler_config.json beside it, linear betas, epsilon
    unet.save_pretrained(flat)
    diffusers.DDPMScheduler().save_pretrained(flat)
    eps_model = load_model(str(flat))
    assert eps_model.param == "eps"
    torch.testing.assert_close(eps_model.schedule.alphas_cumprod, make_schedule("vp-linear").alphas_cumprod,
                               rtol=1e-4, atol=0)  # diffusers' float32 cumprod of DDPM's linear betas
    assert eps_model.x0_limit.describe() == "x0 clipped to [-1, 1]"  # DDPMScheduler's default clip_sample=True
    save_native(eps_model, tmp_path / "n2")  # the float32 schedule and the clipping survive a native round trip
    again = load_model(str(tmp_path / "n2"))
    assert torch.equal(again.schedule.alphas_cumprod, eps_model.schedule.alphas_cumprod)
    assert again.x0_limit == eps_model.x0_limit


def test_diffusers_missing_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 1}))
    (tmp_path / "m" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UserError, match=r"memaudit\[diffusers\]"):
        load_model(str(tmp_path / "m"))


def test_diffusers_conditional_unet_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError, match="UNet2DConditionModel"):
        load_model(str(tmp_path))


# ---- security ------------------------------------------------------------------------------------

class Malicious:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def write_malicious(path: Path, marker: Path, writer: str) -> None:
    payload = {"weight": torch.zeros(2), "evil": Malicious(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_runs_no_code(tmp_path, writer, factory_file):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    write_malicious(path, marker, writer)
    for kwargs in ({}, {"param": "eps", "schedule": "vp-linear"}, {"factory": f"{MODULE}:build"}):
        with pytest.raises(UserError, match="refused to unpickle.*--trust-pickle") as err:
            load_model(str(path), **kwargs)
        assert "\n" not in str(err.value)
        assert not marker.exists()

    # Control: an unrestricted unpickle of such a file does run its payload (a harmless `touch` here).
    control, control_marker = tmp_path / "control.pt", tmp_path / "control-ran"
    write_malicious(control, control_marker, writer)
    if writer == "torch.save":
        torch.load(control, weights_only=False)
    else:
        pickle.loads(control.read_bytes())
    assert control_marker.exists() and not marker.exists()


def test_native_factory_checkpoint_needs_the_user_to_name_the_factory(tiny, tmp_path, factory_file,
                                                                       monkeypatch):
    _, net, reference = tiny
    marker = tmp_path / "factory-ran"
    monkeypatch.setenv("MEMAUDIT_TEST_MARKER", str(marker))
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    spec = f"{MODULE}:build_with_marker"
    denoiser = load_model(str(tmp_path / "w.safetensors"), factory=spec, param="eps", schedule="vp-linear")
    save_native(denoiser, tmp_path / "native")
    marker.unlink()
    with pytest.raises(UserError, match=f"pass --factory {spec}"):
        load_model(str(tmp_path / "native"))
    assert not marker.exists()
    assert_same_denoiser(load_model(str(tmp_path / "native"), factory=spec), reference)


# ---- one-line errors ------------------------------------------------------------------------------

def one_line_error(match, spec, **kwargs):
    with pytest.raises(UserError, match=match) as err:
        load_model(str(spec), **kwargs)
    assert "\n" not in str(err.value)


def test_path_and_format_errors(tiny, tmp_path):
    _, net, _ = tiny
    one_line_error("model not found", tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    one_line_error("unknown model folder", tmp_path / "empty")
    (tmp_path / "junk.bin").write_bytes(b"this is not a checkpoint at all")
    one_line_error("not a readable torch checkpoint", tmp_path / "junk.bin")
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    one_line_error("pass --factory", tmp_path / "sd.pt")
    save_file(net.state_dict(), str(tmp_path / "sd.safetensors"))
    one_line_error("pass --factory", tmp_path / "sd.safetensors")
    torch.jit.script(net).save(str(tmp_path / "ts.pt"))
    one_line_error(r"torchscript model .*--param eps\|x0\|v\|score\|edm and --schedule vp-linear\|vp-scaled-linear\|vp-cosine",
                   tmp_path / "ts.pt")
    one_line_error("--factory does not apply", tmp_path / "ts.pt", factory=f"{MODULE}:build", param="eps",
                   schedule="ve")
    one_line_error("unknown parameterisation", tmp_path / "ts.pt", param="eps2", schedule="ve")
    one_line_error("unknown schedule", tmp_path / "ts.pt", param="eps", schedule="vp")
    one_line_error("invalid sigma range", tmp_path / "ts.pt", param="eps", schedule="ve", sigma_min=5,
                   sigma_max=1)


def test_factory_errors(tiny, tmp_path, factory_file):
    _, net, _ = tiny
    torch.save({"ema": net.state_dict(), "step": 10}, tmp_path / "ckpt.pt")
    path, opts = tmp_path / "ckpt.pt", dict(param="eps", schedule="vp-linear")
    one_line_error("bad --factory", path, factory="no_colon", **opts)
    one_line_error("cannot import factory module 'no_such_module_xyz'", path, factory="no_such_module_xyz:f",
                   **opts)
    one_line_error("no callable 'nope'", path, factory=f"{MODULE}:nope", **opts)
    one_line_error("returned int, not a torch.nn.Module", path, factory=f"{MODULE}:not_module", **opts)
    one_line_error("failed: ValueError: boom", path, factory=f"{MODULE}:raises", **opts)
    one_line_error("factory file not found", path, factory=str(tmp_path / "missing.py") + ":build", **opts)
    one_line_error(r"does not match the network: shape mismatch inp.weight \(8, 1, 3, 3\) vs \(8, 3, 3, 3\)",
                   path, factory=f"{MODULE}:build_rgb", **opts)
    torch.save({"inp.weight": torch.zeros(1), "extra": torch.zeros(1)}, tmp_path / "partial.pt")
    one_line_error("missing keys inp.bias, emb.weight, emb.bias \\(\\+2 more\\); unexpected keys extra",
                   tmp_path / "partial.pt", factory=f"{MODULE}:build", **opts)
    load_model(str(path), factory=f"{MODULE}:build", **opts)  # the EMA state dict nested in a dict loads


def test_native_options_are_checked_and_applied(tiny, tmp_path):
    _, net, _ = tiny
    torch.jit.script(net).save(str(tmp_path / "ts.pt"))
    save_native(load_model(str(tmp_path / "ts.pt"), param="eps", schedule="vp-linear"), tmp_path / "n")
    one_line_error("trained with --param eps", tmp_path / "n", param="v")
    one_line_error("trained with --schedule vp-linear", tmp_path / "n", schedule="edm")
    denoiser = load_model(str(tmp_path / "n"), param="eps", sigma_min=0.1, sigma_max=20.0, round_timesteps=True)
    assert (denoiser.sigma_min, denoiser.sigma_max, denoiser.schedule.round_timesteps) == (0.1, 20.0, True)


def test_check_model_on_data(tiny, tmp_path, factory_file):
    _, net, reference = tiny
    check_model_on_data(reference, (1, 8, 8))
    with pytest.raises(UserError, match="image shape mismatch.*3x8x8") as err:
        check_model_on_data(reference, (3, 8, 8))
    assert "\n" not in str(err.value)
    reference.image_shape = (1, 8, 8)
    with pytest.raises(UserError, match="image shape mismatch: the model expects 1x8x8"):
        check_model_on_data(reference, (1, 16, 16))
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    nan_model = load_model(str(tmp_path / "w.safetensors"), factory=f"{MODULE}:build_nan", param="eps",
                           schedule="edm")
    with pytest.raises(UserError, match="NaN/inf"):
        check_model_on_data(nan_model, (1, 8, 8))


def test_empirical_spec_builds_the_closed_form_denoiser():
    from memaudit.empirical import EmpiricalDenoiser

    train = torch.rand(6, 1, 4, 4) * 2 - 1
    denoiser = load_model("empirical:T=2,k=3", train=train)
    assert isinstance(denoiser, EmpiricalDenoiser)
    check_model_on_data(denoiser, (1, 4, 4))
    assert isinstance(load_model("empirical", train=train), EmpiricalDenoiser)
    with pytest.raises(UserError, match="training data"):
        load_model("empirical")


def test_kdiffusion_checkpoint_without_the_library_is_a_clear_error(tmp_path, monkeypatch):
    """Detected from its pickle's names alone; loading says how to install k-diffusion."""
    path = tmp_path / "run_00001000.pth"
    state = {"proj_in.weight": torch.zeros(4, 1, 1, 1)}
    torch.save({"config": {"model": {"type": "image_v1"}}, "model": state, "model_ema": state}, str(path))
    from memaudit.models.load import detect_format

    assert detect_format(path) == "k-diffusion"
    monkeypatch.setitem(sys.modules, "k_diffusion", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'memaudit\[kdiffusion\]'"):
        load_model(str(path))


# ---- the generic paths: --factory-args, --schedule parameters, prefixes, plain pickles --------------------------

def test_factory_args_inline_or_file_and_kept_by_native(tiny, tmp_path, factory_file):
    _, net, _ = tiny
    rgb = __import__(MODULE).build_with(channels=3, seed=4)
    save_file(rgb.state_dict(), str(tmp_path / "rgb.safetensors"))
    reference = NetworkDenoiser(rgb, "eps", make_schedule("vp-linear")).eval()
    opts = dict(factory=f"{MODULE}:build_with", param="eps", schedule="vp-linear")
    inline = load_model(str(tmp_path / "rgb.safetensors"), factory_args='{"channels": 3, "seed": 1}', **opts)
    assert_same_denoiser(inline, reference, channels=3)
    (tmp_path / "args.json").write_text(json.dumps({"channels": 3}))
    assert_same_denoiser(load_model(str(tmp_path / "rgb.safetensors"), factory_args=str(tmp_path / "args.json"),
                                    **opts), reference, channels=3)
    save_native(inline, tmp_path / "native")
    again = load_model(str(tmp_path / "native"), factory=f"{MODULE}:build_with")
    assert_same_denoiser(again, reference, channels=3)
    for args, message in (('{"channels": 3', "--factory-args .* is not valid JSON"),
                          ("[3]", "not a readable file"), ('{"nope": 1}', "failed: TypeError")):
        with pytest.raises(UserError, match=message):
            load_model(str(tmp_path / "rgb.safetensors"), factory_args=args, **opts)
    with pytest.raises(UserError, match="pass --factory too"):
        load_model(str(tmp_path / "rgb.safetensors"), factory_args="{}", param="eps", schedule="vp-linear")


@pytest.mark.parametrize("spec,betas", [
    ("vp-linear:beta_start=2e-4,beta_end=0.03,steps=50", lambda: np.linspace(2e-4, 0.03, 50)),
    ("vp-scaled-linear", lambda: np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2),
    ("vp-scaled-linear:beta_start=1e-3,beta_end=0.02,steps=10", lambda: np.linspace(1e-3**0.5, 0.02**0.5, 10) ** 2),
    ("vp-cosine:steps=20", lambda: np.minimum([1 - np.cos(((i + 1) / 20 + 0.008) / 1.008 * np.pi / 2) ** 2
                                               / np.cos((i / 20 + 0.008) / 1.008 * np.pi / 2) ** 2
                                               for i in range(20)], 0.999)),
])
def test_schedule_parameters_give_the_closed_form_betas(spec, betas):
    np.testing.assert_allclose(make_schedule(spec).alphas_cumprod.numpy(), np.cumprod(1 - betas()), rtol=1e-12)


def test_schedule_parameter_errors_and_sigma_data():
    assert make_schedule("edm:sigma_data=1").sigma_data == 1.0
    for spec, message in (("vp-linear:steps=1", "steps must be an integer >= 2"),
                          ("vp-linear:beta_end=x", "beta_end must be a number"),
                          ("vp-linear:beta_start=0.1,beta_end=0.01", "beta_start < beta_end"),
                          ("ve:steps=10", "not name=value with a name of ve's: sigma_data"),
                          ("vp-quadratic", "unknown schedule 'vp-quadratic'")):
        with pytest.raises(UserError, match=message):
            make_schedule(spec)


def test_key_prefix_mismatch_names_the_prefix(tiny, tmp_path, factory_file):
    _, net, _ = tiny
    prefixed = {f"model.{k}": v for k, v in net.state_dict().items()}
    save_file(prefixed, str(tmp_path / "prefixed.safetensors"))
    with pytest.raises(UserError, match="carry the prefix 'model.' that the network's lack: strip it"):
        load_model(str(tmp_path / "prefixed.safetensors"), factory=f"{MODULE}:build", param="eps", schedule="ve")
    save_file(net.state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="network's keys carry the prefix 'inner.' that the file's lack: add it"):
        load_model(str(tmp_path / "plain.safetensors"), factory=f"{MODULE}:build_wrapped", param="eps", schedule="ve")


def test_learned_variance_output_uses_its_mean_channels(tiny, tmp_path, factory_file):
    module = __import__(MODULE)
    net = module.build_learned_variance()
    save_file(net.state_dict(), str(tmp_path / "lv.safetensors"))
    model = load_model(str(tmp_path / "lv.safetensors"), factory=f"{MODULE}:build_learned_variance", param="eps",
                       schedule="vp-linear")
    mean_only = NetworkDenoiser(module.TinyNet(1), "eps", make_schedule("vp-linear")).eval()
    mean_only.net.load_state_dict(net.state_dict())
    assert_same_denoiser(model, mean_only)


def test_plain_pickle_snapshot_loads_only_with_trust_pickle(tiny, tmp_path):
    """EDM's network-snapshot-*.pkl: pickle.dump of a dict holding the network under 'ema'."""
    _, net, reference = tiny
    path = tmp_path / "network-snapshot-000100.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"ema": net, "augment_pipe": None}, fh)
    with pytest.raises(UserError, match="arbitrary code.*--trust-pickle"):
        load_model(str(path), param="eps", schedule="vp-linear")
    assert_same_denoiser(load_model(str(path), param="eps", schedule="vp-linear", trust_pickle=True), reference)
