"""--index ivf: the approximate index, its measured recall against brute force, and the fail-closed recall gate."""

import numpy as np
import pytest
import torch

from memaudit.errors import UserError
from memaudit.indexes import build_index, parse_index
from memaudit.ivf import ByteIVFIndex, IVFIndex, default_nlist
from memaudit.metrics.index_recall import recall_of
from memaudit.storage import ImageStore

from tests.cli_helpers import run_cli


def clustered(n=3000, d=16, centres=30, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * 4
    x = c[rng.integers(0, centres, n)] + rng.normal(size=(n, d))
    return torch.tensor(x, dtype=torch.float32)


def brute_force(queries, points, k):
    d = ((queries.double()[:, None, :] - points.double()[None]) ** 2).sum(-1).sqrt()
    return d.sort(1)


def test_parse_index_names_the_flag_on_bad_input():
    assert parse_index("exact") == ("exact", {})
    assert parse_index("ivf:nlist=64,nprobe=8") == ("ivf", {"nlist": 64, "nprobe": 8})
    for bad in ("hnsw", "ivf:nlist", "ivf:probes=3", "ivf:nlist=abc", "exact:nlist=3"):
        with pytest.raises(UserError, match="--index"):
            parse_index(bad)


def test_scanning_every_cell_is_exact_search():
    points, queries = clustered(), clustered(200, seed=1)
    index = IVFIndex(points, nlist=50, nprobe=50)
    dist, idx = index.search(queries, 3)
    ref_d, ref_i = brute_force(queries, points, 3)
    np.testing.assert_allclose(dist.numpy(), ref_d[:, :3].numpy(), rtol=1e-5, atol=1e-5)
    assert (idx == ref_i[:, :3]).float().mean() > 0.999  # ties aside, the same neighbours


def test_measured_recall_equals_a_brute_force_count():
    """recall_at_1 and the verdict agreement of a deliberately weak index (1 of 60 cells) equal what numpy finds
    by comparing the index's neighbours with brute force."""
    points, queries = clustered(), clustered(300, seed=2) * 1.3
    index = build_index(points, "ivf:nlist=60,nprobe=1")
    got = recall_of(index, queries, 2, None, 1 / 3)
    approx_d, _ = index.search(queries, 2)
    ref_d, _ = brute_force(queries, points, 2)
    found = (approx_d[:, 0].double() <= ref_d[:, 0] * (1 + 1e-6) + 1e-12).double().mean()
    assert 0.3 < got["recall_at_1"] < 1  # weak enough to miss some
    assert got["recall_at_1"] == pytest.approx(float(found), abs=1e-12)
    approx_mem = (approx_d[:, 0] / approx_d[:, 1]).numpy() < 1 / 3
    exact_mem = (ref_d[:, 0] / ref_d[:, 1]).numpy() < 1 / 3
    assert got["agreement"] == pytest.approx(float(np.mean(approx_mem == exact_mem)), abs=1e-12)
    assert got["memorized_fraction_exact"] == pytest.approx(float(exact_mem.mean()), abs=1e-12)


def test_default_nlist_keeps_39_points_per_cell():
    assert default_nlist(32) == 1 and default_nlist(10_000) == 256 and default_nlist(1_000_000) == 4000


def scan_ivf(capsys, tmp_path, spec, model="examples/models/digits32"):
    data = tmp_path / "d.npy"
    rng = np.random.default_rng(0)
    np.save(data, rng.integers(0, 256, (400, 8, 8), dtype=np.uint8))
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "scan", model, data, "--samples", "16", "--sampler", "heun",
                           "--steps", "6", "--skip", "jacobian", "--index", spec, "--json", out, "--quiet")
    import json
    return code, json.loads(out.read_text()) if out.exists() else None, err


def test_a_low_recall_fails_the_scan(capsys, tmp_path):
    """Digit-like samples against random training images: 1 of 40 cells misses most true neighbours, and the
    automatic gate index_recall<0.99 fails the scan (exit 1), whatever the memorized fraction says."""
    code, report, _ = scan_ivf(capsys, tmp_path, "ivf:nlist=40,nprobe=1")
    assert code == 1 and report["status"] == "fail"
    gate = next(g for g in report["gates"] if g["metric"] == "index_recall")
    assert not gate["passed"] and report["summary"]["index_recall"] < 0.99


def test_an_exhaustive_ivf_passes_with_recall_1(capsys, tmp_path):
    code, report, _ = scan_ivf(capsys, tmp_path, "ivf:nlist=8,nprobe=8")
    assert code == 0 and report["summary"]["index_recall"] == 1.0
    assert report["index_recall"]["index"] == {"kind": "ivf", "nlist": 8, "nprobe": 8, "scanned_fraction": 1.0}
    assert report["settings"]["index"] == "ivf:nlist=8,nprobe=8"


def test_cells_too_small_for_k_are_widened_not_padded():
    """nprobe 1 of 100 cells over 300 points: many cells hold fewer than 8 points; every row still gets 8 real
    neighbours (no faiss -1 padding), each with its exact distance."""
    points = clustered(300)
    index = IVFIndex(points, nlist=100, nprobe=1)
    dist, idx = index.search(points[:50], 8)
    assert int(idx.min()) >= 0
    direct = (points[:50, None, :] - points[idx]).norm(dim=-1)
    np.testing.assert_allclose(dist.numpy(), direct.numpy(), rtol=1e-5, atol=1e-6)


def byte_store(n=1500, d=(3, 4, 4), seed=0, copies=0):
    """A uint8 ImageStore of clustered bytes (NHWC memory, read as NCHW like a loaded .npy); `copies` rows repeat
    earlier ones exactly."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(30, 226, (20, d[1], d[2], d[0]))
    u = np.clip(centres[rng.integers(0, 20, n)] + rng.normal(0, 12, (n, d[1], d[2], d[0])), 0, 255).astype(np.uint8)
    u[n - copies:] = u[:copies]
    return ImageStore(torch.from_numpy(u).permute(0, 3, 1, 2))


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_ivf_over_a_uint8_store_scanning_every_cell_is_the_exact_search(scale):
    """ByteIVFIndex (faiss holds the byte values) with nprobe = nlist: the exact neighbours of brute force over
    the store's float32 values u / 127.5 - 1, with their exact distances, also for queries beyond the pixel
    range (scale 1.5: samples need not stay in [-1, 1]; d = 48, a multiple of 16); with one cell of 30 scanned,
    it still returns real neighbours at exact distances, and finds most of the true ones."""
    store = byte_store()
    points = store.float().reshape(len(store), -1)
    noise = 0.05 * torch.randn(40, points.shape[1], generator=torch.Generator().manual_seed(2))
    queries = (points[:40] + noise) * scale
    ref = brute_force(queries, points, 5)
    full = ByteIVFIndex(store, nlist=30, nprobe=30)
    dist, idx = full.search(queries, 5)
    assert torch.equal(idx, ref.indices[:, :5])
    np.testing.assert_allclose(dist.numpy(), ref.values[:, :5].numpy(), rtol=1e-6)
    one = ByteIVFIndex(store, nlist=30, nprobe=1)
    dist, idx = one.search(queries, 5)
    direct = (queries.double()[:, None, :] - points.double()[idx]).norm(dim=-1)
    np.testing.assert_allclose(dist.numpy(), direct.numpy(), rtol=1e-6)
    found = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx.tolist(), ref.indices[:, :5].tolist())])
    assert found > 0.5


def test_ivf_over_a_uint8_store_finds_exact_copies_within_a_radius():
    """pairs_within over the store's own rows: every pair of exact copies (distance 0) and every pair brute
    force puts within the radius, and no other (scanning every cell)."""
    store = byte_store(copies=25)
    points = store.float().reshape(len(store), -1)
    index = ByteIVFIndex(store, nlist=20, nprobe=20)
    radius = 0.3
    got = {(i, j) for i, j in index.pairs_within(points.numpy(), radius) if i != j}
    dist = brute_force(points, points, len(store))
    want = set()
    for i in range(len(store)):
        for value, j in zip(dist.values[i].tolist(), dist.indices[i].tolist()):
            if value > radius:
                break
            if j != i:
                want.add((i, j))
    assert {(i, i - 1500 + 25) for i in range(1475, 1500)} <= got  # the copies
    assert got == want


def test_a_scan_of_a_uint8_set_takes_ivf_and_measures_its_recall(capsys, tmp_path, monkeypatch):
    """Over the float budget the set stays uint8; --index ivf runs on it (it was refused) and reports its recall;
    scanning every cell it gives the exact index's NN-ratio section."""
    monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", "1000")
    (tmp_path / "exact").mkdir(), (tmp_path / "ivf").mkdir()
    exact_code, exact, _ = scan_ivf(capsys, tmp_path / "exact", "exact")
    code, report, err = scan_ivf(capsys, tmp_path / "ivf", "ivf:nlist=8,nprobe=8")
    assert (exact_code, code) == (0, 0), err
    assert report["summary"]["index_recall"] == 1.0 and report["index_recall"]["index"]["kind"] == "ivf"
    assert report["runs"]["heun"]["nn_ratio"] == exact["runs"]["heun"]["nn_ratio"]


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "1.5"])
def test_a_min_recall_that_is_not_a_recall_is_bad_input_naming_the_flag(capsys, tmp_path, value):
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (60, 8, 8), dtype=np.uint8))
    code, _, err = run_cli(capsys, "scan", "empirical", data, "--index", "ivf", "--min-recall", value)
    assert code == 2 and err.startswith("error: --min-recall must be a recall in [0, 1]") and err.count("\n") == 1
