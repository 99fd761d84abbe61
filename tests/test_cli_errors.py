"""Issue 6: every bad input a new user might try gives one line `error: ...` on stderr, exit 2, no traceback.

The real CLI (`memaudit scan`, `train`, `smooth`) runs in-process on real files: empty, corrupt and mixed-size
image folders, files that are not checkpoints, a malicious pickle, bad options, unwritable output paths, and a
disk that fills up while a report or checkpoint is written (simulated: writes to the atomic temp files raise
ENOSPC, as Python's file writes and safetensors do on a full disk).
"""

from __future__ import annotations

import builtins
import errno
import importlib.util
import io
import json
import os
import pathlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "digits32")
DATA = str(ROOT / "examples" / "digits" / "digits32.npz")
FAST = ["--samples", "8", "--steps", "4", "--sampler", "heun", "--skip", "jacobian", "--fid", "proxy", "--quiet"]
TRAIN_FAST = ["--steps", "2", "--batch-size", "4", "--width", "8", "--quiet"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "cache"))


def assert_one_line_error(code, err, *fragments, exit_code=2):
    assert code == exit_code, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), err


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Files a new user might pass by mistake."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)

    def png(path, size):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(path)

    (root / "empty").mkdir()
    for name in ("corrupt", "truncated", "mixed"):
        (root / name).mkdir()
        for i in range(3):
            png(root / name / f"{i}.png", (8, 8))
    (root / "corrupt" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    good = (root / "truncated" / "0.png").read_bytes()
    (root / "truncated" / "3.png").write_bytes(good[: len(good) // 2])
    png(root / "mixed" / "3.png", (16, 12))
    (root / "notes.txt").write_text("my model is in the other folder\n")
    (root / "random.bin").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "model.json").write_text(json.dumps({"model_type": "unet", "sample_size": 8}))
    (root / "empty.pt").write_bytes(b"")
    (root / "other_tool").mkdir()
    (root / "other_tool" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    torch.save({"conv.weight": torch.zeros(1, 1, 3, 3), "conv.bias": torch.zeros(1)}, root / "state.pt")
    Evil.marker = str(root / "PWNED")
    with open(root / "evil.pt", "wb") as fh:
        pickle.dump({"weights": torch.zeros(2), "payload": Evil()}, fh, protocol=2)
    (root / "afile").write_text("a file, not a folder\n")
    (root / "factory.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 1, 3, padding=1)\n\n    def forward(self, x, t):\n"
        "        return self.conv(x)\n\n\ndef build():\n    return Net()\n")
    save_file({"conv.weight": torch.zeros(1, 1, 3, 3), "conv.bias": torch.zeros(1)}, str(root / "vp.safetensors"))
    return root


SCAN_CASES = [
    ("empty folder", ["{MODEL}", "{bad}/empty"], ["no images found"]),
    ("corrupt png", ["{MODEL}", "{bad}/corrupt"], ["cannot read image", "3.png"]),
    ("truncated png", ["{MODEL}", "{bad}/truncated"], ["cannot read image", "3.png"]),
    ("mixed sizes", ["{MODEL}", "{bad}/mixed"], ["different sizes", "--resize"]),
    ("data not found", ["{MODEL}", "{bad}/nope.npz"], ["data not found"]),
    ("folder of arrays as data", ["{MODEL}", "{ROOT}/examples/digits"], ["no images found", "digits.npz"]),
    ("text file as model", ["{bad}/notes.txt", "{DATA}"], ["not a readable torch checkpoint"]),
    ("random bytes as model", ["{bad}/random.bin", "{DATA}"], ["not a readable torch checkpoint"]),
    ("json file as model", ["{bad}/model.json", "{DATA}"], ["json file", "folder that holds it"]),
    ("config.json as model", ["{MODEL}/config.json", "{DATA}"], ["json file"]),
    ("empty file as model", ["{bad}/empty.pt", "{DATA}"], ["empty"]),
    ("other tool's folder", ["{bad}/other_tool", "{DATA}"], ["unknown model folder"]),
    ("image folder as model", ["{bad}/mixed", "{DATA}"], ["unknown model folder"]),
    ("model not found", ["{bad}/nope", "{DATA}"], ["model not found"]),
    ("folder of checkpoints as model", ["{ROOT}/examples/models", "{DATA}"], ["holds memaudit checkpoints"]),
    ("weights file of a checkpoint", ["{MODEL}/model.safetensors", "{DATA}"], ["pass the folder"]),
    ("state dict without --factory", ["{bad}/state.pt", "{DATA}"], ["--factory"]),
    ("malicious pickle", ["{bad}/evil.pt", "{DATA}"], ["refused to unpickle", "--trust-pickle"]),
    ("unknown option", ["{MODEL}", "{DATA}", "--no-such-option"], ["no such option"]),
    ("typo in option", ["{MODEL}", "{DATA}", "--sample", "8"], ["no such option"]),
    ("missing argument", ["{MODEL}"], ["missing argument 'DATA'"]),
    ("bad option value", ["{MODEL}", "{DATA}", "--samples", "many"], ["--samples"]),
    ("sigma-min below the model's range", ["{MODEL}", "{DATA}", "--sigma-min", "1e-5"],
     ["--sigma-min", "outside the sigma range [0.002, 80]"]),
    ("sigma-max above the model's range", ["{MODEL}", "{DATA}", "--sigma-max", "1e6"],
     ["--sigma-max", "outside the sigma range"]),
    ("sigma range outside the model's", ["{MODEL}", "{DATA}", "--sigma-min", "500", "--sigma-max", "600"],
     ["outside the sigma range"]),
    ("sigma-min above sigma-max", ["{MODEL}", "{DATA}", "--sigma-min", "10", "--sigma-max", "1"],
     ["invalid sigma range"]),
    ("negative sigma", ["{MODEL}", "{DATA}", "--sigma-min", "-1"], ["--sigma-min must be > 0"]),
    ("sigma beyond a VP schedule's timesteps",
     ["{bad}/vp.safetensors", "{DATA}", "--factory", "{bad}/factory.py:build", "--param", "eps", "--schedule",
      "vp-linear", "--sigma-max", "1000"], ["--sigma-max", "vp-linear"]),
    ("steps 0", ["{MODEL}", "{DATA}", "--steps", "0"], ["--steps", "greater than or equal to 1"]),
    ("samples 0", ["{MODEL}", "{DATA}", "--samples", "0"], ["--samples"]),
    ("resize 0", ["{MODEL}", "{DATA}", "--resize", "0"], ["--resize"]),
    ("resize to a size the model cannot take", ["{MODEL}", "{DATA}", "--resize", "16", *FAST], ["shape mismatch"]),
    ("channels 2", ["{MODEL}", "{DATA}", "--channels", "2"], ["--channels must be 1 or 3"]),
    ("limit 0", ["{MODEL}", "{DATA}", "--limit", "0"], ["--limit"]),
    ("unknown sampler", ["{MODEL}", "{DATA}", "--sampler", "magic"], ["--sampler", "'magic' is not one of", "heun"]),
    ("bad gate", ["{MODEL}", "{DATA}", "--fail-on", "memorized_fraction>>1"], ["gate"]),
    ("json path is a folder", ["{MODEL}", "{DATA}", "--json", "{bad}/empty"], ["is a folder"]),
    ("json under a file", ["{MODEL}", "{DATA}", "--json", "{bad}/afile/r.json"], ["afile is a file"]),
    ("junit under a file", ["{MODEL}", "{DATA}", "--junit", "{bad}/afile/x/j.xml"], ["afile is a file"]),
    ("html folder is a file", ["{MODEL}", "{DATA}", "--html", "{bad}/afile"], ["it is a file"]),
    ("html folder holds other files", ["{MODEL}", "{DATA}", "--html", "{bad}/other_tool"], ["refusing to replace"]),
    ("workdir is a file", ["{MODEL}", "{DATA}", "--workdir", "{bad}/afile"], ["afile"]),
]


def expand(args, bad):
    return [a.format(MODEL=MODEL, DATA=DATA, bad=bad, ROOT=ROOT) for a in args]


@pytest.mark.parametrize("name,args,fragments", SCAN_CASES, ids=[c[0] for c in SCAN_CASES])
def test_scan_bad_input(capsys, monkeypatch, bad, name, args, fragments):
    # Every case must fail before sampling starts: nothing here is worth a long scan.
    monkeypatch.setattr("memaudit.cli.scan.run_scan", lambda *a, **k: pytest.fail("scan started"))
    code, out, err = run_cli(capsys, "scan", *expand(args, bad))
    assert_one_line_error(code, err, *fragments)
    assert out == ""


def test_malicious_pickle_never_runs(capsys, bad):
    commands = [["scan", f"{bad}/evil.pt", DATA]]
    if smooth_exists():
        commands.append(["smooth", f"{bad}/evil.pt", DATA, "--out", f"{bad}/x"])
    for command in commands:
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, "--trust-pickle")
    assert not Path(Evil.marker).exists()


def test_cuda_without_gpu(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    for command in (["scan", MODEL, DATA], ["train", DATA, "--out", tmp_path / "never"]):
        code, _, err = run_cli(capsys, *command, "--device", "cuda")
        assert_one_line_error(code, err, "no CUDA GPU")
    assert not (tmp_path / "never").exists()


TRAIN_CASES = [
    ("empty folder", ["{bad}/empty"], ["no images found"]),
    ("corrupt png", ["{bad}/corrupt"], ["cannot read image"]),
    ("mixed sizes", ["{bad}/mixed"], ["--resize"]),
    ("unknown option", ["{DATA}", "--epochs", "3"], ["no such option"]),
    ("missing --out", ["{DATA}"], ["missing option", "--out"]),
    ("missing data", [], ["missing argument"]),
    ("steps 0", ["{DATA}", "--steps", "0"], ["--steps"]),
    ("resize 0", ["{DATA}", "--resize", "0"], ["--resize"]),
    ("channels 2", ["{DATA}", "--channels", "2"], ["--channels"]),
    ("width 0", ["{DATA}", "--width", "0"], ["--width must be >= 1"]),
    ("levels 0", ["{DATA}", "--levels", "0"], ["--levels must be >= 1"]),
    ("too many levels", ["{DATA}", "--levels", "5"], ["divisible"]),
    ("negative checkpoint interval", ["{DATA}", "--checkpoint-every", "-1"], ["--checkpoint-every"]),
    ("lr 0", ["{DATA}", "--lr", "0"], ["--lr"]),
]


@pytest.mark.parametrize("name,args,fragments", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(capsys, monkeypatch, tmp_path, bad, name, args, fragments):
    monkeypatch.setattr("memaudit.cli.train.fit", lambda *a, **k: pytest.fail("training started"))
    out_args = [] if name in ("missing --out", "missing data") else ["--out", str(tmp_path / "model")]
    code, _, err = run_cli(capsys, "train", *expand(args, bad), *out_args)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "model").exists()


def test_train_refuses_to_replace_a_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    """`--out .` or `--out ~/project` must not delete the user's files (the checkpoint folder is replaced whole)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious\n")
    code, _, err = run_cli(capsys, "train", DATA, "--out", project, *TRAIN_FAST)
    assert_one_line_error(code, err, "refusing to replace", "not a memaudit checkpoint")
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]
    assert (project / "notes.txt").read_text() == "precious\n"


def test_train_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "model"
    target.write_text("keep me\n")
    code, _, err = run_cli(capsys, "train", DATA, "--out", target, *TRAIN_FAST)
    assert_one_line_error(code, err, "is a file")
    assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_train_resume_with_nothing_to_resume(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", DATA, "--out", tmp_path / "model", "--resume", *TRAIN_FAST)
    assert_one_line_error(code, err, "nothing to resume")


def smooth_exists() -> bool:
    return importlib.util.find_spec("memaudit.cli.smooth") is not None


@pytest.fixture
def need_smooth():
    pytest.importorskip("memaudit.cli.smooth")


SMOOTH_CASES = [
    ("text file as model", ["{bad}/notes.txt", "{DATA}"], ["not a readable torch checkpoint"]),
    ("json file as model", ["{bad}/model.json", "{DATA}"], ["json file"]),
    ("other tool's folder", ["{bad}/other_tool", "{DATA}"], ["unknown model folder"]),
    ("state dict without --factory", ["{bad}/state.pt", "{DATA}"], ["--factory"]),
    ("empty data folder", ["{MODEL}", "{bad}/empty"], ["no images found"]),
    ("corrupt png", ["{MODEL}", "{bad}/corrupt"], ["cannot read image"]),
    ("mixed sizes", ["{MODEL}", "{bad}/mixed"], ["different sizes"]),
    ("unknown option", ["{MODEL}", "{DATA}", "--no-such-option"], ["no such option"]),
    ("sigma out of the model's range", ["{MODEL}", "{DATA}", "--sigma-max", "1e6"], ["outside the sigma range"]),
    ("steps 0", ["{MODEL}", "{DATA}", "--steps", "0"], ["--steps"]),
    ("out is a foreign folder", ["{MODEL}", "{DATA}", "--out", "{bad}/other_tool"], ["refusing to replace"]),
]


@pytest.mark.parametrize("name,args,fragments", SMOOTH_CASES, ids=[c[0] for c in SMOOTH_CASES])
def test_smooth_bad_input(need_smooth, capsys, tmp_path, bad, name, args, fragments):
    args = expand(args, bad)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "smoothed")]
    if "--steps" not in args:
        args += ["--steps", "2"]
    code, _, err = run_cli(capsys, "smooth", *args, "--batch-size", "4", "--no-compare", "--quiet")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "smoothed").exists()
    assert sorted(p.name for p in (bad / "other_tool").iterdir()) == ["config.json"]


def test_smooth_missing_out(need_smooth, capsys):
    code, _, err = run_cli(capsys, "smooth", MODEL, DATA)
    assert_one_line_error(code, err, "--out")


# --- unwritable output paths and a full disk -------------------------------------------------------------

def is_atomic_temp(path, under: Path) -> bool:
    """A temporary file of memaudit.atomic (.NAME.XXXX.tmp), or a file inside such a folder, below `under`."""
    try:
        rel = Path(os.fspath(path)).resolve().relative_to(under.resolve())
    except (TypeError, ValueError):
        return False
    return any(part.startswith(".") and part.endswith(".tmp") for part in rel.parts)


class FullFile:
    """A file on a disk that is full: the first write stores part of the data, then fails with ENOSPC."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def __getattr__(self, name):
        return getattr(self._fh, name)


@pytest.fixture
def failing_writes(monkeypatch):
    """failing_writes(under, error): writes to atomic temp files below `under` fail like a full disk
    ("enospc": partial write, then OSError ENOSPC; safetensors raises its own SafetensorError) or a
    read-only folder ("eacces": PermissionError when the file is opened)."""

    def install(under: Path, error: str = "enospc"):
        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wax+")
            if writing and is_atomic_temp(file, under):
                if error == "eacces":
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
                return FullFile(real_open(file, mode, *args, **kwargs))
            return real_open(file, mode, *args, **kwargs)

        def fake_save_file(tensors, filename, metadata=None):
            if not is_atomic_temp(filename, under):
                return save_file(tensors, filename, metadata=metadata)
            if error == "eacces":
                raise SafetensorError(f"Error while serializing: I/O error: Permission denied (os error "
                                      f"{errno.EACCES})")
            with real_open(filename, "wb") as fh:
                fh.write(b"\0" * 100)
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error "
                                  f"{errno.ENOSPC})")

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(pathlib.Path, "open", lambda self, mode="r", *a, **k: fake_open(self, mode, *a, **k))
        monkeypatch.setattr("memaudit.models.native.save_file", fake_save_file)

    return install


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def previous_html(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "index.html").write_text("<html>previous report</html>\n")
    (folder / "report.md").write_text("# previous report\n")
    (folder / "worst_heun.png").write_bytes(b"previous png")


@pytest.mark.parametrize("option", ["--json", "--html", "--junit"])
@pytest.mark.parametrize("error,reason", [("enospc", "disk full"), ("eacces", "permission denied")])
def test_scan_report_write_fails_and_keeps_the_previous_report(capsys, tmp_path, failing_writes, option,
                                                               error, reason):
    out = tmp_path / "out"
    target = out / {"--json": "r.json", "--html": "html", "--junit": "j.xml"}[option]
    if option == "--html":
        previous_html(target)
    else:
        out.mkdir()
        target.write_bytes(b'{"previous": "report"}\n')
    before = snapshot(out)
    failing_writes(out, error)
    code, _, err = run_cli(capsys, "scan", MODEL, DATA, *FAST, option, target)
    assert_one_line_error(code, err, "cannot write", str(target), reason)
    assert ".tmp" not in err  # names the report, not a temporary file
    assert snapshot(out) == before  # byte-identical, no temp files left behind
    # The sampled work is kept for --resume until the reports are written.
    assert list((tmp_path / "cache").glob("scan-*/heun.json"))


def test_scan_disk_full_in_the_work_folder(capsys, tmp_path, failing_writes):
    failing_writes(tmp_path / "cache")
    code, _, err = run_cli(capsys, "scan", MODEL, DATA, *FAST, "--json", tmp_path / "r.json")
    assert_one_line_error(code, err, "heun-000000.pt", "disk full")
    assert not (tmp_path / "r.json").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@pytest.mark.parametrize("error,reason", [("enospc", "disk full"), ("eacces", "permission denied")])
def test_train_checkpoint_write_fails_and_keeps_the_previous_checkpoint(capsys, tmp_path, failing_writes,
                                                                        error, reason):
    out = tmp_path / "model"
    assert run_cli(capsys, "train", DATA, "--out", out, *TRAIN_FAST)[0] == 0
    before = snapshot(tmp_path)
    failing_writes(tmp_path, error)
    code, _, err = run_cli(capsys, "train", DATA, "--out", out, *TRAIN_FAST, "--seed", "1")
    assert_one_line_error(code, err, "cannot write", str(out), reason)
    assert snapshot(tmp_path) == before


def test_smooth_checkpoint_disk_full(need_smooth, capsys, tmp_path, failing_writes):
    failing_writes(tmp_path)
    code, _, err = run_cli(capsys, "smooth", MODEL, DATA, "--out", tmp_path / "smoothed", "--steps", "2",
                           "--batch-size", "4", "--k", "4", "--no-compare", "--quiet")
    assert_one_line_error(code, err, "cannot write", "disk full")
    assert not (tmp_path / "smoothed").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to read-only folders")
def test_read_only_folder(capsys, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        monkeypatch.setattr("memaudit.cli.scan.run_scan", lambda *a, **k: pytest.fail("scan started"))
        for args in (["scan", MODEL, DATA, "--json", locked / "r.json"], ["scan", MODEL, DATA, "--html", locked / "h"],
                     ["train", DATA, "--out", locked / "m", *TRAIN_FAST]):
            code, _, err = run_cli(capsys, *args)
            assert_one_line_error(code, err, "permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_train_out_current_folder_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = Path(__file__).resolve().parents[1] / "examples" / "digits" / "digits32.npz"
    code, _, err = run_cli(capsys, "train", data, "--out", ".", "--steps", "1", "--quiet")
    assert code == 2 and "current folder" in err and len(err.splitlines()) == 1


def test_first_lines_handles_empty_and_multiline_messages():
    from memaudit.errors import first_lines

    assert first_lines(RuntimeError("")) == "RuntimeError"
    assert first_lines(RuntimeError(""), with_type=True) == "RuntimeError"
    assert first_lines(ValueError("\n  a \n\n b\nc"), 2) == "a b"
    assert first_lines(KeyError("x"), with_type=True) == "KeyError: 'x'"


def test_no_character_breaks_a_one_line_error():
    """Every character str.splitlines breaks at (\\n, \\x85, U+2028, ...) is escaped in an error line
    (found by the fuzz test: a model path of '\\x85' split the message in two)."""
    from memaudit.errors import printable

    breaks = [chr(i) for i in range(0x3000) if len(f"a{chr(i)}b".splitlines()) > 1]
    assert "\n" in breaks and "\x85" in breaks and "\u2028" in breaks
    assert all(len(printable(f"a{c}b").splitlines()) == 1 for c in breaks)
