"""Issue 12, item 4: torchrun ranks (gloo, two CPU processes) share the sampling batch by batch and rank 0
writes one report, byte-identical to one process's; gates, bad input and resume behave as in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memaudit.sampling import SamplerConfig, sample

from dist_ranks import BATCH, N, SEED, STEPS, Shrink

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "digits32")
DATA = str(ROOT / "examples" / "digits" / "digits32.npz")
SCAN = ["--samples", "24", "--batch-size", "8", "--steps", "6", "--quiet"]  # 3 batches over 2 ranks
RANKS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: list[str], tmp_path: Path, world: int = RANKS, script: list[str] | None = None,
              per_rank: list[list[str]] | None = None):
    """Start `world` ranks as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); their
    (exit code, stderr) in rank order. per_rank: each rank's own scan arguments (instead of argv)."""
    port = free_port()
    procs = []
    for rank in range(world):
        argv = per_rank[rank] if per_rank is not None else argv
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MEMAUDIT_CACHE": str(tmp_path / "cache"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               "MEMAUDIT_DIST_TIMEOUT": "120"}
        cmd = [sys.executable, *(script or ["-m", "memaudit", "scan", *argv])]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        out.append((p.returncode, err))
    return out


def one_process(argv: list[str], tmp_path: Path):
    env = {**os.environ, "MEMAUDIT_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "memaudit", "scan", *argv], env=env, capture_output=True, text=True)
    return p.returncode, p.stderr


def reports(folder: Path) -> list[str]:
    return ["--json", str(folder / "r.json"), "--junit", str(folder / "r.xml"), "--html", str(folder / "html")]


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_ranks_write_the_report_of_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert one_process([MODEL, DATA, *SCAN, *reports(one)], tmp_path) == (0, "")
    codes = run_ranks([MODEL, DATA, *SCAN, *reports(two)], tmp_path)
    assert [c for c, _ in codes] == [0, 0], codes
    assert tree(one) and tree(one) == tree(two)  # JSON, JUnit and every HTML file, byte for byte


def test_a_failed_gate_is_exit_1_on_every_rank(tmp_path):
    codes = run_ranks([MODEL, DATA, *SCAN, "--fail-on", "memorized_fraction>0.01", "--json",
                       str(tmp_path / "r.json")], tmp_path)
    assert [c for c, _ in codes] == [1, 1], codes
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "fail" and report["gates"][0]["passed"] is False


def test_bad_input_is_exit_2_on_every_rank(tmp_path):
    codes = run_ranks([MODEL, str(tmp_path / "missing.npz"), *SCAN], tmp_path)
    assert [c for c, _ in codes] == [2, 2], codes
    assert all(err.startswith("error: ") and "Traceback" not in err for _, err in codes)


def test_an_error_only_rank_0_sees_stops_every_rank_with_its_code(tmp_path):
    """Only rank 0 clusters near-duplicates; the other rank, waiting for the first sampling round, gets
    rank 0's exit code (2) instead of hanging."""
    data = tmp_path / "same.npy"
    np.save(data, np.zeros((4, 8, 8, 1), dtype=np.uint8))
    codes = run_ranks([MODEL, str(data), *SCAN], tmp_path)
    assert [c for c, _ in codes] == [2, 2], codes
    assert "near-duplicate" in codes[0][1] and codes[1][1] == ""


def test_ranks_that_loaded_other_data_stop_the_job_as_bad_input(tmp_path):
    """Rank 1 reads another training set of the same shape (a stale copy on another node): in one process the
    gate fails; sharing the work, rank 1 would search its own copy and the job could pass. Both exit 2."""
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(0).integers(0, 256, (32, 8, 8, 1), dtype=np.uint8))
    gate = ["--fail-on", "memorized_fraction>0.5"]
    codes = run_ranks([], tmp_path, per_rank=[[MODEL, DATA, *SCAN, *gate], [MODEL, str(other), *SCAN, *gate]])
    assert [c for c, _ in codes] == [2, 2], codes
    assert "torchrun ranks 1 loaded another data than rank 0" in codes[0][1], codes[0][1]
    assert all("Traceback" not in err for _, err in codes)


def test_a_rank_that_fails_alone_before_the_scan_stops_every_rank_as_bad_input(tmp_path):
    """Only rank 1's DATA is missing: it prints its error, rank 0 says which rank stopped; both exit 2 (rank 1
    used to wait for a Stop while rank 0 began sampling, and exit 3)."""
    codes = run_ranks([], tmp_path, per_rank=[[MODEL, DATA, *SCAN], [MODEL, str(tmp_path / "gone.npz"), *SCAN]])
    assert [c for c, _ in codes] == [2, 2], codes
    assert "torchrun rank 1 stopped before the scan began (exit 2)" in codes[0][1]
    assert codes[1][1].startswith("error: ") and "gone.npz" in codes[1][1]
    assert all("Traceback" not in err for _, err in codes)


def launch(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m memaudit.launch --nproc_per_node 2 --standalone scan ...` (torchrun itself, two ranks)."""
    env = {**os.environ, "MEMAUDIT_CACHE": str(tmp_path / "cache"), "MEMAUDIT_DIST_TIMEOUT": "120"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "memaudit.launch", "--nproc_per_node", str(RANKS), "--standalone",
                           "scan", *argv], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case,code", [("gate", 1), ("bad input", 2)])
def test_the_launcher_exits_with_memaudits_code_where_torchrun_says_1(tmp_path, case, code):
    """torchrun folds every failed rank into exit 1; memaudit.launch runs it and exits with the ranks' code."""
    argv = [MODEL, DATA, *SCAN, "--fail-on", "memorized_fraction>0.01"] if case == "gate" else \
        [MODEL, str(tmp_path / "missing.npz"), *SCAN]
    done = launch(argv, tmp_path)
    assert done.returncode == code, done.stderr[-2000:]
    assert ("status: FAIL" in done.stdout) if case == "gate" else ("error: data not found" in done.stderr)


def test_the_launcher_reads_rank_0s_code_and_names_signals_internal():
    from memaudit.launch import job_code, split_argv

    assert split_argv(["--nproc_per_node", "2", "scan", "M", "D", "--samples", "4"]) == \
        (["--nproc_per_node", "2"], ["scan", "M", "D", "--samples", "4"])
    assert split_argv(["--nnodes", "1"]) == (["--nnodes", "1"], [])
    assert job_code({0: 1, 1: 1}) == 1 and job_code({1: 2}) == 2 and job_code({0: 130}) == 130
    assert job_code({0: -9}) == 3 and job_code({2: 7, 1: -6}) == 3


def test_other_commands_refuse_torchrun(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2"}
    p = subprocess.run([sys.executable, "-m", "memaudit", "inspect", MODEL], env=env, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "only `memaudit scan` runs under torchrun" in p.stderr


def local_reference():
    samples, trajs = sample(Shrink(), N, SamplerConfig(sampler="euler", steps=STEPS), seed=SEED, batch_size=BATCH,
                            record=4)
    return samples, [torch.stack(t.xs) for t in trajs]


@pytest.mark.parametrize("scenario", ["plain", "resume"])
def test_shared_batches_equal_one_process(tmp_path, scenario):
    """Sampling shared over ranks (4 batches on 2 ranks; resumed after the first batch) gives one process's
    samples and trajectories exactly."""
    out = tmp_path / "out.pt"
    codes = run_ranks([], tmp_path, script=[str(ROOT / "tests" / "dist_ranks.py"), scenario, str(out)])
    assert [c for c, _ in codes] == [0, 0], codes
    got = torch.load(out, weights_only=True)
    samples, trajs = local_reference()
    assert torch.equal(got["samples"], samples)
    assert len(got["trajectories"]) == len(trajs) and all(map(torch.equal, got["trajectories"], trajs))


def test_a_rank_that_cannot_draw_fails_the_job_with_its_error(tmp_path):
    out = tmp_path / "out.txt"
    codes = run_ranks([], tmp_path, script=[str(ROOT / "tests" / "dist_ranks.py"), "fail", str(out)])
    assert [c for c, _ in codes] == [2, 2], codes
    assert out.read_text() == "rank 1 could not draw its batch"


def test_row_work_is_shared_block_by_block_and_gathered_in_row_order(tmp_path):
    """memaudit.shared_rows.map_rows on 2 ranks: 10 rows in blocks of 3, block b computed by rank b mod 2, the
    results back on rank 0 in row order (what the metrics' searches and trajectory work rely on)."""
    out = tmp_path / "out.pt"
    codes = run_ranks([], tmp_path, script=[str(ROOT / "tests" / "dist_ranks.py"), "rows", str(out)])
    assert [c for c, _ in codes] == [0, 0], codes
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["values"], 2.0 * torch.arange(10.0).reshape(10, 1))
    assert got["ranks"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1]


def test_a_rank_whose_row_work_fails_fails_the_job_with_its_error(tmp_path):
    out = tmp_path / "out.txt"
    codes = run_ranks([], tmp_path, script=[str(ROOT / "tests" / "dist_ranks.py"), "rows-fail", str(out)])
    assert [c for c, _ in codes] == [2, 2], codes
    assert out.read_text() == "rank 1 could not do its rows"
