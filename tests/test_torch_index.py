"""--index torch: exact search as torch GEMMs on the scan's device; bf16/fp16 candidates re-checked in float32."""

import json

import numpy as np
import pytest
import torch

from memaudit.duplicates import find_duplicates
from memaudit.errors import UserError
from memaudit.indexes import build_index, is_approximate, parse_index
from memaudit.metrics.index_recall import recall_of
from memaudit.neighbors import NeighborIndex
from memaudit.torch_index import TorchIndex

from tests.cli_helpers import run_cli


def data(n, d=48, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def brute_force(queries, points):
    return ((queries.double()[:, None, :] - points.double()[None]) ** 2).sum(-1).sqrt().sort(1)


def test_fp32_search_is_exact_against_brute_force():
    points, queries = data(9000), data(70, seed=1)  # more than one 8192-row chunk
    dist, idx = TorchIndex(points).search(queries, 5, batch_size=32)
    ref_d, ref_i = brute_force(queries, points)
    np.testing.assert_allclose(dist.numpy(), ref_d[:, :5].numpy(), rtol=1e-6, atol=1e-6)
    assert torch.equal(idx, ref_i[:, :5])


def test_exact_duplicates_have_distance_zero():
    points = data(100)
    dist, idx = TorchIndex(points).search(points[:10], 1)
    assert float(dist.abs().max()) == 0.0 and torch.equal(idx[:, 0], torch.arange(10))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_candidates_are_rechecked_in_float32(dtype):
    """bf16 GEMMs pick k + 16 candidates; the distances returned are exact float32 distances of real neighbours,
    and the measured recall equals a brute-force count."""
    points, queries = data(3000), data(200, seed=2)
    index = TorchIndex(points, dtype=dtype)
    dist, idx = index.search(queries, 2)
    direct = (queries[:, None, :].double() - points[idx].double()).pow(2).sum(-1).sqrt()
    np.testing.assert_allclose(dist.numpy(), direct.numpy(), rtol=1e-6)
    ref_d, _ = brute_force(queries, points)
    got = recall_of(index, queries, 2, None, 1 / 3)
    found = (dist[:, 0].double() <= ref_d[:, 0] * (1 + 1e-6) + 1e-12).double().mean()
    assert got["recall_at_1"] == pytest.approx(float(found), abs=1e-12) and got["recall_at_1"] > 0.95


def test_range_search_and_duplicates_match_faiss():
    points = data(500)
    points[100:110] = points[:10] + 1e-4  # near-duplicates
    q = points[:50].numpy()
    assert TorchIndex(points).pairs_within(q, 0.5) == sorted(NeighborIndex(points).pairs_within(q, 0.5))
    a, b = find_duplicates(TorchIndex(points), 0.01), find_duplicates(NeighborIndex(points), 0.01)
    assert a.clusters() == b.clusters() and len(a.clusters()) == 10


def test_the_table_knows_which_indexes_are_approximate():
    assert not is_approximate("exact") and not is_approximate("torch") and not is_approximate("torch:dtype=fp32")
    assert is_approximate("ivf") and is_approximate("torch:dtype=bf16")
    assert isinstance(build_index(data(10), "torch"), TorchIndex)
    with pytest.raises(UserError, match="dtype must be fp32, bf16 or fp16"):
        parse_index("torch:dtype=int8")


def test_a_torch_index_scan_reports_what_the_faiss_scan_reports(capsys, tmp_path):
    """The same scan with --index exact and --index torch: identical nn_ratio sections, no recall section."""
    reports = {}
    for spec in ("exact", "torch"):
        out = tmp_path / f"{spec}.json"
        code, _, _ = run_cli(capsys, "scan", "examples/models/digits32", "examples/digits/digits32.npz",
                             "--samples", "16", "--sampler", "heun", "--steps", "6", "--skip", "jacobian",
                             "--index", spec, "--json", out, "--quiet")
        assert code == 0
        reports[spec] = json.loads(out.read_text())
    assert reports["torch"]["runs"]["heun"]["nn_ratio"] == reports["exact"]["runs"]["heun"]["nn_ratio"]
    assert "index_recall" not in reports["torch"] and reports["torch"]["gates"] == []


@pytest.mark.parametrize("index_type", [TorchIndex, NeighborIndex])
def test_exact_copies_of_large_images_are_within_radius_zero(index_type):
    """At d = 49152 (128x128x3) float32 ||q||^2 - 2 q.p + ||p||^2 of a copy is far from 0 (0.02 here); the
    padded radius still proposes every copy, and the exact check keeps exactly the copies (radius 0)."""
    gen = torch.Generator().manual_seed(3)
    points = torch.randint(0, 256, (40, 49152), generator=gen).float() / 127.5 - 1
    points[20:30] = points[:10]
    pairs = index_type(points).pairs_within(points[:10].numpy(), 0.0)
    assert sorted(pairs) == sorted([(i, i) for i in range(10)] + [(i, 20 + i) for i in range(10)])
