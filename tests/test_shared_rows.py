"""memaudit.shared_rows: the metrics' per-sample work in fixed blocks of rows (shared among torchrun ranks; the
ranks themselves are tested in tests/test_distributed.py)."""

from __future__ import annotations

import torch

from memaudit import distributed, shared_rows
from memaudit.empirical import EmpiricalDenoiser
from memaudit.metrics.entropy import topk_entropy
from memaudit.metrics.nn_ratio import training_index
from memaudit.sampling import local_batches
from memaudit.scan import ScanConfig, run_scan
from memaudit.shared_rows import RowState, block_rows, map_rows


def test_blocks_are_the_batch_size_up_to_row_block(monkeypatch):
    sizes = []
    monkeypatch.setitem(shared_rows.ROW_WORK, "size", lambda state, rows: (sizes.append(rows.shape[0]), rows)[1])
    rows = torch.arange(150.0)[:, None]
    assert torch.equal(map_rows(None, "size", (rows,), batch_size=128), rows)
    assert sizes == [64, 64, 22]
    sizes.clear()
    map_rows(None, "size", (rows[:20],), batch_size=8)
    assert sizes == [8, 8, 4] and block_rows(0) == 1


def test_a_workers_state_answers_as_the_scan_computes(digits32):
    """A worker's RowState builds the scan's index itself; its answers equal a search of all rows at once
    (distances to float32 rounding) and the entropy of each row."""
    queries = digits32[:10] + 0.05 * torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    empirical = EmpiricalDenoiser(digits32)
    state = RowState(empirical, digits32, None, "exact", torch.device("cpu"))
    blocks = [(queries[:6],), (queries[6:],)]
    (d1, i1), (d2, i2) = state.answer("neighbours", blocks, (3,))
    dist, idx = training_index(digits32).search(queries.reshape(10, -1), 3)
    assert torch.equal(torch.cat([i1, i2]), idx)
    torch.testing.assert_close(torch.cat([d1, d2]), dist)
    h = state.answer("topk_entropy", blocks, (0.5, 4, None))
    torch.testing.assert_close(torch.cat(h), topk_entropy(empirical, queries, 0.5, 4))


def test_a_scan_shares_its_searches_and_trajectory_work(digits32, monkeypatch):
    """Under torchrun (here: two ranks pretended, the 'other' rank computed in-process by a worker's RowState)
    the scan hands the samples' search and the trajectories' entropy and D* to the ranks, and the report equals
    the one process's."""
    config = dict(num_samples=12, samplers=("euler",), steps=4, batch_size=4, skip=("fid", "jacobian"))

    def scan():
        return run_scan(EmpiricalDenoiser(digits32, temperature=2.0), digits32, ScanConfig(**config),
                        model_info={"spec": "m"}, data_info={"path": "d"}).report

    alone = scan()
    worker = RowState(EmpiricalDenoiser(digits32), digits32, None, "exact", torch.device("cpu"))
    shared: list[tuple[str, int]] = []

    def share_rows(name, args, blocks, work):
        shared.append((name, len(blocks)))
        mine, theirs = work(name, blocks[0::2], args), worker.answer(name, blocks[1::2], args)
        out = [None] * len(blocks)
        out[0::2], out[1::2] = mine, theirs
        return out

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "share_rows", share_rows)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "batch_source", lambda: local_batches)
    together = scan()
    names = {name for name, _ in shared}
    assert {"neighbours", "topk_entropy", "empirical_cosine"} <= names
    assert all(n == 3 for name, n in shared)  # 12 rows in blocks of 4
    assert together == alone


def test_shared_blocks_are_sent_as_their_own_rows(monkeypatch):
    """A block handed to the ranks is pickled by gloo's object collectives; a slice would send its whole base
    tensor with it (every block: the rows N times over)."""
    import pickle

    sent = []

    def share_rows(name, args, blocks, work):
        sent.extend(len(pickle.dumps(block)) for block in blocks)
        return work(name, blocks, args)

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "share_rows", share_rows)
    monkeypatch.setitem(shared_rows.ROW_WORK, "half", lambda state, rows: rows[:, :1] * 2)
    rows = torch.randn(640, 256)
    out = map_rows(None, "half", (rows,), batch_size=64)
    assert torch.equal(out, rows[:, :1] * 2)
    whole = len(pickle.dumps(rows))
    assert len(sent) == 10 and max(sent) < whole / 8  # one block is a tenth of the rows


def test_owned_cpu_copies_only_slices():
    from memaudit.storage import owned_cpu

    base = torch.randn(100, 10)
    assert owned_cpu(base).data_ptr() == base.data_ptr()  # not copied
    part = owned_cpu(base[:5])
    assert torch.equal(part, base[:5]) and part.untyped_storage().nbytes() == 5 * 10 * 4
