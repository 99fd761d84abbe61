"""Latent diffusion models (memaudit.models.latent, memaudit.latents, memaudit.latent_scan, metrics.decoded):
a tiny AutoencoderKL trained here on the bundled digits, a tiny UNet on its latents, saved as a pipeline folder.

D in latent space is checked against diffusers' own DDPMScheduler.step x0, encode/decode against the VAE's own
API, the decoded pixel-space NN ratios against a numpy brute-force computation on the decoded samples, the
training-latent cache against re-encoding, and memorizing against generalizing latent models."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from memaudit.empirical import EmpiricalDenoiser
from memaudit.errors import UserError
from memaudit.latent_scan import run_latent_scan
from memaudit.latents import train_latents
from memaudit.models.latent import Autoencoder, LatentModel, is_latent
from memaudit.models.load import load_model
from memaudit.report.schema import validate_report
from memaudit.scan import ScanConfig

pytestmark = pytest.mark.slow  # diffusers import and a few seconds of training
diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
DIGITS32 = ROOT / "examples" / "digits" / "digits32.npz"


def example():
    spec = importlib.util.spec_from_file_location("make_latent_model",
                                                  ROOT / "examples" / "latent" / "make_latent_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(folder, vae, unet, scheduler, pixel training images): a latent model trained in a few seconds."""
    ex = example()
    images = ex.digits(32)
    torch.manual_seed(0)
    vae = ex.train_vae(images, steps=120)
    unet, scheduler = ex.train_unet(ex.encode(vae, images), steps=20)
    folder = tmp_path_factory.mktemp("latent") / "pipe"
    ex.save_pipeline(folder, unet, scheduler, vae)
    return folder, vae, unet, scheduler, images


def small_config(**kw):
    base = dict(num_samples=12, batch_size=12, samplers=("heun",), steps=8, trajectory_samples=4, cosine_points=4,
                jacobian_points=2, jacobian_iters=2, metric_sigmas=3)
    return ScanConfig(**{**base, **kw})


def scan_info(model):
    return dict(model_info={"spec": "test", "kind": "latent", "sigma_min": float(model.sigma_min),
                            "sigma_max": float(model.sigma_max), "image_shape": list(model.image_shape)},
                data_info={"path": "digits32", "num_images": 32, "image_shape": [1, 8, 8]})


def numpy_nn_ratio(samples: np.ndarray, train: np.ndarray) -> np.ndarray:
    """d1/d2 by brute force: L2 distances of each flattened sample to every training image, two smallest."""
    s, t = samples.reshape(len(samples), -1).astype(np.float64), train.reshape(len(train), -1).astype(np.float64)
    d = np.sqrt(((s[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    d.sort(axis=1)
    return d[:, 0] / d[:, 1]


def test_latent_D_equals_the_unet_plus_diffusers_scheduler_x0_at_several_sigmas(built):
    folder, vae, unet, scheduler, _ = built
    model = load_model(str(folder))
    assert is_latent(model) and model.image_shape == (4, 4, 4) and model.param == "eps"
    steps = [0, 7, 60, 150, 199]
    a = scheduler.alphas_cumprod[steps].double()
    sigma = torch.sqrt((1 - a) / a).float()
    x = torch.randn(len(steps), 4, 4, 4, generator=torch.Generator().manual_seed(3)) * (1 + sigma[:, None, None, None])
    with torch.no_grad():
        got = model(x, sigma)
        for i, t in enumerate(steps):
            x_t = x[i:i + 1] / torch.sqrt(1 + sigma[i] ** 2)  # the VP input
            eps = unet(x_t, torch.tensor([t])).sample
            x0 = scheduler.step(eps, t, x_t).pred_original_sample  # diffusers' own x0 (clip_sample=False)
            torch.testing.assert_close(got[i:i + 1], x0, atol=1e-5, rtol=1e-5)


def test_encode_and_decode_are_the_vaes_own_api_with_the_scaling_factor(built):
    folder, vae, _, _, images = built
    model = load_model(str(folder))
    s = vae.config.scaling_factor
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean * s
        torch.testing.assert_close(model.encode(images), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(z), vae.decode(z / s).sample, atol=1e-5, rtol=1e-5)
    ae = model.autoencoder
    assert (ae.kind, ae.scale, ae.scale_source) == ("AutoencoderKL", pytest.approx(s), "config")


def test_vqmodel_encodes_before_and_decodes_through_the_quantiser(tmp_path):
    torch.manual_seed(1)
    vq = diffusers.VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=2,
                           norm_num_groups=4, num_vq_embeddings=16, sample_size=8, scaling_factor=0.7).eval()
    vq.save_pretrained(tmp_path / "vqvae")
    from memaudit.models.latent import load_autoencoder

    ae = load_autoencoder(tmp_path / "vqvae", None, "cpu")
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vq.encode(x).latents * 0.7
        torch.testing.assert_close(ae.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ae.decode(z), vq.decode(z / 0.7).sample, atol=1e-5, rtol=1e-5)  # quantised
    assert ae.kind == "VQModel" and ae.latent_shape((1, 8, 8)) == (2, 4, 4)


def test_decoded_nn_ratios_equal_numpy_on_the_decoded_samples(built, tmp_path):
    folder, vae, _, _, images = built
    model = load_model(str(folder))
    result = run_latent_scan(model, images, small_config(), workdir=tmp_path, **scan_info(model))
    validate_report(result.report)
    section = result.report["runs"]["heun"]["decoded"]
    decoded = result.samples["heun"]
    assert section["computed"] and decoded.shape == (12, 1, 8, 8)
    expected = numpy_nn_ratio(decoded.numpy(), images.numpy())
    np.testing.assert_allclose([s["ratio"] for s in section["samples"]], expected, rtol=1e-4, atol=1e-6)
    assert section["memorized_fraction"] == pytest.approx(float(np.mean(expected < 1 / 3)))
    assert result.report["summary"]["decoded_memorized_fraction"] == section["memorized_fraction"]
    # every other metric is in latent space: the latent NN ratio is against the encoded training set
    latent = result.report["runs"]["heun"]["nn_ratio"]
    assert result.report["data"]["latents"]["shape"] == [4, 4, 4]
    assert "diffmemorize" not in result.report["runs"]["heun"] and "fid" not in result.report
    assert len(latent["samples"]) == 12


def test_the_scan_tells_a_memorizing_latent_model_from_a_generalizing_one(built, tmp_path):
    _, vae, _, _, images = built
    ae = Autoencoder(vae, "AutoencoderKL", vae.config.scaling_factor, 0.0, "vae", "config")
    ex = example()
    others = ex.digits(400)[200:]  # other digits: a model that learned digits, not these 32
    reports = {}
    for name, points in (("memorizing", images), ("generalizing", others)):
        model = LatentModel(EmpiricalDenoiser(ae.encode(points)), ae)
        result = run_latent_scan(model, images, small_config(num_samples=24, batch_size=24), workdir=tmp_path,
                                 **scan_info(model))
        reports[name] = result.report["summary"]
    # (a sample may decode a training latent imperfectly enough to miss the 1/3 rule: the pixel rule is stricter)
    assert reports["memorizing"]["decoded_memorized_fraction"] > 0.9
    assert reports["memorizing"]["memorized_fraction"] == 1.0  # latent space: every sample is a training latent
    assert reports["generalizing"]["decoded_memorized_fraction"] < 0.15
    assert reports["generalizing"]["decoded_memorized_fraction_upper"] < reports["memorizing"][
        "decoded_memorized_fraction_lower"]


def test_training_latents_are_cached_reused_and_invalidated_when_the_data_change(built, tmp_path):
    folder, _, _, _, images = built
    ae = load_model(str(folder)).autoencoder
    first = train_latents(ae, images, tmp_path)
    again = train_latents(ae, images, tmp_path)
    assert not first.reused and again.reused and again.path == first.path
    torch.testing.assert_close(again.latents, ae.encode(images))
    changed = images.clone()
    changed[0, 0, 0, 0] = 1.0 - changed[0, 0, 0, 0]
    other = train_latents(ae, changed, tmp_path)
    assert not other.reused and other.path != first.path
    first.path.write_bytes(b"damaged")  # a damaged file is re-encoded, with a note
    notes = []
    fresh = train_latents(ae, images, tmp_path, notes.append)
    assert not fresh.reused and notes and "not using the cached latents" in notes[0]
    torch.testing.assert_close(fresh.latents, first.latents)


def test_cli_scans_a_latent_folder_end_to_end_and_reuses_the_cached_latents(built, tmp_path, capsys):
    folder = built[0]
    args = ["scan", folder, DIGITS32, "-n", "8", "--steps", "6", "--sampler", "heun", "--workdir", tmp_path / "wd",
            "--skip", "jacobian", "-q"]
    code, out, err = run_cli(capsys, *args, "--json", tmp_path / "a.json")
    assert code == 0, err
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["data"]["latents"]["cache"] == "encoded" and report["model"]["latent"]["vae"] == "AutoencoderKL"
    assert report["runs"]["heun"]["decoded"]["computed"] and "decoded pixel space" in out
    code, _, err = run_cli(capsys, *args, "--json", tmp_path / "b.json")
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["data"]["latents"]["cache"] == "reused"
    code, _, err = run_cli(capsys, *args, "--limit", "30", "--json", tmp_path / "c.json")
    assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["data"]["latents"]["cache"] == "encoded"


def test_cli_gate_on_the_decoded_fraction_fails_a_memorizing_latent_model(built, tmp_path, capsys):
    vae_dir = built[0] / "vae"
    common = [DIGITS32, "-n", "12", "--steps", "8", "--sampler", "heun", "--skip", "jacobian", "-q",
              "--workdir", tmp_path, "--fail-on", "decoded_memorized_fraction_upper>0.5"]
    code, out, err = run_cli(capsys, "scan", "empirical", *common, "--vae", vae_dir)
    assert code == 1, err  # the empirical denoiser of the latents copies training images
    code, out, err = run_cli(capsys, "scan", built[0], *common)
    assert code == 0, err  # the briefly trained UNet does not
    code, out, err = run_cli(capsys, "scan", "empirical", *common, "--json", tmp_path / "pixel.json")
    gate = json.loads((tmp_path / "pixel.json").read_text())["gates"][0]  # a pixel model: not measured, fails closed
    assert code == 1 and gate["value"] is None and "unavailable" in gate["reason"]


def test_inspect_prints_the_detected_latent_settings(built, capsys):
    folder, vae, _, _, _ = built
    code, out, err = run_cli(capsys, "inspect", folder)
    assert code == 0, err
    assert "AutoencoderKL" in out and f"{vae.config.scaling_factor:g} (from config)" in out
    assert "latent shape:     4x4x4" in out and "decoded shape:    1x8x8" in out and "forward check:    passed" in out
    code, out, _ = run_cli(capsys, "inspect", folder, "--json")
    latent = json.loads(out)["latent"]
    assert (latent["latent_shape"], latent["decoded_shape"]) == ([4, 4, 4], [1, 8, 8])
    code, out, _ = run_cli(capsys, "inspect", folder, "--latent-scale", "0.5")
    assert "0.5 (from --latent-scale)" in out


def test_a_vae_config_without_scaling_factor_is_refused_naming_latent_scale(built, tmp_path, capsys):
    folder = built[0]
    vae_dir = tmp_path / "vae"
    built[1].save_pretrained(vae_dir)
    config = json.loads((vae_dir / "config.json").read_text())
    del config["scaling_factor"]
    (vae_dir / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "inspect", folder / "unet", "--vae", vae_dir)
    assert code == 2 and "--latent-scale" in err and "scaling_factor" in err
    code, out, err = run_cli(capsys, "inspect", folder / "unet", "--vae", vae_dir, "--latent-scale", "0.6")
    assert code == 0, err
    assert "latent (diffusers + --vae)" in out


def test_wrong_autoencoder_data_or_flags_are_one_line_errors_naming_the_flag(built, tmp_path, capsys):
    folder = built[0]
    torch.manual_seed(0)
    other = example().tiny_vae(latent_channels=2)
    other.register_to_config(scaling_factor=1.0)
    other.save_pretrained(tmp_path / "vae2")
    code, _, err = run_cli(capsys, "inspect", folder, "--vae", tmp_path / "vae2")
    assert code == 2 and "--vae" in err and "Traceback" not in err
    rgb = np.zeros((4, 8, 8, 3), np.uint8) + np.arange(4, dtype=np.uint8)[:, None, None, None] * 60
    np.save(tmp_path / "rgb.npy", rgb)
    code, _, err = run_cli(capsys, "scan", folder, tmp_path / "rgb.npy", "-n", "2", "-q", "--workdir", tmp_path)
    assert code == 2 and "--channels 1" in err
    code, _, err = run_cli(capsys, "scan", folder, DIGITS32, "-n", "2", "-q", "--features", "inception",
                           "--workdir", tmp_path)
    assert code == 2 and "--features" in err
    code, _, err = run_cli(capsys, "inspect", folder / "unet", "--latent-scale", "0.5")
    assert code == 2 and "--vae" in err
    with pytest.raises(UserError, match="--vae"):
        load_model(str(folder), vae=str(tmp_path / "nothing"))
    code, _, err = run_cli(capsys, "scan", folder / "unet", DIGITS32, "-n", "2", "-q", "--workdir", tmp_path)
    assert code == 2 and "UNet of a latent pipeline" in err and f"--vae {folder / 'vae'}" in err


def test_a_suspect_scaling_factor_is_warned_of_and_smooth_refuses_latent_models(built, tmp_path, capsys):
    folder = built[0]
    code, _, err = run_cli(capsys, "scan", "empirical", DIGITS32, "--vae", folder / "vae", "--latent-scale", "20",
                           "-n", "4", "--steps", "4", "--sampler", "heun", "--skip", "jacobian", "-q",
                           "--workdir", tmp_path)
    assert code == 0 and "warning: the training latents have std" in err and "--latent-scale" in err
    code, _, err = run_cli(capsys, "smooth", folder, DIGITS32, "--out", tmp_path / "out", "-q")
    assert code == 2 and "latent" in err


def test_a_latent_scan_resumes_from_its_saved_latent_samples(built, tmp_path):
    folder, _, _, _, images = built
    model = load_model(str(folder))
    first = run_latent_scan(model, images, small_config(skip=("jacobian",)), workdir=tmp_path, **scan_info(model))
    again = run_latent_scan(model, images, small_config(skip=("jacobian",)), workdir=tmp_path, resume=True,
                            **scan_info(model))
    assert again.report["provenance"]["runs"]["heun"]["resumed_samples"] == 12
    torch.testing.assert_close(again.samples["heun"], first.samples["heun"])
    assert again.report["runs"]["heun"]["decoded"] == first.report["runs"]["heun"]["decoded"]


def test_a_latent_models_memorized_fraction_gates_read_the_worse_of_both_spaces():
    from memaudit.latent_scan import worse_of_both

    summary = {"memorized_fraction": 0.1, "memorized_fraction_lower": 0.05, "memorized_fraction_upper": 0.2,
               "memorized_fraction_heun": 0.1, "decoded_memorized_fraction": 0.4,
               "decoded_memorized_fraction_lower": None, "decoded_memorized_fraction_upper": 0.1,
               "decoded_memorized_fraction_heun": 0.4, "mean_nn_ratio": 0.7}
    worse_of_both(summary, ["heun"])
    assert summary["memorized_fraction"] == 0.4 and summary["memorized_fraction_heun"] == 0.4
    assert summary["memorized_fraction_lower"] == 0.05  # the pixel value is missing: the latent one stands
    assert summary["memorized_fraction_upper"] == 0.2 and summary["mean_nn_ratio"] == 0.7
    assert summary["decoded_memorized_fraction"] == 0.4  # each space's own value is kept
