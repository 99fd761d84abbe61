"""Wilson intervals against scipy, sample-size planning, and a gate on the upper bound at the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from cli_helpers import run_cli
from memaudit.intervals import fraction_fields, samples_to_bound, wilson

ROOT = Path(__file__).resolve().parents[1]
CASES = [(0, 1), (1, 1), (0, 16), (3, 10), (5, 256), (128, 256), (255, 256), (256, 256), (7, 10000)]


@pytest.mark.parametrize("k,n", CASES)
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(float(ci.low), abs=1e-12) and hi == pytest.approx(float(ci.high), abs=1e-12)
    fields = fraction_fields("x", k, n)
    assert fields["x_lower"] <= fields["x"] == k / n <= fields["x_upper"] and fields["x_count"] == k


def test_no_trials_no_interval():
    assert wilson(0, 0) == (None, None)
    assert fraction_fields("x", 0, 0)["x"] is None


@pytest.mark.parametrize("p,t", [(0.0, 0.01), (0.004, 0.01), (0.02, 0.05), (0.3, 1 / 3)])
def test_samples_to_bound_is_the_smallest_n(p, t):
    n = samples_to_bound(p, t)

    def upper(m):  # scipy's interval at a (possibly fractional) count p*m, via the closed form at integer k
        k = p * m
        z = 1.959963984540054
        c = (k + z * z / 2) / (m + z * z)
        return c + z * np.sqrt(m) / (m + z * z) * np.sqrt(p * (1 - p) + z * z / (4 * m))

    assert upper(n) < t <= upper(n - 1)
    if p == 0:  # at k = 0 the bound is scipy's exactly
        assert float(binomtest(0, n).proportion_ci(method="wilson").high) < t
        assert float(binomtest(0, n - 1).proportion_ci(method="wilson").high) >= t


def test_nothing_bounds_a_rate_at_or_above_the_threshold():
    assert samples_to_bound(0.02, 0.01) is None and samples_to_bound(0.01, 0.01) is None


def test_the_upper_bound_gate_fails_where_the_point_estimate_passes(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "scan", ROOT / "examples/models/digits-all", ROOT / "examples/digits/digits.npz",
                           "--samples", "16", "--sampler", "heun", "--quiet", "--skip", "fid", "--skip", "jacobian",
                           "--skip", "cosine", "--skip", "entropy", "--fail-on", "memorized_fraction>0.1",
                           "--fail-on", "memorized_fraction_upper>0.1", "--json", out)
    report = json.loads(out.read_text())
    nn = report["runs"]["heun"]["nn_ratio"]
    k, n = nn["memorized_fraction_count"], nn["num_samples"]
    assert n == 16 and nn["memorized_fraction"] == k / n <= 0.1
    ci = binomtest(k, n).proportion_ci(method="wilson")
    assert nn["memorized_fraction_upper"] == pytest.approx(float(ci.high), rel=1e-5)  # the JSON keeps 6 digits
    assert nn["memorized_fraction_upper"] > 0.1
    assert report["summary"]["memorized_fraction_upper"] == nn["memorized_fraction_upper"]
    point, bound = report["gates"]
    assert point["passed"] and not bound["passed"] and code == 1, err
    assert bound["samples_to_bound"] == samples_to_bound(k / n, 0.1) > n
    assert f"{bound['samples_to_bound']} samples per run" in bound["reason"]
