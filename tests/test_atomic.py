"""Issue 6: checkpoints and reports are written atomically: a crash in the middle of a write leaves the previous
folder or file exactly as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memaudit.atomic as atomic
import memaudit.models.native as native
import memaudit.report.html as html
from memaudit.atomic import atomic_dir, write_text_atomic
from memaudit.errors import UserError
from memaudit.models.native import load_native, make_unet_denoiser, save_native
from memaudit.report import write_html, write_json

from report_fixture import make_report, make_tensors

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny(seed: int):
    torch.manual_seed(seed)
    return make_unet_denoiser((1, 8, 8), base_channels=8)


@pytest.fixture
def checkpoint(tmp_path):
    folder = save_native(tiny(0), tmp_path / "ckpt", history=[{"action": "train"}])
    return folder, snapshot(tmp_path)


class Crash(Exception):
    """Stands for anything that stops a write half-way (a bug, a signal turned into an exception)."""


@pytest.mark.parametrize("crash", [Crash, KeyboardInterrupt])
def test_crash_while_writing_the_weights_keeps_the_previous_checkpoint(tmp_path, monkeypatch, checkpoint, crash):
    folder, before = checkpoint

    def half_written(state, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise crash("stopped half-way")

    monkeypatch.setattr(native, "save_file", half_written)
    with pytest.raises(crash):
        save_native(tiny(1), folder)
    assert snapshot(tmp_path) == before  # same files, same bytes, no temp folder left
    reloaded = load_native(folder)
    assert torch.equal(next(reloaded.parameters()), next(tiny(0).parameters()))


def test_crash_while_writing_the_config_keeps_the_previous_checkpoint(tmp_path, monkeypatch, checkpoint):
    folder, before = checkpoint
    write_text = Path.write_text

    def crash_on_config(self, text, *args, **kwargs):
        if self.name == "config.json":
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise Crash("half of config.json written")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", crash_on_config)
    with pytest.raises(Crash):
        save_native(tiny(1), folder)
    assert snapshot(tmp_path) == before


def test_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch, checkpoint):
    """The last step moves the old folder aside and the new one in; if the second rename fails, undo the first."""
    folder, before = checkpoint
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(UserError, match="cannot write .*ckpt: Input/output error"):
        save_native(tiny(1), folder)
    assert calls[0][1].startswith(".ckpt.old-") and calls[1][1] == "ckpt"
    assert snapshot(tmp_path) == before


def test_killed_process_leaves_the_previous_checkpoint(tmp_path, checkpoint):
    """A real crash (SIGKILL while the weights are half written): no cleanup code runs, yet the checkpoint
    folder is the previous one and the next save works."""
    folder, before = checkpoint
    script = textwrap.dedent(f"""
        import sys, time, torch
        from pathlib import Path
        import memaudit.models.native as native
        def half_written(state, filename, metadata=None):
            Path(filename).write_bytes(b"\\0" * 64)
            print("writing", flush=True)
            time.sleep(60)
        native.save_file = half_written
        torch.manual_seed(1)
        native.save_native(native.make_unet_denoiser((1, 8, 8), base_channels=8), {str(folder)!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    after = snapshot(folder)
    assert after == {k[len("ckpt/"):]: v for k, v in before.items() if k.startswith("ckpt/")}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.") and leftovers[0].endswith(".tmp")
    load_native(folder)
    save_native(tiny(2), folder)  # the next save is not disturbed by the dead run's temp folder
    assert snapshot(folder) != after


@pytest.fixture
def html_report(tmp_path):
    folder = tmp_path / "report"
    samples, train = make_tensors(0)
    write_html(make_report(0), folder, samples=samples, train=train)
    before = snapshot(tmp_path)
    assert {"index.html", "report.md", "samples_heun.png", "worst_sde.png"} <= {Path(n).name for n in before}
    return folder, before


@pytest.mark.parametrize("where", ["a png", "index.html", "report.md"])
def test_crash_while_writing_the_html_report_keeps_the_previous_one(tmp_path, monkeypatch, html_report, where):
    folder, before = html_report
    if where == "a png":
        written = []

        def save_png(image, path):  # the third image is cut off half-way
            if len(written) == 2:
                Path(path).write_bytes(b"\x89PNG half")
                raise Crash(where)
            written.append(path)
            html_save_png(image, path)

        html_save_png = html.save_png
        monkeypatch.setattr(html, "save_png", save_png)
    else:
        name = "render_html" if where == "index.html" else "render_markdown"
        render = getattr(html, name)

        def crash_after_render(*args):
            render(*args)
            raise Crash(where)

        monkeypatch.setattr(html, name, crash_after_render)
    samples, train = make_tensors(1)
    with pytest.raises(Crash):
        write_html(make_report(1), folder, samples=samples, train=train)
    assert snapshot(tmp_path) == before


def test_crash_while_writing_a_file_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_text_atomic(target, '{"schema": "memaudit.scan/1", "previous": true}\n')
    before = snapshot(tmp_path)

    def half(self, text, *args, **kwargs):
        with open(self, "w") as fh:
            fh.write(text[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, '{"schema": "memaudit.scan/1", "previous": false}\n')
    assert snapshot(tmp_path) == before


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "x"
    target.write_text("a file\n")
    with pytest.raises(UserError, match="is a file"):
        with atomic_dir(target):
            pass
    assert target.read_text() == "a file\n" and [p.name for p in tmp_path.iterdir()] == ["x"]
