"""Issue 6: an interrupted scan resumes from its saved samples to the very same report; same seed, same device
= byte-identical JSON; a work folder from other settings (or another model) is never reused."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

import memaudit.scan as audit
from memaudit.scan import SampleStore, ScanConfig, run_scan
from memaudit.models.native import load_native
from memaudit.report import dumps_report

from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "digits32")
DATA = str(ROOT / "examples" / "digits" / "digits32.npz")
SMALL = dict(num_samples=24, batch_size=8, samplers=("heun", "sde"), steps=6, trajectory_samples=8,
             cosine_points=8, jacobian_points=2, jacobian_iters=2, metric_sigmas=3, fid="proxy")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model():
    return load_native(MODEL)


class Tasks:
    """A progress task factory that records every update and can raise KeyboardInterrupt once, when the task
    `interrupt` first reports at least `after` samples done (i.e. right after its first batch was saved)."""

    def __init__(self, interrupt: str | None = None, after: int = 1):
        self.interrupt, self.after, self.updates = interrupt, after, []

    def __call__(self, description, total):
        def advance(done, info=""):
            self.updates.append((description, done, info))
            if description == self.interrupt and done >= self.after:
                self.interrupt = None
                raise KeyboardInterrupt

        return advance

    def resumed(self) -> dict[str, int]:
        return {d: done for d, done, info in self.updates if info == "resumed"}


def count_calls(model) -> list[int]:
    calls, denoise = [0], model.denoise

    def counted(x, sigma):
        calls[0] += 1
        return denoise(x, sigma)

    model.denoise = counted
    return calls


def scan(model, train, workdir, resume=False, task=None, **overrides):
    return run_scan(model, train, ScanConfig(**{**SMALL, **overrides}), model_info={"spec": MODEL},
                    data_info={"path": DATA}, task=task, workdir=workdir, resume=resume)


def test_interrupted_scan_resumes_to_a_byte_identical_report(tmp_path, model, digits32):
    calls = count_calls(model)
    full = scan(model, digits32, tmp_path / "a")
    full_calls, calls[0] = calls[0], 0

    with pytest.raises(KeyboardInterrupt):  # heun finished, sde interrupted after its first batch of 8
        scan(model, digits32, tmp_path / "b", task=Tasks(interrupt="sample sde", after=8))
    saved = sorted(p.name for p in (tmp_path / "b").glob("scan-*/*"))
    assert saved == [f"heun-{i:06d}.pt" for i in range(3)] + ["heun.json", "sde-000000.pt", "sde.json"]

    calls[0] = 0
    tasks = Tasks()
    resumed = scan(model, digits32, tmp_path / "b", resume=True, task=tasks)
    assert tasks.resumed() == {"sample heun": 24, "sample sde": 8}
    assert calls[0] < full_calls  # heun and the first sde batch were not sampled again
    assert resumed.report.pop("provenance") == {"resumed": True, "runs": {
        "heun": {"resumed_samples": 24, "spot_checked": 2}, "sde": {"resumed_samples": 8, "spot_checked": 2}}}
    assert full.report.pop("provenance") == {"resumed": False, "runs": {
        "heun": {"resumed_samples": 0, "spot_checked": 0}, "sde": {"resumed_samples": 0, "spot_checked": 0}}}
    assert dumps_report(resumed.report) == dumps_report(full.report)
    for name in ("heun", "sde"):
        assert torch.equal(resumed.samples[name], full.samples[name])


def test_saved_samples_of_other_settings_or_another_model_are_not_reused(tmp_path, model, digits32):
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        scan(model, digits32, work, samplers=("heun",), task=Tasks(interrupt="sample heun", after=8))
    assert len(list(work.glob("scan-*/heun.json"))) == 1

    tasks = Tasks()
    other_seed = scan(model, digits32, work, resume=True, task=tasks, samplers=("heun",), seed=1)
    assert tasks.resumed() == {}
    fresh = scan(model, digits32, None, samplers=("heun",), seed=1)
    assert dumps_report(other_seed.report) == dumps_report(fresh.report)

    retrained = load_native(MODEL)  # the same path and settings, different weights
    with torch.no_grad():
        next(retrained.parameters()).add_(1e-3)
    tasks = Tasks()
    scan(retrained, digits32, work, resume=True, task=tasks, samplers=("heun",))  # settings as interrupted
    assert tasks.resumed() == {}
    tasks = Tasks()
    scan(model, digits32, work, resume=True, task=tasks, samplers=("heun",))
    assert tasks.resumed() == {"sample heun": 8}  # the interrupted run's own samples are still there


def test_corrupt_saved_samples_are_resampled(tmp_path, model, digits32):
    work = tmp_path / "work"
    full = scan(model, digits32, None, samplers=("heun",))
    with pytest.raises(KeyboardInterrupt):
        scan(model, digits32, work, samplers=("heun",), task=Tasks(interrupt="sample heun", after=8))
    [saved] = work.glob("scan-*/heun-000000.pt")
    saved.write_bytes(saved.read_bytes()[:100])  # e.g. the machine died while the disk was full
    tasks = Tasks()
    again = scan(model, digits32, work, resume=True, task=tasks, samplers=("heun",))
    assert tasks.resumed() == {}
    assert dumps_report(again.report) == dumps_report(full.report)


# --- the CLI ---------------------------------------------------------------------------------------------

CLI_FAST = ["--samples", "16", "--batch-size", "8", "--steps", "4", "--sampler", "heun", "--skip", "jacobian",
            "--fid", "proxy", "--quiet"]


@pytest.fixture
def interrupt_after_first_batch(monkeypatch):
    """Ctrl-C right after the first sampling batch was saved to the work folder."""
    from test_fail_closed import interrupt_after_first_batch as interrupt

    interrupt(monkeypatch)


@pytest.fixture
def resumed_states(monkeypatch):
    """The number of saved samples each sampling run started from (0 = from scratch)."""
    starts, sample = [], audit.sample

    def recording_sample(*args, batches=(), **kwargs):
        starts.append(sum(b.samples.shape[0] for b in batches))
        return sample(*args, batches=batches, **kwargs)

    monkeypatch.setattr(audit, "sample", recording_sample)
    return starts


def without_provenance(path) -> dict:
    """A JSON report without its provenance (which says whether the run resumed)."""
    import json

    report = json.loads(Path(path).read_text())
    report.pop("provenance")
    return report


def scan_cli(capsys, tmp_path, *args):
    return run_cli(capsys, "scan", MODEL, DATA, *CLI_FAST, "--workdir", tmp_path / "work", *args)


def test_cli_resume_after_ctrl_c(tmp_path, capsys, interrupt_after_first_batch, resumed_states):
    code, out, err = scan_cli(capsys, tmp_path, "--json", tmp_path / "r.json")
    assert code == 130
    assert len(err.splitlines()) == 1 and err.startswith("error: interrupted") and "--resume" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
    assert len(list((tmp_path / "work").glob("scan-*/heun.json"))) == 1

    code, _, err = scan_cli(capsys, tmp_path, "--json", tmp_path / "r.json", "--resume")
    assert code == 0, err
    assert resumed_states == [0, 8]  # the interrupted run from scratch, the resumed one after its first batch
    assert not list((tmp_path / "work").glob("scan-*"))  # deleted once the report was written

    code, _, err = run_cli(capsys, "scan", MODEL, DATA, *CLI_FAST, "--json", tmp_path / "ref.json")
    assert code == 0, err
    assert without_provenance(tmp_path / "r.json") == without_provenance(tmp_path / "ref.json")
    assert json.loads((tmp_path / "r.json").read_text())["provenance"]["runs"]["heun"]["resumed_samples"] == 8


def test_cli_resume_with_other_settings_starts_afresh(tmp_path, capsys, interrupt_after_first_batch,
                                                      resumed_states):
    assert scan_cli(capsys, tmp_path, "--seed", "0")[0] == 130
    [seed0_work] = (tmp_path / "work").glob("scan-*")
    code, _, err = scan_cli(capsys, tmp_path, "--seed", "1", "--resume", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert resumed_states == [0, 0]  # the interrupted run, then the seed-1 run: both from scratch
    assert [p.name for p in (tmp_path / "work").glob("scan-*")] == [seed0_work.name]  # left for its own resume
    code, _, err = run_cli(capsys, "scan", MODEL, DATA, *CLI_FAST, "--seed", "1", "--json", tmp_path / "ref.json")
    assert code == 0, err
    assert (tmp_path / "r.json").read_bytes() == (tmp_path / "ref.json").read_bytes()


def test_cli_work_folder_is_kept_until_the_reports_are_written(tmp_path, capsys, monkeypatch, resumed_states):
    import memaudit.cli.scan as scan_module

    write_outputs = scan_module.write_outputs

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scan_module, "write_outputs", disk_full)
    code, _, err = scan_cli(capsys, tmp_path, "--json", tmp_path / "r.json")
    assert code == 2 and err.startswith("error: ") and "disk full" in err, err
    assert len(list((tmp_path / "work").glob("scan-*/heun.json"))) == 1

    monkeypatch.setattr(scan_module, "write_outputs", write_outputs)
    code, _, err = scan_cli(capsys, tmp_path, "--json", tmp_path / "r.json", "--resume")
    assert code == 0, err
    assert resumed_states == [0, 16]  # the second run sampled nothing
    assert (tmp_path / "r.json").is_file()
    assert not list((tmp_path / "work").glob("scan-*"))


def test_cli_same_seed_gives_byte_identical_reports(tmp_path, capsys):
    def run(name, seed):
        code, _, err = run_cli(capsys, "scan", MODEL, DATA, *CLI_FAST, "--sampler", "sde", "--seed", seed,
                               "--json", tmp_path / f"{name}.json", "--html", tmp_path / name)
        assert code == 0, err
        return (tmp_path / f"{name}.json").read_bytes(), {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}

    a, b, c = run("a", "7"), run("b", "7"), run("c", "8")
    assert a[0] == b[0]
    assert a[1] == b[1]  # the HTML report and its PNG grids too
    assert a[0] != c[0]


def test_a_batch_is_streamed_to_disk_with_the_digest_of_its_bytes(tmp_path):
    """SampleStore.save writes torch.save's bytes straight to the file (no in-memory copy of the batch) and
    records their sha256; a full disk surfaces as its OSError (ENOSPC), not torch's RuntimeError."""
    import hashlib

    from memaudit.sampling import Batch, Trajectory
    from memaudit.workdir import save_streamed

    state = torch.Generator().manual_seed(0).get_state()
    xs = [torch.randn(3, 1, 8, 8) for _ in range(2)]
    batch = Batch(torch.randn(3, 1, 8, 8), state, state, Trajectory([2.0, 1.0], xs, xs, None))
    store = SampleStore(tmp_path, {"test": 1})
    store.save("heun", [batch])
    entry = json.loads(store.manifest_path("heun").read_text())["batches"][0]
    data = (store.folder / entry["file"]).read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    [loaded], problem = store.load("heun", 3, (1, 8, 8))
    assert problem is None and torch.equal(loaded.samples, batch.samples)

    class FullDisk:
        def __init__(self):
            self.written = 0

        def write(self, chunk):
            self.written += len(chunk)
            if self.written > 200:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(chunk)

        def flush(self):
            pass

    with pytest.raises(OSError) as exc:
        save_streamed({"samples": batch.samples}, FullDisk())
    assert exc.value.errno == errno.ENOSPC
