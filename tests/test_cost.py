"""The --dry-run cost model (memaudit.cost): its counts against what a scan really does, and the CLI contract."""

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memaudit.cost import Work, Workload, plan, Rates
from memaudit.denoiser import Denoiser
from memaudit.empirical import EmpiricalDenoiser
from memaudit.metrics import METRICS
from memaudit.sampling import SAMPLERS, SamplerConfig, sample
from memaudit.scan import ScanConfig, run_scan, trajectory_rows

from tests.cli_helpers import run_cli


class Counting(Denoiser):
    """D(x, sigma) = 0.5 x, counting the rows it is called on."""

    image_shape = (1, 4, 4)

    def __init__(self):
        super().__init__()
        self.rows = 0

    def denoise(self, x, sigma):
        self.rows += x.shape[0]
        return 0.5 * x


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_each_samplers_evaluation_count_is_what_it_calls(name):
    model = Counting()
    nearest = (lambda x: x.reshape(x.shape[0], -1).norm(dim=1)) if SAMPLERS[name].needs_nearest else None
    for steps in (1, 2, 7):
        model.rows = 0
        sample(model, 3, SamplerConfig(name, steps=steps), seed=0, batch_size=3, nearest=nearest)
        assert model.rows == 3 * SAMPLERS[name].evals(steps), (name, steps)


def workload(train, config, model):
    return Workload(num_train=train.shape[0], dim=math.prod(train.shape[1:]), num_samples=config.num_samples,
                    samplers=config.samplers, steps=config.steps, record=trajectory_rows(config, train.shape[1:]),
                    cosine_points=config.cosine_points, jacobian_points=config.jacobian_points,
                    jacobian_iters=config.jacobian_iters, metric_sigmas=config.metric_sigmas, topk=config.topk,
                    batch_size=config.batch_size, empirical_model=isinstance(model, EmpiricalDenoiser))


def test_empirical_row_flops_match_torchs_flop_counter():
    """One D* evaluation: the cost model's 4 M d FLOPs a row equal torch's count of its GEMMs (the autograd path,
    whose out-of-place addmm the counter sees; the in-place one does the same arithmetic), so sampling a
    closed-form model costs evals x rows x that (the evaluation counts are checked above)."""
    train = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = EmpiricalDenoiser(train, chunk_size=128)
    config = ScanConfig(num_samples=12, samplers=("heun",), steps=6, batch_size=12)
    w = workload(train, config, model)
    x = torch.randn(12, 1, 8, 8, requires_grad=True)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x, 0.7)
    assert counter.get_total_flops() == pytest.approx(w.model_rows(12).flops, rel=1e-6)
    assert w.model_rows(12 * w.evals("heun")).flops == 12 * (2 * 6 - 1) * 4 * 300 * 64


def test_the_plan_lists_the_phases_a_scan_runs_in_order():
    train = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = EmpiricalDenoiser(train)
    config = ScanConfig(num_samples=8, samplers=("heun", "ddpm"), steps=4, skip=("fid",), jacobian_points=2,
                        cosine_points=4, metric_sigmas=3)
    seen = []
    run_scan(model, train, config, model_info={}, data_info={},
             task=lambda description, total: seen.append(description) or (lambda done, info="": None))
    phases = plan(workload(train, config, model), Rates(1e9, 1e9), METRICS, config.computes)
    assert [p.name for p in phases[1:]] == seen  # phase 0 is the setup, which has no progress task


def test_work_adds_up_and_rates_turn_it_into_seconds():
    total = Work(flops=2e9, model_rows=10) + Work(flops=1e9, jacobian_rows=4, eigh_flops=5e8)
    assert (total.flops, total.model_rows, total.jacobian_rows, total.eigh_flops) == (3e9, 10, 4, 5e8)
    assert Rates(1e9, 1e8, 0.1, 0.5).seconds(total) == pytest.approx(3 + 5 + 1 + 2)


def test_dry_run_prints_every_phase_and_writes_nothing(capsys, tmp_path):
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8))
    code, out, _ = run_cli(capsys, "scan", "empirical", data, "--samples", "8", "--dry-run",
                           "--workdir", tmp_path / "work")
    assert code == 0
    for phase in ("setup", "sample heun", "sample sde", "metrics heun", "jacobian", "fid", "dominant phase"):
        assert phase in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy"]


@pytest.mark.parametrize("flag", [["--fail-on", "memorized_fraction>0.1"], ["--json", "r.json"], ["--resume"]])
def test_dry_run_refuses_what_needs_a_measurement(capsys, tmp_path, flag):
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8))
    code, out, err = run_cli(capsys, "scan", "empirical", data, "--dry-run", *flag)
    assert code == 2 and "--dry-run measures nothing" in err and flag[0] in err


@pytest.mark.parametrize("flags,message", [
    (["--index", "ivf:nlist=5000"], "nlist must be in [1, 30]"),
    (["--index", "torch:dtype=bf16", "--budget"], "copies the training set at 16 bits"),
    (["--samples", "1000000000", "--batch-size", "1000000000"], "lower --samples or --batch-size")])
def test_dry_run_refuses_what_the_scan_would_refuse(capsys, tmp_path, monkeypatch, flags, message):
    """A plan of a scan that cannot run (an IVF with more cells than images, a 16-bit index over a uint8 set,
    samples that cannot fit in memory) is the scan's own one-line refusal, exit 2, not a plan (exit 0)."""
    if "--budget" in flags:
        flags = flags[:-1]
        monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", "100")  # the set stays uint8
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8))
    code, out, err = run_cli(capsys, "scan", "empirical", data, "--dry-run", *flags)
    assert code == 2 and message in err and "dominant phase" not in out
