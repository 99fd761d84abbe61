"""`memaudit scan` end to end: reports, gates and exit codes (0 pass, 1 gate failed, 2 bad input)."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from cli_helpers import run_cli

MODEL, DATA = "examples/models/digits32", "examples/digits/digits32.npz"
FAST = ["--samples", "16", "--steps", "8", "--sampler", "heun", "--skip", "jacobian", "--quiet"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "cache"))


def test_reports_and_failing_gate(tmp_path, capsys):
    code, out, err = run_cli(capsys, "scan", MODEL, DATA, *FAST, "--json", tmp_path / "r.json",
                             "--html", tmp_path / "html", "--junit", tmp_path / "j.xml",
                             "--fail-on", "memorized_fraction>0.5", "--fail-on", "fid_proxy>1000")
    assert code == 1, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == "memaudit.scan/1" and report["status"] == "fail"
    assert [g["passed"] for g in report["gates"]] == [False, True]
    assert report["summary"]["memorized_fraction"] > 0.5
    assert "FAIL" in out and "memorized" in out
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1" and suite.get("tests") == "2"
    assert (tmp_path / "html" / "index.html").read_text().count("<svg") >= 2
    assert (tmp_path / "html" / "worst_heun.png").is_file()


def test_passing_gate_exits_zero(capsys):
    code, out, err = run_cli(capsys, "scan", "examples/models/digits-all", "examples/digits/digits.npz", *FAST,
                             "--fail-on", "memorized_fraction>0.5")
    assert code == 0, err
    assert "PASS" in out


@pytest.mark.parametrize("args,message", [
    (["scan", MODEL, "missing.npz"], "data not found"),
    (["scan", "no/such/model", DATA], "not found"),
    (["scan", MODEL, DATA, "--fail-on", "memorized_fraction>>1"], "gate"),
    (["scan", MODEL, DATA, "--fail-on", "nonsense_metric>1"], "unknown metric"),
    (["scan", MODEL, DATA, "--sampler", "magic"], "sampler"),
    (["scan", MODEL, DATA, "--samples", "0"], "--samples"),
    (["scan", MODEL, DATA, "--sigma-min", "500", "--sigma-max", "600", *FAST], "sigma"),
    (["scan", MODEL, "examples/digits/digits.npz", "--resize", "16", *FAST], "shape mismatch"),
    (["scan", MODEL, DATA, "--device", "cuda"], "cuda"),
    (["scan", MODEL, DATA, "--no-such-option"], "No such option"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message.lower() in err.lower()


def test_console_script_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memaudit", "scan", "empirical", DATA, *FAST,
                           "--json", str(tmp_path / "e.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "e.json").read_text())["summary"]["memorized_fraction"] == 1.0


TEARDOWN_ABORTS = """
import os, sys
class AbortAtTeardown:  # as a native thread still alive at the interpreter's teardown can (SIGABRT)
    def __del__(self):
        os.abort()
sys.modules["abort_at_teardown"] = AbortAtTeardown()
import atexit
atexit.register(lambda: print("exit handlers ran", file=sys.stderr))
from memaudit.cli.app import {entry}
sys.argv = ["memaudit", *sys.argv[1:]]
{entry}()
"""


@pytest.mark.parametrize("entry, code", [("console_main", 1), ("main", -6)])
def test_the_command_exits_with_its_code_whatever_the_teardown_does(tmp_path, entry, code):
    """A failed gate is exit 1 even when the interpreter's teardown would abort (console_main, the `memaudit`
    and `python -m memaudit` entry, skips it after the exit handlers and a flush); main() alone shows the
    abort this guards against. The report and the whole terminal summary are there."""
    proc = subprocess.run([sys.executable, "-c", TEARDOWN_ABORTS.format(entry=entry), "scan", "empirical", DATA,
                           *FAST, "--fail-on", "memorized_fraction>0.5", "--json", str(tmp_path / "e.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "exit handlers ran" in proc.stderr and proc.stdout.rstrip().endswith("status: FAIL (0/1 gates passed)")
    assert json.loads((tmp_path / "e.json").read_text())["summary"]["memorized_fraction"] == 1.0


def test_inception_features_without_clean_fid_is_a_clear_error(capsys):
    pytest.importorskip("torch")
    from memaudit.metrics.fid import cleanfid_available

    if cleanfid_available():
        pytest.skip("clean-fid is installed here")
    code, _, err = run_cli(capsys, "scan", MODEL, DATA, *FAST, "--features", "inception")
    assert code == 2 and "clean-fid" in err and len(err.splitlines()) == 1


def test_torchscript_export_scans_like_the_native_checkpoint(tmp_path, capsys):
    """The bundled UNet exported as TorchScript (--param edm --schedule edm) gives the same report numbers."""
    import torch

    from memaudit.models.native import load_native

    net = load_native(MODEL).net
    scripted = torch.jit.trace(net, (torch.zeros(2, 1, 8, 8), torch.zeros(2)))
    torch.jit.save(scripted, str(tmp_path / "unet.pt"))
    code, _, err = run_cli(capsys, "scan", MODEL, DATA, *FAST, "--json", tmp_path / "native.json")
    assert code == 0, err
    code, _, err = run_cli(capsys, "scan", tmp_path / "unet.pt", DATA, *FAST, "--json", tmp_path / "ts.json",
                           "--param", "edm", "--schedule", "edm")
    assert code == 0, err
    native = json.loads((tmp_path / "native.json").read_text())
    ts = json.loads((tmp_path / "ts.json").read_text())
    assert ts["model"]["kind"] == "torchscript"
    assert ts["summary"]["memorized_fraction"] == native["summary"]["memorized_fraction"]
    assert ts["summary"]["mean_nn_ratio"] == pytest.approx(native["summary"]["mean_nn_ratio"], rel=1e-4)
    code, _, err = run_cli(capsys, "scan", tmp_path / "unet.pt", DATA, *FAST)
    assert code == 2 and "--param" in err
