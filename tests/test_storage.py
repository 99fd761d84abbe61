"""A large 8-bit training set stays uint8 (memaudit.storage): the same numbers as its float32 copy, one copy."""

import json

import numpy as np
import pytest
import torch

from memaudit.data import load_dataset
from memaudit.empirical import EmpiricalDenoiser
from memaudit.errors import UserError
from memaudit.metrics.nn_ratio import training_index
from memaudit.storage import ImageStore
from memaudit.torch_index import TorchIndex

from tests.cli_helpers import run_cli


@pytest.fixture
def u8(tmp_path):
    path = tmp_path / "u8.npy"
    np.save(path, np.random.default_rng(3).integers(0, 256, (600, 8, 8, 3), dtype=np.uint8))  # NHWC
    return path


def test_a_set_over_the_float_budget_stays_uint8_with_bit_identical_values(u8, monkeypatch):
    floats = load_dataset(u8).data
    monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", "1000")
    store = load_dataset(u8).data
    assert isinstance(store, ImageStore) and store.is_bytes and store.shape == floats.shape
    reference = (np.load(u8).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)  # the loader's own reading
    assert torch.equal(store.float(), torch.from_numpy(reference)) and torch.equal(floats, store.float())
    assert torch.equal(store.rows(10, 20), floats[10:20].reshape(10, -1))
    assert torch.equal(store[torch.tensor([5, 1])], floats[[5, 1]]) and torch.equal(store[3], floats[3])
    limited = load_dataset(u8, limit=50).data
    assert len(limited) == 50 and torch.equal(limited.float(), floats[:50])


def test_the_empirical_denoiser_over_bytes_equals_it_over_floats(u8, monkeypatch):
    floats = load_dataset(u8).data
    monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", "1000")
    store = load_dataset(u8).data
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for kwargs in ({}, {"k": 8}, {"k": 8, "tail": 32}, {"temperature": 2.0, "bandwidth": 0.3}):
        a, b = EmpiricalDenoiser(store, chunk_size=128, **kwargs), EmpiricalDenoiser(floats, chunk_size=128, **kwargs)
        assert a.points is None  # no float copy kept
        for sigma in (0.05, 1.0, 30.0):
            assert torch.equal(a(x, sigma), b(x, sigma))
            assert torch.equal(a.jvp(x, sigma, x), b.jvp(x, sigma, x))


def test_the_bytes_index_is_exact_and_refuses_copying_indexes(u8, monkeypatch):
    monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", "1000")
    store = load_dataset(u8).data
    index = training_index(store)
    assert isinstance(index, TorchIndex) and index.flat is None
    queries = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist, idx = index.search(queries, 3)
    points = store.float().reshape(600, -1).double()
    ref = ((queries.reshape(20, 1, -1).double() - points[None]) ** 2).sum(-1).sqrt().sort(1)
    np.testing.assert_allclose(dist.numpy(), ref.values[:, :3].numpy(), rtol=1e-6)
    assert torch.equal(idx, ref.indices[:, :3])
    with pytest.raises(UserError, match="MEMAUDIT_FLOAT_BUDGET"):
        training_index(store, index="torch:dtype=bf16")


def test_a_scan_of_a_uint8_store_writes_the_float_scans_report(u8, capsys, tmp_path, monkeypatch):
    """Every metric (NN ratio, DiffMemorize, tiles, authenticity, entropy, cosines, Jacobian, FID proxy): the
    same JSON report, byte for byte, whether the set is held as float32 or as uint8 bytes."""
    reports = {}
    for budget in (str(1 << 30), "1000"):
        monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", budget)
        out = tmp_path / f"{budget}.json"
        code, _, _ = run_cli(capsys, "scan", "empirical:T=2", u8, "--samples", "12", "--steps", "6",
                             "--quiet", "--json", out, "--workdir", tmp_path / budget)
        assert code == 0
        reports[budget] = out.read_bytes()
    assert reports[str(1 << 30)] == reports["1000"]
    assert json.loads(reports["1000"])["data"]["value_range"] == "uint8 [0, 255]"



def test_every_phase_and_run_metric_starts_by_returning_freed_memory(monkeypatch, digits32):
    """The scan returns freed memory (glibc malloc_trim: a freed chunk otherwise stays resident and the next
    phase's peak stacks on it; 128x128x3, M = 2000: 1.06 -> 0.78 GiB between metrics) before each phase and
    each run metric: the calls are counted against the phases the scan reports."""
    import memaudit.scan as audit
    from memaudit.empirical import EmpiricalDenoiser
    from memaudit.metrics import METRICS
    from memaudit.metrics.base import RUN

    calls, tasks = [], []
    monkeypatch.setattr(audit, "return_freed_memory", lambda: calls.append(len(tasks)))
    config = audit.ScanConfig(num_samples=8, batch_size=8, samplers=("heun",), steps=4, fid="proxy")
    audit.run_scan(EmpiricalDenoiser(digits32), digits32, config, model_info={}, data_info={},
                   task=lambda d, t: tasks.append(d) or (lambda done, info="": None))
    run_metrics = sum(1 for m in METRICS if m.scope == RUN and config.computes(m))
    assert len(calls) == len(tasks) + run_metrics
    assert set(range(len(tasks))) <= set(calls)  # a call just before each phase began (tasks[i] made after it)


def test_rows_of_a_channels_last_byte_array_equal_its_contiguous_copy():
    """A .npy's (N, H, W, C) bytes seen as (N, C, H, W) are converted straight into float rows (no contiguous
    uint8 copy); the rows equal those of the contiguous array, into a fresh tensor or a reused buffer."""
    hwc = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 4, 3, 3), dtype=np.uint8))
    chw = hwc.permute(0, 3, 1, 2)
    assert not chw.is_contiguous()
    strided, contiguous = ImageStore(chw), ImageStore(chw.contiguous())
    buffer = torch.full((4 * 36,), float("nan"))
    assert torch.equal(strided.rows(1, 4), contiguous.rows(1, 4))
    assert torch.equal(strided.rows(0, 4, out=buffer), contiguous.rows(0, 4))
    torch.testing.assert_close(strided.rows(1, 4).double(), chw[1:4].reshape(3, -1).double() / 127.5 - 1,
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "nan", "abc", "-5", "-0.5", "12 MiB"])
def test_a_float_budget_that_is_not_a_finite_number_of_bytes_is_a_user_error(value, monkeypatch):
    from memaudit.storage import float_budget

    monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", value)
    with pytest.raises(UserError) as err:
        float_budget()
    assert str(err.value) == (f"MEMAUDIT_FLOAT_BUDGET must be a finite number of bytes >= 0 (e.g. 134217728 or "
                              f"1e9), not {value!r}")


@pytest.mark.parametrize("value, expected", [(None, 128 * 2**20), ("", 128 * 2**20), ("  ", 128 * 2**20),
                                             ("0", 0), ("1000", 1000), ("1e9", 10**9), ("2.5e3", 2500),
                                             (" 4096 ", 4096)])
def test_the_float_budget_reads_bytes_and_defaults_to_128_mib_when_unset_or_empty(value, expected, monkeypatch):
    from memaudit.storage import float_budget

    if value is None:
        monkeypatch.delenv("MEMAUDIT_FLOAT_BUDGET", raising=False)
    else:
        monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", value)
    assert float_budget() == expected


@pytest.mark.parametrize("value", ["inf", "1e400", "abc", "nan", "-5"])
def test_a_scan_with_a_bad_float_budget_exits_2_with_one_line(value, u8, capsys, monkeypatch):
    monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", value)
    code, _, err = run_cli(capsys, "scan", "empirical", u8, "--dry-run", "--quiet")
    assert code == 2 and err.strip().splitlines() == [
        f"error: MEMAUDIT_FLOAT_BUDGET must be a finite number of bytes >= 0 (e.g. 134217728 or 1e9), not {value!r}"]
