import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memaudit.errors import UserError
from memaudit.gates import (
    Gate,
    check_gate_metrics,
    evaluate_gates,
    exit_code,
    format_gate,
    gates_status,
    parse_gate,
)
from memaudit.metrics import summary_keys as known_metrics
from memaudit.metrics.base import sampler_key

BASE_METRICS = ("memorized_fraction", "min_nn_ratio", "mean_nn_ratio", "final_entropy", "collapse_sigma",
                "score_cosine_deviation_small_sigma", "score_cosine_deviation_mean", "jacobian_ratio_max", "fid",
                "fid_proxy")

# Written independently of memaudit.gates.OPS on purpose.
CONDITION = {
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
    "==": lambda v, t: v == t,
    "!=": lambda v, t: v != t,
}

metrics = st.from_regex(r"[a-z_][a-z0-9_]{0,24}", fullmatch=True)
ops = st.sampled_from(sorted(CONDITION))
thresholds = st.floats(allow_nan=False, allow_infinity=False)
spaces = st.text(alphabet=" \t", max_size=3)


@pytest.mark.parametrize("expr, metric, op, threshold", [
    ("memorized_fraction>0.01", "memorized_fraction", ">", 0.01),
    ("fid_proxy >= 12.5", "fid_proxy", ">=", 12.5),
    ("final_entropy<0.1", "final_entropy", "<", 0.1),
    ("  jacobian_ratio_max <= 2 ", "jacobian_ratio_max", "<=", 2.0),
    ("min_nn_ratio==-1e-3", "min_nn_ratio", "==", -1e-3),
    ("_x9!=2.5E+3", "_x9", "!=", 2500.0),
    ("fid>.5", "fid", ">", 0.5),
    ("fid>5.", "fid", ">", 5.0),
])
def test_parse_examples(expr, metric, op, threshold):
    gate = parse_gate(expr)
    assert (gate.metric, gate.op, gate.threshold) == (metric, op, threshold)
    assert gate.expr == expr.strip()


@pytest.mark.parametrize("expr", [
    "", "   ", "memorized_fraction", ">0.1", "memorized_fraction>", "Memorized_fraction>0.1", "9lives>1",
    "a=>1", "a=1", "a>>1", "a<>1", "a>1 2", "a>1e", "a>e5", "a>inf", "a>nan", "a>1e999", "a>0x10",
    "a > 1,5", "a>\u0661", "a-b>1", "a>1;rm", "a.b>1",
])
def test_parse_rejects_with_one_line_user_error(expr):
    with pytest.raises(UserError) as info:
        parse_gate(expr)
    message = str(info.value)
    assert "\n" not in message
    assert "METRIC OP NUMBER" in message or "finite" in message


def test_parse_rejects_non_strings():
    with pytest.raises(UserError):
        parse_gate(None)  # type: ignore[arg-type]


@given(metrics, ops, thresholds, spaces, spaces, spaces, spaces)
def test_round_trip_through_text(metric, op, threshold, s1, s2, s3, s4):
    expr = f"{s1}{metric}{s2}{op}{s3}{threshold!r}{s4}"
    gate = parse_gate(expr)
    assert (gate.metric, gate.op, gate.threshold) == (metric, op, threshold)
    again = parse_gate(str(gate))
    assert (again.metric, again.op, again.threshold) == (metric, op, threshold)
    assert str(gate) == format_gate(metric, op, threshold)


@given(metrics, ops, st.floats(-1e300, 1e300), st.sampled_from(["{:.3e}", "{:.6g}", "{:.2f}", "{:E}"]))
def test_round_trip_other_number_spellings(metric, op, threshold, spelling):
    text = spelling.format(threshold)
    gate = parse_gate(f"{metric} {op} {text}")
    assert gate.threshold == float(text)


def test_threshold_that_rounds_to_infinity_is_rejected():
    with pytest.raises(UserError, match="finite"):
        parse_gate("fid > 1.798e+308")


@settings(max_examples=300)
@given(st.one_of(st.text(), st.text(alphabet="az_09.eE+-<>=! \t\n", max_size=20)))
def test_garbage_only_raises_user_error(text):
    try:
        gate = parse_gate(text)
    except UserError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(gate, Gate)
        assert gate.op in CONDITION and math.isfinite(gate.threshold)


@given(ops, thresholds, thresholds)
def test_gate_fails_iff_condition_true(op, threshold, value):
    (entry,) = evaluate_gates([format_gate("memorized_fraction", op, threshold)], {"memorized_fraction": value})
    assert entry["passed"] is (not CONDITION[op](value, threshold))
    assert entry["value"] == value and entry["threshold"] == threshold
    assert gates_status([entry]) == ("fail" if CONDITION[op](value, threshold) else "pass")


def test_evaluate_entries_and_status():
    summary = {"memorized_fraction": 0.02, "fid_proxy": 10.0, "final_entropy": None}
    results = evaluate_gates(["memorized_fraction>0.01", "fid_proxy >= 12.5"], summary)
    assert [r["passed"] for r in results] == [False, True]
    assert set(results[0]) == {"expr", "metric", "op", "threshold", "value", "passed", "reason"}
    assert results[0]["expr"] == "memorized_fraction>0.01"
    assert gates_status(results) == "fail" and exit_code("fail") == 1
    assert gates_status(results[1:]) == "pass" and exit_code("pass") == 0
    assert gates_status([]) == "pass"
    with pytest.raises(ValueError):
        exit_code("maybe")


@pytest.mark.parametrize("value", [None, float("nan"), float("inf")])
def test_unavailable_metric_fails_with_reason(value):
    (entry,) = evaluate_gates(["fid<1000"], {"fid": value})
    assert entry["passed"] is False and entry["value"] is None
    assert "unavailable" in entry["reason"]


def test_unknown_metric_lists_known_names():
    summary = {k: 0.0 for k in known_metrics(["heun"])}
    with pytest.raises(UserError) as info:
        evaluate_gates(["memorised_fraction>0.01"], summary)
    message = str(info.value)
    assert "memorised_fraction" in message and "\n" not in message
    for name in summary:
        assert name in message


def test_known_metrics_and_pre_scan_check():
    known = known_metrics(["heun", "EDM-sde"])
    assert set(BASE_METRICS) <= set(known)
    assert "memorized_fraction_heun" in known and "memorized_fraction_edm_sde" in known
    assert sampler_key("memorized_fraction_{sampler}", "EDM-sde") == "memorized_fraction_edm_sde"
    check_gate_metrics([parse_gate("memorized_fraction_heun>0")], known)
    with pytest.raises(UserError, match="memorized_fraction_ddpm"):
        check_gate_metrics([parse_gate("memorized_fraction_ddpm>0")], known)
