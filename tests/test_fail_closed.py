"""Issue 13: the 26 ways an adversarial trial fooled, crashed or damaged a scan, each tried again at the CLI.

Fail-open items first (the gate must fail when memaudit cannot measure, or is being fooled), then the exit-code
contract, lost data, reproducibility, memory and messages. `$M`/`$D` of the issue are MODEL/DATA below.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import memaudit.scan as audit
import memaudit.storage
from memaudit.models.native import CONFIG_NAME, load_native, make_unet_denoiser, save_native
from memaudit.models.schedules import make_schedule
from memaudit.models.adapters import NetworkDenoiser
from memaudit.workdir import SampleStore

from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "digits32")
DATA = str(ROOT / "examples" / "digits" / "digits32.npz")
SKIP = ["--skip", "fid", "--skip", "jacobian", "--skip", "cosine", "--skip", "entropy"]
QUICK = ["--samples", "16", "--sampler", "heun", "--quiet", *SKIP]
GATE = ["--fail-on", "memorized_fraction>0.05"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "cache"))


def digits32_uint8() -> np.ndarray:
    with np.load(DATA) as npz:
        return npz["images"]


def one_line(code, err, *fragments, exit_code=2):
    assert code == exit_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), err


def scan(capsys, tmp_path, model, data, *args):
    """(exit code, report dict or None, stderr)."""
    out = tmp_path / "r.json"
    out.unlink(missing_ok=True)
    code, _, err = run_cli(capsys, "scan", model, data, *args, "--json", out)
    return code, (json.loads(out.read_text()) if out.is_file() else None), err


# ------------------------------------------------------------------------------------------- fail-open

@pytest.mark.parametrize("jitter", [0, 3])
def test_1_duplicated_training_images_do_not_hide_memorization(capsys, tmp_path, jitter):
    a = digits32_uint8()
    rng = np.random.default_rng(0)
    copies = np.clip(a.astype(int) + rng.integers(-jitter, jitter + 1, a.shape), 0, 255).astype(np.uint8)
    np.save(tmp_path / "dup.npy", np.concatenate([a, copies]))
    code, report, err = scan(capsys, tmp_path, MODEL, tmp_path / "dup.npy", *QUICK, *GATE)
    assert code == 1, err  # the gate fails: 99% memorized, as against the plain 32
    nn = report["runs"]["heun"]["nn_ratio"]
    assert nn["memorized_fraction"] > 0.9
    assert nn["memorized_fraction_plain"] < 0.05  # what the plain d1/d2 said before: nothing memorized
    dup = report["data"]["duplicates"]
    assert dup["num_clusters"] == 32 and dup["clusters"][0] == [0, 32]
    assert "near-duplicate" in err  # warned on stderr


def interrupt_after_first_batch(monkeypatch):
    """Ctrl-C right after the first sampling batch is saved to the work folder (once)."""
    save = SampleStore.save

    def save_then_interrupt(self, sampler, batches):
        save(self, sampler, batches)
        monkeypatch.setattr(SampleStore, "save", save)
        raise KeyboardInterrupt

    monkeypatch.setattr(SampleStore, "save", save_then_interrupt)


def tampered_resume(capsys, tmp_path, monkeypatch, recompute_digest: bool):
    """Interrupt a scan after its first batch, then replace the saved batch with random images (and, like a
    careful attacker, fix up the manifest's digest); return the resumed scan's (code, report, err)."""
    work = tmp_path / "work"
    interrupt_after_first_batch(monkeypatch)
    args = [*QUICK, "--batch-size", "8", "--workdir", work, *GATE]
    assert scan(capsys, tmp_path, MODEL, DATA, *args)[0] == 130
    [folder] = work.glob("scan-*")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    batch_file = folder / "heun-000000.pt"
    payload = torch.load(batch_file, weights_only=True)
    payload["samples"] = torch.rand_like(payload["samples"]) * 2 - 1
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    batch_file.write_bytes(buffer.getvalue())
    if recompute_digest:
        import hashlib

        manifest = json.loads((folder / "heun.json").read_text())
        manifest["batches"][0]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
        (folder / "heun.json").write_text(json.dumps(manifest))
    return scan(capsys, tmp_path, MODEL, DATA, *args, "--resume")


@pytest.mark.parametrize("recompute_digest", [False, True], ids=["digest", "spot check"])
def test_2_a_tampered_work_folder_is_not_resumed(capsys, tmp_path, monkeypatch, recompute_digest):
    code, report, err = tampered_resume(capsys, tmp_path, monkeypatch, recompute_digest)
    assert code == 1, err  # resampled from scratch: the memorizing model still fails its gate
    assert "not resuming heun" in err
    assert report["provenance"] == {"resumed": False, "runs": {"heun": {"resumed_samples": 0, "spot_checked": 0}}}


def test_2_a_sound_resume_is_recorded_in_the_report(capsys, tmp_path, monkeypatch):
    interrupt_after_first_batch(monkeypatch)
    args = [*QUICK, "--batch-size", "8", "--workdir", tmp_path / "work"]
    assert scan(capsys, tmp_path, MODEL, DATA, *args)[0] == 130
    code, report, err = scan(capsys, tmp_path, MODEL, DATA, *args, "--resume")
    assert code == 0, err
    assert report["provenance"]["resumed"] is True
    assert report["provenance"]["runs"]["heun"] == {"resumed_samples": 8, "spot_checked": 2}
    assert "resumed heun: 8 of 16 samples" in err  # a line that stays on the terminal


FACTORY = '''
import torch
from torch import nn


class Net(nn.Module):
    """eps-prediction of 0 (D = x), except: NaN where the VE noise input is in [LO, HI]."""

    def __init__(self, lo, hi, wrap=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.lo, self.hi, self.wrap = lo, hi, wrap

    def forward(self, x, t):
        out = x * self.w
        bad = ((t >= self.lo) & (t <= self.hi)).reshape(-1, 1, 1, 1)
        out = torch.where(bad, torch.full_like(out, float("nan")), out)
        if self.wrap == "tuple":
            return (out,)
        if self.wrap == "dict":
            return {"sample": out}
        if self.wrap == "output":
            from types import SimpleNamespace
            return SimpleNamespace(sample=out)
        if self.wrap == "pair":
            return out, out
        return out


def nan_small():
    return Net(0.0, 0.01)


def nan_between():
    return Net(0.05, 0.2)


def finite():
    return Net(1.0, 0.0)


def as_tuple():
    return Net(1.0, 0.0, "tuple")


def as_dict():
    return Net(1.0, 0.0, "dict")


def as_output():
    return Net(1.0, 0.0, "output")


def as_pair():
    return Net(1.0, 0.0, "pair")
'''


@pytest.fixture
def factory(tmp_path):
    (tmp_path / "nets.py").write_text(FACTORY)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    return lambda name: [str(tmp_path / "w.safetensors"), DATA, "--factory", f"{tmp_path / 'nets.py'}:{name}",
                         "--param", "eps", "--schedule", "ve"]


def test_3_a_model_that_is_nan_at_small_sigma_fails_its_load_check(capsys, tmp_path, factory):
    model, data, *loader = factory("nan_small")
    code, report, err = scan(capsys, tmp_path, model, data, *loader, *QUICK, *GATE)
    one_line(code, err, "NaN", "sigma=0.01")
    assert report is None


def test_3_non_finite_samples_stop_the_scan_with_exit_2(capsys, tmp_path, factory):
    model, data, *loader = factory("nan_between")  # finite at sigma_min, the mid sigma and sigma_max
    code, report, err = scan(capsys, tmp_path, model, data, *loader, *QUICK, *GATE)
    one_line(code, err, "NaN or infinite while sampling with heun", "sigma=")
    assert report is None


@pytest.mark.parametrize("wrap", ["as_tuple", "as_dict", "as_output"])
def test_9_network_outputs_in_a_tuple_dict_or_output_object_are_unwrapped(capsys, tmp_path, factory, wrap):
    model, data, *loader = factory(wrap)
    code, report, err = scan(capsys, tmp_path, model, data, *loader, *QUICK)
    assert code == 0, err
    assert report["status"] == "pass"


def test_9_a_network_returning_two_tensors_is_named(capsys, tmp_path, factory):
    model, data, *loader = factory("as_pair")
    one_line(*scan(capsys, tmp_path, model, data, *loader, *QUICK)[::2], "returned a tuple of 2 items")


def test_4_reports_never_replace_devices_fifos_or_symlinks(capsys, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    real = tmp_path / "real.json"
    real.write_text("old\n")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    code, _, err = run_cli(capsys, "scan", MODEL, DATA, *QUICK, "--json", fifo, "--junit", link)
    reader.join(timeout=60)
    assert code == 0, err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still a FIFO, and the reader got the report
    assert json.loads(received[0])["schema"] == "memaudit.scan/1"
    assert link.is_symlink() and real.read_text().startswith("<?xml")  # the link kept, its target replaced
    code, _, err = run_cli(capsys, "scan", MODEL, DATA, *QUICK, "--json", "/dev/null")
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_4_a_character_device_is_written_not_renamed_over(capsys, tmp_path):
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the same device as /dev/null
    code, _, err = run_cli(capsys, "scan", MODEL, DATA, *QUICK, "--json", node)
    assert code == 0, err
    assert stat.S_ISCHR(node.lstat().st_mode)


def test_5_floats_in_an_unknown_range_are_refused_not_rescaled(capsys, tmp_path):
    raw = digits32_uint8().astype(np.float64) * 16 / 255  # like load_digits().images: floats 0..16
    np.savez(tmp_path / "raw.npz", images=raw)
    code, report, err = scan(capsys, tmp_path, MODEL, tmp_path / "raw.npz", *QUICK, *GATE)
    one_line(code, err, "values span [0, 16]", "--value-range")
    code, report, err = scan(capsys, tmp_path, MODEL, tmp_path / "raw.npz", *QUICK, *GATE, "--value-range", "0,16")
    assert code == 1, err  # read right, the memorizing model fails its gate
    assert report["data"]["value_range"] == "float64 [0, 16] (--value-range)"


def test_6_every_sampler_ends_clean_on_the_memorizing_model(capsys, tmp_path):
    samplers = ["heun", "euler", "sde", "edm-sde", "ddpm"]
    args = ["--samples", "64", "--quiet", *SKIP] + [a for s in samplers for a in ("--sampler", s)]
    code, report, err = scan(capsys, tmp_path, MODEL, DATA, *args)
    assert code == 0, err
    fractions = {s: report["summary"][f"memorized_fraction_{s.replace('-', '_')}"] for s in samplers}
    assert min(fractions.values()) >= 0.98, fractions  # was 46.9% for sde on a model the library put at 99.6%


def vp_checkpoint(tmp_path) -> str:
    torch.manual_seed(0)
    edm = make_unet_denoiser((1, 8, 8), base_channels=8)
    model = NetworkDenoiser(edm.net, "eps", make_schedule("vp-linear"), image_shape=(1, 8, 8))
    return str(save_native(model, tmp_path / "vp"))


def test_7_sigma_max_above_80_is_honoured_for_vp_models_and_recorded(capsys, tmp_path):
    model = vp_checkpoint(tmp_path)
    code, report, err = scan(capsys, tmp_path, model, DATA, *QUICK, "--samples", "4", "--sigma-max", "150")
    assert code == 0, err
    assert report["settings"]["sampling_sigma_max"] == pytest.approx(150)
    assert report["settings"]["sampling_sigma_min"] == pytest.approx(0.01, rel=1e-3)  # the first timestep
    code, report, err = scan(capsys, tmp_path, model, DATA, *QUICK, "--samples", "4")
    assert report["settings"]["sampling_sigma_max"] == pytest.approx(80)


def test_8_collapse_sigma_is_not_quantised_to_the_sampler_grid(capsys, tmp_path):
    args = ["--samples", "32", "--quiet", "--sampler", "heun", "--sampler", "sde", "--skip", "fid", "--skip",
            "jacobian", "--skip", "cosine"]
    code, report, err = scan(capsys, tmp_path, MODEL, DATA, *args)
    assert code == 0, err
    values = {}
    for name in ("heun", "sde"):
        entropy = report["runs"][name]["entropy"]
        values[name] = entropy["collapse_sigma"]
        assert all(abs(values[name] - s) > 1e-6 * s for s in entropy["sigmas"])  # between the steps
    assert values["heun"] != values["sde"]


# ---------------------------------------------------------------------------------- exit-code contract

def native_copy(tmp_path, **changes) -> str:
    folder = tmp_path / "m"
    if not folder.exists():
        import shutil

        shutil.copytree(MODEL, folder)
    config = json.loads((Path(MODEL) / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if key == "base_channels":
            config["architecture"]["kwargs"]["base_channels"] = value
        else:
            config[key] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return str(folder)


CONFIG_CASES = [
    ({"architecture": "unet"}, "architecture must be"),
    ({"version": "one"}, "version must be"),
    ({"sigma_max": "80"}, "sigma_max must be a finite positive number"),
    ({"sigma_data": 0}, "sigma_data must be a finite positive number"),
    ({"fixed_noise_input": "none"}, "fixed_noise_input must be"),
    ({"alphas_cumprod": [0.5, "x"]}, "alphas_cumprod must be"),
    ({"image_shape": [1, -8, 8]}, "image_shape must be"),
    ({"base_channels": 200000}, "base_channels must be an integer from 1 to 4096"),
    ({"base_channels": 16}, "does not match its architecture"),
    ({"schedule": "magic"}, "schedule must be one of"),
]


@pytest.mark.parametrize("changes,fragment", CONFIG_CASES, ids=[next(iter(c)) + str(i) for i, (c, _) in
                                                                 enumerate(CONFIG_CASES)])
def test_9_malformed_config_values_are_one_line_errors(capsys, tmp_path, monkeypatch, changes, fragment):
    monkeypatch.setattr("memaudit.cli.scan.run_scan", lambda *a, **k: pytest.fail("scan started"))
    one_line(*run_cli(capsys, "scan", native_copy(tmp_path, **changes), DATA, *QUICK)[::2], fragment)


def test_9_a_config_that_is_a_json_list(capsys, tmp_path):
    folder = Path(native_copy(tmp_path))
    (folder / CONFIG_NAME).write_text("[1, 2]")
    one_line(*run_cli(capsys, "scan", folder, DATA, *QUICK)[::2], "unknown model folder")


def bad_npz(tmp_path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npz"
    if kind == "object":
        np.savez(path, images=np.array([np.zeros((8, 8)), "x"], dtype=object))
    else:
        np.savez(path, images=digits32_uint8())
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("images.npy")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
        data[start] ^= 0xFF  # a flipped byte inside the array: the CRC no longer matches
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("args,fragment", [
    (["empirical:chunk=0", DATA], "chunk must be >= 1"),
    (["empirical:T=inf", DATA], "temperature T must be a number in"),
    (["empirical:T=1e-300", DATA], "temperature T must be a number in"),
    (["empirical:h=inf", DATA], "bandwidth h must be"),
    (["empirical:T=2,T=3", DATA], "sets temperature twice"),
    (["empirical:T=2,temperature=3", DATA], "sets temperature twice"),
    ([MODEL, DATA, "--seed", str(2**63)], "--seed"),
    ([MODEL, DATA, "-n", "1000000000", "--batch-size", "1000000000"], "lower --samples or --batch-size"),
    ([MODEL, DATA, "--fid", "bogus"], "'bogus' is not one of"),
    ([MODEL, DATA, "--dup-tol", "2"], "--dup-tol must be in [0, 1)"),
], ids=["chunk 0", "T inf", "T tiny", "h inf", "repeated key", "repeated alias", "seed 2^63", "huge batch",
        "fid bogus", "dup-tol 2"])
def test_9_absurd_options_fail_before_sampling(capsys, monkeypatch, args, fragment):
    monkeypatch.setattr(audit, "sample", lambda *a, **k: pytest.fail("sampling started"))
    one_line(*run_cli(capsys, "scan", *args[:2], *QUICK, *args[2:])[::2], fragment)


@pytest.mark.parametrize("kind,fragment", [("object", "object array"), ("crc", "CRC")])
def test_9_object_arrays_and_corrupt_npz_files(capsys, tmp_path, kind, fragment):
    one_line(*run_cli(capsys, "scan", MODEL, bad_npz(tmp_path, kind), *QUICK)[::2], fragment)


def test_9_any_other_exception_is_an_internal_error_with_its_own_code(capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("memaudit.cli.scan.run_scan", bug)
    one_line(*run_cli(capsys, "scan", MODEL, DATA, *QUICK)[::2], "internal error: ZeroDivisionError",
             exit_code=3)


# ------------------------------------------------------------------------------------ lost or damaged data

def test_10_outputs_may_not_overwrite_the_inputs_or_each_other(capsys, tmp_path):
    folder = Path(native_copy(tmp_path))
    np.save(tmp_path / "data.npy", digits32_uint8())
    images = tmp_path / "images"
    images.mkdir()
    for i, a in enumerate(digits32_uint8()[:4]):
        Image.fromarray(a).save(images / f"{i}.png")
    before = {p: p.read_bytes() for p in [folder / CONFIG_NAME, tmp_path / "data.npy"]}
    cases = [
        ([folder, DATA, "--json", folder / CONFIG_NAME], "lies inside MODEL"),
        ([MODEL, tmp_path / "data.npy", "--json", tmp_path / "data.npy"], "is DATA"),
        ([MODEL, DATA, "--json", tmp_path / "same", "--junit", tmp_path / "same"], "collide"),
        ([MODEL, images, "--html", images / "report"], "lies inside DATA"),
        ([MODEL, DATA, "--html", tmp_path / "h", "--json", tmp_path / "h" / "r.json"], "collide"),
        ([MODEL, tmp_path / "data.npy", "--html", tmp_path], "holds DATA"),
    ]
    for args, fragment in cases:
        one_line(*run_cli(capsys, "scan", *args[:2], *QUICK, *args[2:])[::2], fragment)
    assert {p: p.read_bytes() for p in before} == before


def test_11_smooth_refuses_to_write_over_its_model(capsys, tmp_path):
    folder = Path(native_copy(tmp_path))
    weights = (folder / "model.safetensors").read_bytes()
    one_line(*run_cli(capsys, "smooth", folder, DATA, "--out", folder, "--steps", "1", "--quiet")[::2],
             "--out", "is MODEL")
    assert (folder / "model.safetensors").read_bytes() == weights


def test_11_train_refuses_to_write_over_its_data(capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, a in enumerate(digits32_uint8()[:4]):
        Image.fromarray(a).save(images / f"{i}.png")
    one_line(*run_cli(capsys, "train", images, "--out", images / "model", "--steps", "1", "--quiet")[::2],
             "lies inside DATA")


def test_12_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    from memaudit.data import load_dataset

    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    dataset = load_dataset(tmp_path)
    np.testing.assert_allclose(dataset.images.numpy().reshape(-1), values.reshape(-1) / 65535 * 2 - 1, atol=1e-6)
    assert "16-bit" in dataset.value_range


@pytest.mark.parametrize("array,fragment", [
    (np.zeros((4, 8, 8), dtype=np.complex64), "complex"),
    (np.arange(4 * 64, dtype=np.int64).reshape(4, 8, 8) % 17, "integers are read as [0, 255] only"),
], ids=["complex", "int 0..16"])
def test_13_complex_and_ambiguous_arrays_are_refused(capsys, tmp_path, array, fragment):
    np.save(tmp_path / "a.npy", array)
    one_line(*run_cli(capsys, "scan", MODEL, tmp_path / "a.npy", *QUICK)[::2], fragment)


# ----------------------------------------------------------------------------------------- reproducibility

def test_15_train_seed_gives_the_same_weights(capsys, tmp_path):
    weights = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 7 + ord(name))  # a different global RNG state each time
        code, _, err = run_cli(capsys, "train", DATA, "--out", tmp_path / name, "--steps", "3", "--batch-size", "4",
                               "--width", "8", "--seed", "5", "--quiet")
        assert code == 0, err
        weights.append(load_native(tmp_path / name).net.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_16_ctrl_c_in_the_middle_of_a_step_resumes_to_the_uninterrupted_weights(capsys, tmp_path, monkeypatch):
    args = ["--steps", "8", "--batch-size", "4", "--width", "8", "--seed", "1", "--checkpoint-every", "0",
            "--quiet"]
    assert run_cli(capsys, "train", DATA, "--out", tmp_path / "straight", *args)[0] == 0
    adam_step = torch.optim.Adam.step
    calls = [0]

    def step_with_sigint(self, *a, **k):
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the 5th optimiser step is running
        return adam_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step_with_sigint)
    code, _, err = run_cli(capsys, "train", DATA, "--out", tmp_path / "cut", *args)
    assert code == 130, err
    monkeypatch.setattr(torch.optim.Adam, "step", adam_step)
    code, _, err = run_cli(capsys, "train", DATA, "--out", tmp_path / "cut", *args, "--resume")
    assert code == 0, err
    a, b = load_native(tmp_path / "straight").net.state_dict(), load_native(tmp_path / "cut").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_16_resume_with_changed_settings_is_refused(capsys, tmp_path, monkeypatch):
    import memaudit.training as training

    args = ["--steps", "6", "--batch-size", "4", "--width", "8", "--quiet", "--checkpoint-every", "2"]

    def interrupt(step, info):
        if step == 3:
            raise KeyboardInterrupt

    fit = training.fit
    monkeypatch.setattr("memaudit.cli.train.fit", lambda *a, **k: fit(*a, **{**k, "progress": interrupt}))
    assert run_cli(capsys, "train", DATA, "--out", tmp_path / "m", *args)[0] == 130
    monkeypatch.setattr("memaudit.cli.train.fit", fit)
    one_line(*run_cli(capsys, "train", DATA, "--out", tmp_path / "m", *args, "--lr", "0.01", "--resume")[::2],
             "started with other settings", "lr 0.001 -> 0.01")
    assert run_cli(capsys, "train", DATA, "--out", tmp_path / "m", *args, "--steps", "8", "--resume")[0] == 0


# ------------------------------------------------------------------------------------------ memory and time

def test_18_trajectories_are_recorded_only_for_a_consumer_and_within_a_budget():
    config = audit.ScanConfig(skip=("entropy", "cosine"))
    assert audit.trajectory_rows(config, (3, 256, 256)) == 0
    big = audit.trajectory_rows(audit.ScanConfig(), (3, 256, 256))
    assert 0 < big < 128 and big * 2 * 18 * 4 * 3 * 256 * 256 <= audit.TRAJECTORY_BYTES
    assert audit.trajectory_rows(audit.ScanConfig(), (1, 8, 8)) == 128


def test_19_each_batch_is_written_once(tmp_path, monkeypatch):
    model = load_native(MODEL)
    train = torch.from_numpy(digits32_uint8().astype(np.float32) / 127.5 - 1)[:, None]
    writes = []
    from memaudit import workdir

    real = workdir.atomic_path

    def counting(target):
        writes.append(Path(target).name)
        return real(target)

    monkeypatch.setattr(workdir, "atomic_path", counting)
    config = audit.ScanConfig(num_samples=24, batch_size=4, samplers=("heun",), steps=4,
                              skip=("entropy", "cosine", "jacobian", "fid"))
    audit.run_scan(model, train, config, model_info={"spec": MODEL}, data_info={"path": DATA},
                   workdir=tmp_path / "w")
    assert writes == [f"heun-{i:06d}.pt" for i in range(6)]  # one write per batch, none rewritten


def test_20_a_dataset_too_large_for_memory_is_refused_before_loading(capsys, tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "zeros.npz", images=np.zeros((20000, 256, 256), dtype=np.uint8))
    # 1.2 GiB of bytes: held as uint8 (memaudit.storage) it needs the bytes + the float budget
    monkeypatch.setattr("memaudit.resources.available_memory", lambda: 1 * 1024**3)
    needed = (20000 * 256 * 256 + memaudit.storage.DEFAULT_FLOAT_BUDGET) / 1024**3
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the array was read"))
    one_line(*run_cli(capsys, "scan", MODEL, tmp_path / "zeros.npz", *QUICK)[::2], f"needs about {needed:.1f} GB",
             "held as uint8", "--limit")


# ---------------------------------------------------------------------------------------------- messages

def test_21_settings_that_do_not_change_samples_keep_the_work_folder(capsys, tmp_path, monkeypatch):
    interrupt_after_first_batch(monkeypatch)
    args = [*QUICK, "--batch-size", "8", "--workdir", tmp_path / "work"]
    assert run_cli(capsys, "scan", MODEL, DATA, *args, "--fid", "proxy")[0] == 130
    code, report, err = scan(capsys, tmp_path, MODEL, DATA, *args, "--fid", "off", "--threshold", "0.3",
                             "--resume")
    assert code == 0, err
    assert report["provenance"]["runs"]["heun"]["resumed_samples"] == 8


def test_21_hints_name_the_right_fix(capsys, tmp_path):
    rgb = np.repeat(digits32_uint8()[..., None], 3, axis=3)
    np.save(tmp_path / "rgb.npy", rgb)
    one_line(*run_cli(capsys, "scan", MODEL, tmp_path / "rgb.npy", *QUICK)[::2], "--channels 1")
    (tmp_path / "text.npy").write_text("0 1 2 3\n")
    one_line(*run_cli(capsys, "scan", MODEL, tmp_path / "text.npy", *QUICK)[::2], "not a NumPy array file",
             "looks like text")
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for i, a in enumerate(digits32_uint8()[:3]):
        Image.fromarray(a).resize((64, 64)).save(folder / f"{i}.jpg", quality=95)
    data = (folder / "2.jpg").read_bytes()
    (folder / "2.jpg").write_bytes(data[: len(data) // 2])
    one_line(*run_cli(capsys, "scan", MODEL, folder, *QUICK)[::2], "2.jpg", "truncated")


def test_21_control_characters_in_paths_are_printed_escaped(capsys, tmp_path):
    code, _, err = run_cli(capsys, "scan", MODEL, str(tmp_path / "evil\n\x1b[31mname.npz"), *QUICK)
    one_line(code, err, "data not found", "\\x0a\\x1b[31mname.npz")
