"""`memaudit smooth`: writes a fine-tuned native checkpoint, prints the before/after table, resumes, and turns
bad input into one line on stderr with exit code 2."""

from pathlib import Path

import pytest
import torch

from memaudit.cli.app import main
from memaudit.models.native import load_native, make_unet_denoiser, save_native
from memaudit.training import STATE_NAME, Trainer

DIGITS32 = str(Path(__file__).resolve().parents[1] / "examples" / "digits" / "digits32.npz")
FAST = ["--steps", "6", "--batch-size", "8", "--checkpoint-every", "3", "--quiet"]


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    return str(save_native(make_unet_denoiser((1, 8, 8), base_channels=8), tmp_path / "orig",
                           history=[{"action": "train"}]))


def run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def table_cells(out):
    """The comparison table's body rows as lists of cells (ASCII table: '| model | sampler | numbers... |')."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    return [c for c in cells if len(c) > 1 and c[1] in ("heun", "sde", "pc", "adaptive")]


def table_rows(out):
    return [(c[0], c[1]) for c in table_cells(out)]


def test_smooth_writes_checkpoint_and_prints_the_rows(tmp_path, model, capsys):
    out_dir = tmp_path / "smoothed"
    code, out, err = run(["smooth", model, DIGITS32, "--out", str(out_dir), "--temperature", "2", "--k", "8",
                          "--samples", "8", *FAST], capsys)
    assert code == 0, err
    assert table_rows(out) == [("original", "heun"), ("original", "sde"), ("fine-tuned (smooth)", "heun"),
                               ("fine-tuned (smooth)", "sde")]
    numbers = [[float(v) for v in cells[2:]] for cells in table_cells(out)]
    assert all(len(row) == 3 and 0 <= row[0] <= 1 and 0 <= row[1] <= 1 and row[2] >= 0 for row in numbers)
    tuned = load_native(out_dir)
    assert tuned.history[0] == {"action": "train"}
    assert tuned.history[1]["action"] == "smooth" and tuned.history[1]["temperature"] == "2"
    assert tuned.history[1]["model"] == model and tuned.history[1]["data"] == DIGITS32
    original = load_native(model)
    assert any(not torch.equal(p, q) for p, q in zip(original.net.parameters(), tuned.net.parameters()))


def test_kernel_target_adds_the_closed_form_kernel_row(tmp_path, model, capsys):
    code, out, err = run(["smooth", model, DIGITS32, "--out", str(tmp_path / "h"), "--kernel", "0.3",
                          "--samples", "8", *FAST], capsys)
    assert code == 0, err
    assert table_rows(out) == [("original", "heun"), ("original", "sde"), ("fine-tuned (kernel)", "heun"),
                               ("fine-tuned (kernel)", "sde"), ("closed form empirical:kernel=0.3", "heun")]
    assert load_native(tmp_path / "h").history[-1]["kernel"] == 0.3


def test_uncondition_scans_the_finetuned_model_with_the_stochastic_and_adaptive_samplers(tmp_path, model, capsys):
    code, out, err = run(["smooth", model, DIGITS32, "--out", str(tmp_path / "u"), "--uncondition",
                          "--samples", "8", "--holdout", DIGITS32.replace("digits32", "digits"), *FAST], capsys)
    assert code == 0, err
    assert table_rows(out) == [("original", "heun"), ("original", "sde"), ("fine-tuned (uncondition)", "heun"),
                               ("fine-tuned (uncondition)", "sde"), ("fine-tuned (uncondition)", "pc"),
                               ("fine-tuned (uncondition)", "adaptive")]
    assert "proxy held-out" in out
    tuned = load_native(tmp_path / "u")
    assert tuned.fixed_noise_input is not None
    assert tuned.history[-1]["action"] == "uncondition" and tuned.history[-1]["target"] == "denoise"


def test_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path, model, capsys, monkeypatch):
    args = ["--temperature", "2", "--k", "4", "--no-compare", *FAST]
    assert run(["smooth", model, DIGITS32, "--out", str(tmp_path / "a"), *args], capsys)[0] == 0
    real_step, interrupted = Trainer.train_step, []

    def flaky_step(self):
        if self.step == 4 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", flaky_step)
    assert run(["smooth", model, DIGITS32, "--out", str(tmp_path / "b"), *args], capsys)[0] == 130
    assert (tmp_path / "b" / STATE_NAME).exists()
    assert run(["smooth", model, DIGITS32, "--out", str(tmp_path / "b"), "--resume", *args], capsys)[0] == 0
    a, b = load_native(tmp_path / "a"), load_native(tmp_path / "b")
    for p, q in zip(a.net.parameters(), b.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert a.history == b.history


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "0.5"], "--temperature must be >= 1"),
    (["--temperature", "-1"], "--temperature must be a positive number"),
    (["--temperature", "7/x"], "--temperature must be a positive number"),
    (["--k", "0"], "--k must be >= 1"),
    (["--kernel", "-1"], "--kernel must be a finite bandwidth"),
    (["--kernel", "1", "--temperature", "2"], "--kernel must be not combined with a temperature"),
    (["--sigma-collapse", "big"], "--sigma-collapse must be a number or auto"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1, not 0"),
])
def test_bad_options_are_one_line_errors(tmp_path, model, capsys, extra, message):
    code, out, err = run(["smooth", model, DIGITS32, "--out", str(tmp_path / "x"), *extra, "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("which", ["empirical", "missing-data", "missing-model"])
def test_bad_inputs_are_one_line_errors(tmp_path, model, capsys, which):
    spec, data = {"empirical": ("empirical:T=2", DIGITS32), "missing-data": (model, str(tmp_path / "none.npz")),
                  "missing-model": (str(tmp_path / "nomodel"), DIGITS32)}[which]
    code, out, err = run(["smooth", spec, data, "--out", str(tmp_path / "x"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "x").exists()


def test_smooth_takes_resize_for_mixed_size_folders(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from cli_helpers import run_cli

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([8, 10, 12, 8]):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"{i}.png")
    code, _, err = run_cli(capsys, "smooth", "examples/models/digits32", folder, "--out", tmp_path / "a",
                           "--steps", "1", "--no-compare", "--quiet")
    assert code == 2 and "--resize" in err
    code, _, err = run_cli(capsys, "smooth", "examples/models/digits32", folder, "--out", tmp_path / "b",
                           "--steps", "2", "--no-compare", "--quiet", "--resize", "8")
    assert code == 0, err
    assert (tmp_path / "b" / "model.safetensors").is_file()
