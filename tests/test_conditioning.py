"""Class-conditional models (memaudit.conditioning, memaudit.class_scan, the per_class metric): labels from the data,
D(x, sigma, c) of each format against the network computed directly, and a scan's per-class fractions against a
numpy NN ratio on the samples the scan drew."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli
from digits import DIGITS_NPZ
from memaudit.conditioning import ClassBound
from memaudit.data import load_dataset
from memaudit.errors import UserError
from memaudit.models import statedict
from memaudit.models.adapters import NetworkDenoiser
from memaudit.models.load import load_model
from memaudit.models.native import load_native, make_unet_denoiser, save_native
from memaudit.models.schedules import make_schedule
from memaudit.scan import run_scan

FACTORY = f"{Path(__file__).with_name('cond_nets.py')}:build"
SIGMAS = (0.01, 0.3, 2.0, 20.0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "cache"))


def digits_of(digit: int) -> np.ndarray:
    with np.load(DIGITS_NPZ) as npz:
        return npz["images"][npz["labels"] == digit]


@pytest.fixture
def two_digits(tmp_path):
    """Training data: 4 zeros (class 0) and 40 ones (class 1); a model whose class 0 is the empirical denoiser of
    those 4 zeros (it memorizes) and whose class 1 is that of 40 other ones (its copies are of unseen images)."""
    zeros, ones = digits_of(0)[:4], digits_of(1)
    train = np.concatenate([zeros, ones[:40]])
    labels = np.array([0] * 4 + [1] * 40)
    np.savez(tmp_path / "two.npz", images=train, labels=labels)
    points = np.concatenate([zeros, ones[40:80]])
    net = statedict.build_network(FACTORY, {"num_points": len(points)})
    net.points.copy_(torch.from_numpy(points.astype(np.float32) / 127.5 - 1)[:, None])
    net.point_labels.copy_(torch.tensor([0] * 4 + [1] * 40))
    save_native(NetworkDenoiser(net, "x0", make_schedule("ve"), image_shape=(1, 8, 8), num_classes=2),
                tmp_path / "model")
    return tmp_path / "model", tmp_path / "two.npz", train, labels


def nn_ratio_numpy(samples: np.ndarray, train: np.ndarray) -> np.ndarray:
    """d1/d2 by brute force in float64 (no duplicates in these training sets)."""
    d = np.sqrt(((samples[:, None].astype(np.float64) - train[None].astype(np.float64)) ** 2).sum(-1))
    d.sort(axis=1)
    return d[:, 0] / d[:, 1]


def test_scan_reports_per_class_fractions_matching_numpy(two_digits, tmp_path, capsys, monkeypatch):
    model, data, train, labels = two_digits
    import memaudit.cli.scan as cli_scan
    results = []

    def capture(*args, **kwargs):  # keep the ScanResult (with its samples) the CLI gets
        results.append(run_scan(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(cli_scan, "run_scan", capture)
    code, out, err = run_cli(capsys, "scan", model, data, "--factory", FACTORY, "--samples", "24", "--steps", "12",
                             "--sampler", "heun", "--dup-tol", "0", "--quiet", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "skipped for a class-conditional model" in err
    report = json.loads((tmp_path / "r.json").read_text())
    section = report["per_class"]
    samples = results[0].samples["heun"].flatten(1).numpy()
    train_x = (train.reshape(len(train), -1).astype(np.float32) / 127.5 - 1)
    assert len(np.unique(train_x, axis=0)) == len(train_x)
    assert report["settings"]["class_samples"] == {"0": 12, "1": 12}
    fractions = {}
    for entry in section["runs"]["heun"]:
        c = entry["class"]
        rows = np.array([s["index"] for s in entry["samples"]])
        assert len(rows) == 12
        within = nn_ratio_numpy(samples[rows], train_x[labels == c])
        overall = nn_ratio_numpy(samples[rows], train_x)
        np.testing.assert_allclose([s["ratio"] for s in entry["samples"]], within, atol=1e-4)
        np.testing.assert_allclose([s["overall_ratio"] for s in entry["samples"]], overall, atol=1e-4)
        assert entry["memorized_fraction"] == pytest.approx(np.mean(within < 1 / 3))
        assert entry["overall_memorized_fraction"] == pytest.approx(np.mean(overall < 1 / 3))
        fractions[c] = entry["memorized_fraction"]
    assert fractions[0] == 1.0 and fractions[1] <= 0.25  # the 4-image class is copied, the other is not
    assert report["summary"]["class_memorized_fraction_max"] == 1.0
    assert "memorized per class" in out and "class 0: heun 100.0%" in out


def test_inspect_prints_the_conditioning(two_digits, capsys):
    model = two_digits[0]
    code, out, err = run_cli(capsys, "inspect", model, "--factory", FACTORY)
    assert code == 0, err
    assert "conditioning:     class-conditional, 2 classes" in out
    code, out, err = run_cli(capsys, "inspect", model, "--factory", FACTORY, "--json")
    assert json.loads(out)["num_classes"] == 2


def test_conditional_model_needs_labels_in_the_data(two_digits, tmp_path, capsys):
    model, _, train, _ = two_digits
    np.savez(tmp_path / "bare.npz", images=train)
    code, _, err = run_cli(capsys, "scan", model, tmp_path / "bare.npz", "--factory", FACTORY, "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "class-conditional (2 classes)" in err and "'labels' array" in err
    np.savez(tmp_path / "ten.npz", images=train, labels=np.arange(len(train)) % 10)
    code, _, err = run_cli(capsys, "scan", model, tmp_path / "ten.npz", "--factory", FACTORY, "--quiet")
    assert code == 2 and "class label 9" in err and "2 classes" in err
    code, _, err = run_cli(capsys, "scan", model, two_digits[1], "--factory", FACTORY, "--samples", "1", "--quiet")
    assert code == 2 and "--samples 1" in err


def test_class_bound_is_the_conditional_model_at_one_class(two_digits):
    model = load_model(str(two_digits[0]), factory=FACTORY)
    x = torch.randn(3, 1, 8, 8)
    for c in (0, 1):
        for sigma in SIGMAS:
            expected = model(x, sigma, class_labels=torch.full((3,), c))
            torch.testing.assert_close(ClassBound(model, c)(x, sigma), expected, rtol=0, atol=0)
    with pytest.raises(UserError, match="needs class labels"):
        model(x, 1.0)
    with pytest.raises(UserError, match="outside the model's 2 classes"):
        ClassBound(model, 2)


def test_native_conditional_unet_matches_its_network(tmp_path):
    denoiser = make_unet_denoiser((1, 8, 8), base_channels=8, seed=0, num_classes=3)
    with torch.no_grad():
        denoiser.net.class_embed.weight.normal_()  # distinct classes
    save_native(denoiser, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_classes"] == 3
    loaded = load_native(tmp_path / "m")
    net, sd = loaded.net, loaded.schedule.sigma_data
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    with torch.no_grad():
        for sigma in SIGMAS:
            s = torch.full((3,), sigma)
            c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2) ** 0.5
            direct = c_skip * x + c_out * net(x / (sigma**2 + sd**2) ** 0.5, torch.log(s) / 4, labels)
            torch.testing.assert_close(loaded(x, sigma, class_labels=labels), direct, rtol=0, atol=1e-5)
        assert not torch.allclose(loaded(x, 1.0, class_labels=torch.zeros(3, dtype=torch.long)),
                                  loaded(x, 1.0, class_labels=torch.ones(3, dtype=torch.long)))
    uncond = make_unet_denoiser((1, 8, 8), base_channels=8, seed=0)
    save_native(uncond, tmp_path / "u")
    assert "num_classes" not in json.loads((tmp_path / "u" / "config.json").read_text())
    assert load_native(tmp_path / "u").num_classes is None


def test_native_config_num_classes_must_match_the_unet(tmp_path):
    save_native(make_unet_denoiser((1, 8, 8), base_channels=8, seed=0, num_classes=3), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for bad, message in ((2, "disagrees"), ("3", "num_classes must be")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_classes": bad}))
        with pytest.raises(UserError, match=message):
            load_native(tmp_path / "m")


@pytest.mark.slow  # importing diffusers takes a few seconds
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_diffusers_class_conditional_unet_matches_unet_and_scheduler(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, num_class_embeds=2).eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    scheduler.save_pretrained(tmp_path / "pipe" / "scheduler")
    model = load_model(str(tmp_path / "pipe"))
    gen = torch.Generator().manual_seed(1)
    for t in (1, 20, 60, 99):
        abar = scheduler.alphas_cumprod[t].double()
        sigma = float(torch.sqrt((1 - abar) / abar))
        x_t = torch.randn(2, 1, 8, 8, generator=gen)
        labels = torch.tensor([0, 1])
        with torch.no_grad():
            eps = unet(x_t, t, class_labels=labels).sample
            x0 = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
            got = model(x_t / torch.sqrt(abar).float(), sigma, class_labels=labels)
        torch.testing.assert_close(got, x0, atol=1e-5 * max(1.0, sigma), rtol=0)
    code, out, err = run_cli(capsys, "inspect", tmp_path / "pipe")
    assert code == 0 and "class-conditional, 2 classes" in out, err


def test_labels_from_class_subfolders(tmp_path):
    for name, value in (("cat", 10), ("ant", 200), ("cat", 30)):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(folder / f"{value}.png")
    data = load_dataset(tmp_path / "data")
    assert data.class_names == ["ant", "cat"]
    assert data.labels.tolist() == [0, 1, 1]  # files sorted by path: ant/200, cat/10, cat/30
    assert data.images[0].mean().item() == pytest.approx(200 / 127.5 - 1)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "data" / "loose.png")
    mixed = load_dataset(tmp_path / "data")
    assert mixed.labels is None and "loose.png" in mixed.labels_problem and "subfolder" in mixed.labels_problem
    assert load_dataset(tmp_path / "data" / "cat").labels is None  # no subfolders: unlabelled


def test_labels_from_an_npz_array(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.array([3, 0, 3]))
    data = load_dataset(tmp_path / "a.npz", limit=2)
    assert data.labels.tolist() == [3, 0] and data.images.shape[0] == 2
    np.savez(tmp_path / "b.npz", images=images, labels=np.array([1, 2]))
    assert "one label per image" in load_dataset(tmp_path / "b.npz").labels_problem
    np.savez(tmp_path / "c.npz", images=images, labels=np.array([0.5, 1, 2]))
    assert "integers" in load_dataset(tmp_path / "c.npz").labels_problem
    np.savez(tmp_path / "d.npz", pixels=images, labels=np.array([0, 1, 2]))  # the one other array is the images
    assert load_dataset(tmp_path / "d.npz").images.shape[0] == 3
    assert load_dataset(DIGITS_NPZ).labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_train_class_conditional_learns_each_class(two_digits, tmp_path, capsys):
    data = two_digits[1]
    code, _, err = run_cli(capsys, "train", data, "--out", tmp_path / "cm", "--class-conditional", "--steps", "4",
                           "--width", "8", "--batch-size", "8", "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "cm" / "config.json").read_text())
    assert config["num_classes"] == 2 and config["history"][-1]["num_classes"] == 2
    trained = load_native(tmp_path / "cm").net.class_embed.weight
    fresh = make_unet_denoiser((1, 8, 8), base_channels=8, seed=0, num_classes=2).net.class_embed.weight
    assert (trained - fresh).abs().amax(1).min() > 0  # both classes' embeddings were trained
    code, out, err = run_cli(capsys, "inspect", tmp_path / "cm")
    assert code == 0 and "class-conditional, 2 classes" in out, err
    np.savez(tmp_path / "bare.npz", images=two_digits[2])
    code, _, err = run_cli(capsys, "train", tmp_path / "bare.npz", "--out", tmp_path / "x", "--class-conditional",
                           "--steps", "1", "--quiet")
    assert code == 2 and "--class-conditional needs class labels" in err and "'labels' array" in err


def test_num_classes_flag_for_bare_networks_and_wrong_guesses(two_digits, tmp_path, capsys):
    from safetensors.torch import save_file

    model, data = two_digits[0], two_digits[1]
    net = load_model(str(model), factory=FACTORY).net
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bare = [tmp_path / "w.safetensors", "--factory", FACTORY, "--factory-args", '{"num_points": 44}',
            "--param", "x0", "--schedule", "ve"]
    code, out, err = run_cli(capsys, "inspect", *bare, "--num-classes", "2")
    assert code == 0 and "class-conditional, 2 classes" in out, err
    code, _, err = run_cli(capsys, "scan", *bare, data, "--quiet")  # a conditional network without the flag
    assert code == 2 and "pass --num-classes N" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "inspect", model, "--factory", FACTORY, "--num-classes", "3")
    assert code == 2 and "class-conditional with 2 classes" in err and "drop --num-classes 3" in err
    code, _, err = run_cli(capsys, "inspect", "examples/models/digits32", "--num-classes", "2")
    assert code == 2 and "(unconditional): drop --num-classes 2" in err
    code, out, err = run_cli(capsys, "scan", *bare, data, "--num-classes", "2", "--samples", "4", "--steps", "4",
                             "--sampler", "heun", "--quiet")
    assert code == 0 and "memorized per class" in out, err


def test_smooth_refuses_a_class_conditional_model(two_digits, tmp_path, capsys):
    model, data = two_digits[0], two_digits[1]
    code, _, err = run_cli(capsys, "smooth", model, data, "--factory", FACTORY, "--out", tmp_path / "s", "--quiet")
    assert code == 2 and "class-conditional" in err and len(err.strip().splitlines()) == 1


def test_interrupted_conditional_scan_resumes_to_the_same_report(tmp_path, two_digits):
    from memaudit.report.json_report import dumps_report
    from memaudit.scan import ScanConfig

    model = make_unet_denoiser((1, 8, 8), base_channels=8, seed=0, num_classes=2)
    train, labels = two_digits[2], torch.tensor(two_digits[3])
    train = torch.from_numpy(train.astype(np.float32) / 127.5 - 1)[:, None]
    config = dict(num_samples=16, batch_size=4, samplers=("heun",), steps=4, trajectory_samples=4, fid="off",
                  cosine_points=4, metric_sigmas=3)
    stop = {"armed": True}

    def task(description, total):
        def advance(done, info=""):
            if stop["armed"] and description == "sample heun" and done >= 4 and info != "resumed":
                stop["armed"] = False
                raise KeyboardInterrupt
        return advance

    def scan(workdir, resume=False, task=None):
        return run_scan(model, train, ScanConfig(**config), model_info={"spec": "m"}, data_info={"path": "d"},
                        workdir=workdir, resume=resume, task=task, labels=labels, class_names=["0", "1"])

    full = scan(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):  # class 0 of heun stops after its first batch
        scan(tmp_path / "b", task=task)
    resumed = scan(tmp_path / "b", resume=True)
    assert resumed.report.pop("provenance")["runs"]["heun"]["resumed_samples"] == 4
    full.report.pop("provenance")
    assert dumps_report(resumed.report) == dumps_report(full.report)
    assert [e["num_samples"] for e in full.report["per_class"]["runs"]["heun"]] == [8, 8]
