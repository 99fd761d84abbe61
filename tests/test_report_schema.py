import copy
import math

import numpy as np
import pytest

from memaudit.errors import UserError
from memaudit.metrics import summary_keys
from memaudit.metrics.entropy import grid_collapse_sigma as collapse_sigma
from memaudit.metrics.nn_ratio import section as nn_ratio_section
from memaudit.report.schema import SCHEMA, attach_gates, summarize, validate_report

try:
    from report_fixture import make_report
except ImportError:  # tests/ imported as a package
    from tests.report_fixture import make_report


@pytest.fixture
def report():
    return make_report(seed=3, gates=["memorized_fraction>0.01", "fid_proxy>=100"])


def test_fixture_report_is_valid(report):
    validate_report(report)
    assert report["schema"] == SCHEMA == "memaudit.scan/1"
    assert report["status"] == "fail"
    assert [g["passed"] for g in report["gates"]] == [False, True]


def test_summary_matches_sections(report):
    s = report["summary"]
    runs = report["runs"]
    fractions = {}
    all_ratios = []
    for name, run in runs.items():
        ratios = np.array([x["ratio"] for x in run["nn_ratio"]["samples"]])
        fractions[name] = float((ratios < 1 / 3).mean())
        all_ratios.extend(ratios.tolist())
        assert s[f"memorized_fraction_{name}"] == pytest.approx(fractions[name])
    assert fractions == {"heun": 3 / 32, "sde": 5 / 32}  # the fixture forces 3 and 5 ratios below 1/3
    assert s["memorized_fraction"] == pytest.approx(max(fractions.values()))
    assert s["min_nn_ratio"] == pytest.approx(min(all_ratios))
    assert s["mean_nn_ratio"] == pytest.approx(float(np.mean(all_ratios)))
    assert s["final_entropy"] == pytest.approx(min(r["entropy"]["mean"][-1] for r in runs.values()))
    sc = report["score_cosine"]
    smallest = int(np.argmin(sc["sigmas"]))
    assert smallest == len(sc["sigmas"]) - 1
    assert s["score_cosine_deviation_small_sigma"] == pytest.approx(sc["mean"][smallest])
    assert s["score_cosine_deviation_small_sigma"] != pytest.approx(sc["mean"][0])
    assert s["score_cosine_deviation_mean"] == pytest.approx(float(np.mean(sc["mean"])))
    assert s["jacobian_ratio_max"] == pytest.approx(max(report["jacobian"]["ratio"]))
    assert s["fid"] is None
    assert s["fid_proxy"] == pytest.approx(45.5)
    assert set(s) == set(summary_keys(["heun", "sde"]))


def test_optional_sections_may_be_absent():
    report = make_report(with_optional=False, gates=["fid<50"])
    for key in ("score_cosine", "jacobian", "fid"):
        assert key not in report
    validate_report(report)
    for key in ("score_cosine_deviation_small_sigma", "score_cosine_deviation_mean", "jacobian_ratio_max",
                "fid", "fid_proxy"):
        assert report["summary"][key] is None
    assert report["status"] == "fail" and report["gates"][0]["value"] is None


def test_unknown_gate_metric_is_user_error():
    with pytest.raises(UserError, match="known metrics"):
        make_report(gates=["memorized_fraction_ddpm>0.1"])


def test_attach_gates_recomputes_status(report):
    attach_gates(report, ["memorized_fraction>0.99"])
    assert report["status"] == "pass" and len(report["gates"]) == 1
    validate_report(report)


def _drop(path):
    def mutate(r):
        *parents, last = path
        for p in parents:
            r = r[p]
        del r[last]
    return mutate


def _set(path, value):
    def mutate(r):
        *parents, last = path
        for p in parents:
            r = r[p]
        r[last] = value
    return mutate


@pytest.mark.parametrize("key", ["schema", "memaudit_version", "model", "data", "settings", "runs", "summary",
                                 "gates", "status"])
def test_validate_catches_missing_top_level_key(report, key):
    del report[key]
    with pytest.raises(ValueError, match=key):
        validate_report(report)


@pytest.mark.parametrize("mutate, where", [
    (_drop(["model", "spec"]), "model.spec"),
    (_drop(["data", "num_images"]), "data.num_images"),
    (_drop(["settings", "seed"]), "settings.seed"),
    (_drop(["runs", "heun", "nn_ratio", "worst"]), "runs.heun.nn_ratio.worst"),
    (_drop(["runs", "sde", "entropy", "final_mean"]), "runs.sde.entropy.final_mean"),
    (_drop(["jacobian", "empirical"]), "jacobian.empirical"),
    (_drop(["summary", "final_entropy"]), "summary.final_entropy"),
    (_drop(["summary", "memorized_fraction_sde"]), "summary.memorized_fraction_sde"),
    (_drop(["gates", 0, "passed"]), "gates[0].passed"),
    (_set(["schema"], "memaudit.scan/2"), "schema"),
    (_set(["status"], "pass"), "status"),
    (_set(["status"], "ok"), "status"),
    (_set(["model", "image_shape"], [1, 8]), "model.image_shape"),
    (_set(["settings", "steps"], True), "settings.steps"),
    (_set(["settings", "threshold"], "0.3"), "settings.threshold"),
    (_set(["summary", "fid_proxy"], float("nan")), "summary.fid_proxy"),
    (_set(["runs", "heun", "nn_ratio", "memorized_fraction"], 1.5), "memorized_fraction"),
    (_set(["runs", "heun", "nn_ratio", "worst"], [999]), "runs.heun.nn_ratio.worst[0]"),
    (_set(["runs", "heun", "nn_ratio", "histogram", "counts"], [1, 2]), "runs.heun.nn_ratio.histogram"),
    (_set(["runs", "heun", "entropy", "mean"], [1.0]), "runs.heun.entropy.mean"),
    (_set(["runs", "heun", "bogus"], {}), "runs.heun"),
    (_set(["score_cosine", "std"], "x"), "score_cosine.std"),
    (_set(["fid", 0, "kind"], "kid"), "fid[0].kind"),
    (_set(["gates", 0, "op"], "=>"), "gates[0].op"),
    (_set(["extra"], 1), "extra"),
    (_set(["runs"], []), "runs"),
])
def test_validate_names_the_first_problem(report, mutate, where):
    bad = copy.deepcopy(report)
    mutate(bad)
    with pytest.raises(ValueError) as info:
        validate_report(bad)
    assert where in str(info.value)
    validate_report(report)  # the original is untouched and valid


def test_validate_accepts_nulls_in_measurements(report):
    report["runs"]["heun"]["entropy"]["mean"][0] = None
    report["runs"]["heun"]["nn_ratio"]["samples"][0]["ratio"] = None
    validate_report(report)


def test_validate_rejects_non_dict():
    with pytest.raises(ValueError, match="object"):
        validate_report([1, 2])


def test_nn_ratio_section():
    ratio = np.array([0.5, 0.1, 0.9, 0.2, 1.0, 0.1])
    d2 = np.full(6, 2.0)
    nn = nn_ratio_section(ratio, ratio * d2, d2, np.arange(6) * 10, threshold=1 / 3, bins=10, worst=4)
    assert nn["memorized_fraction"] == pytest.approx(3 / 6)
    assert nn["worst"] == [1, 5, 3, 0]
    assert sum(nn["histogram"]["counts"]) == 6 and len(nn["histogram"]["bin_edges"]) == 11
    assert nn["histogram"]["counts"][-1] == 2  # 0.9 and 1.0 (right edge included)
    assert nn["min"] == pytest.approx(0.1) and nn["median"] == pytest.approx(0.35)
    assert [s["nearest"] for s in nn["samples"]] == [0, 10, 20, 30, 40, 50]
    assert nn["samples"][2]["d1"] == pytest.approx(1.8)


def test_summarize_ignores_non_finite_values(report):
    report["jacobian"]["ratio"] = [float("nan"), 0.5, None, 0.7]
    report["jacobian"]["sigmas"] = report["jacobian"]["sigmas"][:4]
    assert summarize(report)["jacobian_ratio_max"] == 0.7


def test_collapse_sigma_is_the_first_sigma_below_two_effective_points():
    assert collapse_sigma([80, 10, 1, 0.1], [16, 5, 1.9, 1.0]) == 1.0
    assert collapse_sigma([80, 10, 1, 0.1], [16, 5, 3, 2.5]) == 0.0
    assert collapse_sigma([80, 10], [None, 1.5]) == 10.0
