"""CI gates: `--fail-on METRIC OP NUMBER` expressions over the report's summary metrics.

The gateable names are the report's summary keys (memaudit.metrics.summary_keys). A gate FAILS when its condition is TRUE: `--fail-on memorized_fraction>0.01` fails the run when the
memorized fraction exceeds 0.01. A metric that was not computed (null in the summary) fails its gate.
Exit codes: 0 all gates passed (or none given), 1 a gate failed, 2 bad input (UserError).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from memaudit.errors import UserError
from memaudit.intervals import samples_to_bound
from memaudit.numbers import finite_or_none

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}

EXPECTED_FORM = "expected METRIC OP NUMBER, e.g. 'memorized_fraction>0.01' (OP one of > >= < <= == !=)"

_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_GATE_RE = re.compile(
    rf"\s*(?P<metric>[a-z_][a-z0-9_]*)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<number>{_NUMBER})\s*",
    re.ASCII,
)


@dataclass(frozen=True)
class Gate:
    """One parsed gate. `expr` is the text as given; str(gate) is the canonical form."""

    expr: str
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return format_gate(self.metric, self.op, self.threshold)

    def violated(self, value: float) -> bool:
        """True when the gate's condition holds for `value`, i.e. the gate fails."""
        return OPS[self.op](value, self.threshold)


def format_gate(metric: str, op: str, threshold: float) -> str:
    """Canonical text of a gate; parse_gate(format_gate(m, o, t)) gives back (m, o, t)."""
    return f"{metric}{op}{float(threshold)!r}"


def parse_gate(expr: str) -> Gate:
    """Parse 'METRIC OP NUMBER' (whitespace allowed, scientific notation allowed) into a Gate."""
    if not isinstance(expr, str):
        raise UserError(f"invalid gate {expr!r}: {EXPECTED_FORM}")
    match = _GATE_RE.fullmatch(expr)
    if match is None:
        raise UserError(f"invalid gate {expr!r}: {EXPECTED_FORM}")
    threshold = float(match["number"])
    if not math.isfinite(threshold):
        raise UserError(f"invalid gate {expr!r}: the threshold must be a finite number")
    return Gate(expr=expr.strip(), metric=match["metric"], op=match["op"], threshold=threshold)


def parse_gates(exprs: Iterable[str | Gate]) -> list[Gate]:
    """Parse several gates (Gate objects pass through)."""
    return [e if isinstance(e, Gate) else parse_gate(e) for e in exprs]


def check_gate_metrics(gates: Iterable[Gate], known: Iterable[str]) -> None:
    """Raise UserError if a gate names a metric not in `known` (call before a long scan)."""
    known = list(known)
    for gate in gates:
        if gate.metric not in known:
            raise UserError(
                f"unknown metric {gate.metric!r} in gate {gate.expr!r}; known metrics: {', '.join(known)}"
            )


def evaluate_gates(gates: Sequence[Gate | str], summary: Mapping[str, Any]) -> list[dict]:
    """Evaluate gates against a summary dict; one report "gates" entry per gate, in order.

    Each entry: expr, metric, op, threshold, value (float or None), passed (bool), reason (str).
    A gate fails when its condition is true, or when its metric is unavailable (null / non-finite).
    """
    parsed = parse_gates(gates)
    check_gate_metrics(parsed, summary.keys())
    results = []
    for gate in parsed:
        value = finite_or_none(summary[gate.metric])
        if value is None:
            passed = False
            reason = f"{gate.metric} is unavailable (not computed in this scan), so the gate fails"
        elif gate.violated(value):
            passed = False
            reason = f"{gate.metric} = {value:.6g}, and {gate.metric} {gate.op} {gate.threshold:.6g} holds"
        else:
            passed = True
            reason = f"{gate.metric} = {value:.6g}, and {gate.metric} {gate.op} {gate.threshold:.6g} does not hold"
        entry_extra = {}
        planned = bound_plan(gate, summary)
        if planned is not None:
            entry_extra["samples_to_bound"] = planned[0]
            reason += f"; {planned[1]}"
        results.append({
            **entry_extra,
            "expr": gate.expr,
            "metric": gate.metric,
            "op": gate.op,
            "threshold": gate.threshold,
            "value": value,
            "passed": passed,
            "reason": reason,
        })
    return results


def bound_plan(gate: Gate, summary: Mapping[str, Any]) -> tuple[int | None, str] | None:
    """For a gate `X_upper > t` (or >=) on a Wilson upper bound whose point estimate X is in the summary:
    (samples per run that would bound the upper end below t at the observed rate, or None when none can; the
    sentence saying so). None for other gates."""
    if not gate.metric.endswith("_upper") or gate.op not in (">", ">="):
        return None
    rate = finite_or_none(summary.get(gate.metric[: -len("_upper")]))
    if rate is None:
        return None
    n = samples_to_bound(rate, gate.threshold)
    if n is None:
        return None, (f"at the observed rate {rate:.6g} no number of samples bounds the upper end below "
                      f"{gate.threshold:.6g}")
    return n, f"at the observed rate {rate:.6g}, {n} samples per run would bound it below {gate.threshold:.6g}"


def gates_status(results: Iterable[Mapping[str, Any]]) -> str:
    """'fail' if any gate entry failed, else 'pass' (also 'pass' with no gates)."""
    return "fail" if any(not r["passed"] for r in results) else "pass"


def exit_code(status: str) -> int:
    """Process exit status for a report status: 0 pass, 1 a gate failed."""
    if status not in ("pass", "fail"):
        raise ValueError(f"report status must be 'pass' or 'fail', not {status!r}")
    return 0 if status == "pass" else 1
