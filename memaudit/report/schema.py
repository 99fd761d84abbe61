"""The scan report, schema "memaudit.scan/1" (documented in docs/report-schema.md).

build_report() assembles the dict from the metrics' sections, summarize() asks each listed metric for its
gateable numbers, attach_gates() evaluates `--fail-on` gates and sets the status, validate_report() checks a
report (the JSON writer runs it on every report) and raises ValueError naming the first problem.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from memaudit import __version__
from memaudit.gates import Gate, evaluate_gates, gates_status
from memaudit.metrics import BY_NAME, METRICS, RUN_SECTIONS, SCAN_SECTIONS
from memaudit.metrics.base import RUN, sampler_key
from memaudit.numbers import finite_or_none, fmt  # noqa: F401 (fmt: the renderers' number format)
from memaudit.validation import Check

SCHEMA = "memaudit.scan/1"
TOP_KEYS = ("schema", "memaudit_version", "model", "data", "settings", "runs", "summary", "gates", "status")
OPTIONAL_KEYS = SCAN_SECTIONS + ("provenance",)


def summarize(report: Mapping[str, Any]) -> dict:
    """The flat summary of gateable metrics (float or None): every listed metric's summary keys (None when it
    was not computed), derived from its sections (see summary_table())."""
    summary: dict[str, Optional[float]] = {}
    runs = report.get("runs") or {}
    for metric in METRICS:
        summary.update({key: None for key in metric.summary_keys})
        if metric.scope == RUN:
            summary.update(metric.summarize({name: (run or {}).get(metric.name) or {} for name, run in runs.items()}))
        elif report.get(metric.name) is not None:
            summary.update(metric.summarize(report[metric.name]))
    return {k: finite_or_none(v) for k, v in summary.items()}


def attach_gates(report: dict, gates: Sequence[Gate | str]) -> dict:
    """Evaluate gates on report["summary"] and set report["gates"] and report["status"] (in place)."""
    report["gates"] = evaluate_gates(gates, report["summary"])
    report["status"] = gates_status(report["gates"])
    return report


def build_report(*, model: Mapping, data: Mapping, settings: Mapping, runs: Mapping[str, Mapping],
                 sections: Optional[Mapping[str, Any]] = None, gates: Sequence[Gate | str] = (),
                 provenance: Optional[Mapping] = None, memaudit_version: str = __version__) -> dict:
    """Assemble a complete "memaudit.scan/1" report: sections, summary, gates and status.

    `sections` holds the scan-level metric sections by name; a metric left out was skipped. Raises UserError
    for a gate naming an unknown metric.
    """
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "memaudit_version": memaudit_version,
        "model": dict(model),
        "data": dict(data),
        "settings": dict(settings),
        "runs": {name: dict(run) for name, run in runs.items()},
    }
    for name, section in (sections or {}).items():
        if name not in SCAN_SECTIONS:
            raise ValueError(f"build_report: {name!r} is not a scan-level metric section")
        report[name] = section
    if provenance is not None:
        report["provenance"] = dict(provenance)
    report["summary"] = summarize(report)
    return attach_gates(report, gates)


# ------------------------------------------------------------------------------------------ validation

def validate_report(report: Any) -> None:
    """Check a report against schema "memaudit.scan/1"; raise ValueError naming the first problem."""
    c = Check()
    c.dict(report, "report", TOP_KEYS)
    if report["schema"] != SCHEMA:
        c.fail("schema", f"must be {SCHEMA!r}, got {report['schema']!r}")
    c.str(report["memaudit_version"], "memaudit_version")
    _validate_model(c, report["model"])
    _validate_data(c, report["data"])
    _validate_settings(c, report["settings"])

    runs = c.dict(report["runs"], "runs")
    for name, run in runs.items():
        where = f"runs.{name}"
        c.dict(run, where)
        unknown = set(run) - set(RUN_SECTIONS)
        if unknown:
            c.fail(where, f"has unknown section(s) {sorted(unknown)}; expected {list(RUN_SECTIONS)}")
        for section, value in run.items():
            BY_NAME[section].validate(value, c, f"{where}.{section}")
    for name in SCAN_SECTIONS:
        if name in report:
            BY_NAME[name].validate(report[name], c, name)
    if "provenance" in report:
        _validate_provenance(c, report["provenance"])
    extra = set(report) - set(TOP_KEYS) - set(OPTIONAL_KEYS)
    if extra:
        c.fail("report", f"has unknown key(s) {sorted(extra)}")
    _validate_summary(c, report["summary"], runs)
    _validate_gates(c, report)


def _validate_model(c: Check, model: Any) -> None:
    model = c.dict(model, "model", ("spec", "kind", "sigma_min", "sigma_max", "image_shape"))
    c.str(model["spec"], "model.spec")
    c.str(model["kind"], "model.kind")
    lo = c.num(model["sigma_min"], "model.sigma_min")
    hi = c.num(model["sigma_max"], "model.sigma_max")
    if not 0 <= lo <= hi:
        c.fail("model.sigma_min/sigma_max", f"must satisfy 0 <= sigma_min <= sigma_max, got {lo}, {hi}")
    c.shape(model["image_shape"], "model.image_shape")


def _validate_data(c: Check, data: Any) -> None:
    data = c.dict(data, "data", ("path", "num_images", "image_shape"))
    c.str(data["path"], "data.path")
    c.int(data["num_images"], "data.num_images", minimum=0)
    c.shape(data["image_shape"], "data.image_shape")
    if "duplicates" in data:
        dup = c.dict(data["duplicates"], "data.duplicates", ("tolerance", "num_clusters", "clusters"))
        c.num(dup["tolerance"], "data.duplicates.tolerance")
        c.int(dup["num_clusters"], "data.duplicates.num_clusters", minimum=0)
        for i, cluster in enumerate(c.list(dup["clusters"], "data.duplicates.clusters")):
            for j, member in enumerate(c.list(cluster, f"data.duplicates.clusters[{i}]")):
                c.int(member, f"data.duplicates.clusters[{i}][{j}]", minimum=0)


def _validate_settings(c: Check, settings: Any) -> None:
    settings = c.dict(settings, "settings", (
        "num_samples", "seed", "samplers", "steps", "threshold", "features", "topk", "device", "batch_size"))
    c.int(settings["num_samples"], "settings.num_samples", minimum=0)
    c.int(settings["seed"], "settings.seed")
    for i, s in enumerate(c.list(settings["samplers"], "settings.samplers")):
        c.str(s, f"settings.samplers[{i}]")
    c.int(settings["steps"], "settings.steps", minimum=1)
    c.num(settings["threshold"], "settings.threshold")
    c.str(settings["features"], "settings.features")
    c.int(settings["topk"], "settings.topk", minimum=1)
    c.str(settings["device"], "settings.device")
    c.int(settings["batch_size"], "settings.batch_size", minimum=1)


def _validate_provenance(c: Check, provenance: Any) -> None:
    prov = c.dict(provenance, "provenance", ("resumed", "runs"))
    c.bool(prov["resumed"], "provenance.resumed")
    for name, entry in c.dict(prov["runs"], "provenance.runs").items():
        c.dict(entry, f"provenance.runs.{name}", ("resumed_samples",))
        c.int(entry["resumed_samples"], f"provenance.runs.{name}.resumed_samples", minimum=0)


def _validate_summary(c: Check, summary: Any, runs: Mapping) -> None:
    summary = c.dict(summary, "summary", [k for m in METRICS for k in m.summary_keys])
    for metric in METRICS:
        for template in metric.run_keys:
            for name in runs:
                if sampler_key(template, name) not in summary:
                    c.fail(f"summary.{sampler_key(template, name)}", "is missing")
    for key, value in summary.items():
        c.str(key, "summary key")
        c.num(value, f"summary.{key}", nullable=True)


def _validate_gates(c: Check, report: Mapping) -> None:
    failed = False
    for i, gate in enumerate(c.list(report["gates"], "gates")):
        where = f"gates[{i}]"
        c.dict(gate, where, ("expr", "metric", "op", "threshold", "value", "passed"))
        c.str(gate["expr"], f"{where}.expr")
        c.str(gate["metric"], f"{where}.metric")
        if gate["op"] not in (">", ">=", "<", "<=", "==", "!="):
            c.fail(f"{where}.op", f"must be a comparison operator, got {gate['op']!r}")
        c.num(gate["threshold"], f"{where}.threshold")
        c.num(gate["value"], f"{where}.value", nullable=True)
        c.bool(gate["passed"], f"{where}.passed")
        failed = failed or not gate["passed"]
    if report["status"] not in ("pass", "fail"):
        c.fail("status", f"must be 'pass' or 'fail', got {report['status']!r}")
    if report["status"] != ("fail" if failed else "pass"):
        c.fail("status", f"is {report['status']!r} but the gates say {'fail' if failed else 'pass'!r}")
