"""The scan report, schema "memaudit.scan/1" (documented in docs/report-schema.md).

build_report() assembles the dict, summarize() derives the flat summary of gateable metrics,
attach_gates() evaluates `--fail-on` gates and sets the status, validate_report() checks a report
(e.g. one read back for `--resume`) and raises ValueError naming the first problem.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from memaudit import __version__
from memaudit.gates import BASE_METRICS, Gate, evaluate_gates, finite_or_none, gates_status, sampler_metric

SCHEMA = "memaudit.scan/1"
NN_RATIO_THRESHOLD = 1.0 / 3.0
COLLAPSE_POINTS = 2.0  # effective number of training points exp(H) below which one image has taken over
HISTOGRAM_BINS = 20
WORST_PAIRS = 16

TOP_KEYS = ("schema", "memaudit_version", "model", "data", "settings", "runs", "summary", "gates", "status")
OPTIONAL_KEYS = ("score_cosine", "jacobian", "fid", "provenance")
RUN_SECTIONS = ("nn_ratio", "entropy", "trajectory_cosine")
FID_KINDS = ("clean-fid", "proxy")


# --------------------------------------------------------------------------------------------- helpers

def fmt(value: Any, digits: int = 4) -> str:
    """Short human-readable number ('n/a' for null / non-finite)."""
    v = finite_or_none(value)
    return "n/a" if v is None else f"{v:.{digits}g}"


def _floats(values: Iterable[Any]) -> list[Optional[float]]:
    return [finite_or_none(v) for v in np.asarray(values, dtype=np.float64).reshape(-1).tolist()]


def _finite(values: Iterable[Any]) -> list[float]:
    return [v for v in (finite_or_none(x) for x in values) if v is not None]


# ------------------------------------------------------------------------------------ section builders

def nn_ratio_section(ratio, d1, d2, nearest, threshold: float = NN_RATIO_THRESHOLD,
                     bins: int = HISTOGRAM_BINS, worst: int = WORST_PAIRS, ratio_plain=None) -> dict:
    """The per-run "nn_ratio" section from per-sample arrays (length N each).

    ratio = d1 / d2 (nearest / second-nearest distinct training image); a sample is memorized when
    ratio < threshold. A non-finite ratio (NaN, inf) is never "not memorized": it counts as memorized.
    The histogram has `bins` equal bins over [0, 1]; "worst" lists the `worst` sample indices with the
    smallest ratios, ascending (ties by index). `ratio_plain` (d2 = second-nearest image, duplicates
    or not) gives memorized_fraction_plain.
    """
    r = np.asarray(ratio, dtype=np.float64).reshape(-1)
    d1 = np.asarray(d1, dtype=np.float64).reshape(-1)
    d2 = np.asarray(d2, dtype=np.float64).reshape(-1)
    nearest = np.asarray(nearest).reshape(-1)
    if not (len(r) == len(d1) == len(d2) == len(nearest)):
        raise ValueError("nn_ratio_section: ratio, d1, d2 and nearest must have the same length")
    ok = np.isfinite(r)
    rf = r[ok]
    counts, edges = np.histogram(np.clip(rf, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    order = sorted(np.flatnonzero(ok).tolist(), key=lambda i: (r[i], i))
    plain = r if ratio_plain is None else np.asarray(ratio_plain, dtype=np.float64).reshape(-1)
    return {
        "memorized_fraction": _memorized(r, threshold),
        "memorized_fraction_plain": _memorized(plain, threshold),
        "non_finite": int((~ok).sum()),
        "threshold": float(threshold),
        "mean": finite_or_none(rf.mean()) if len(rf) else None,
        "median": finite_or_none(np.median(rf)) if len(rf) else None,
        "min": finite_or_none(rf.min()) if len(rf) else None,
        "histogram": {"bin_edges": _floats(edges), "counts": [int(c) for c in counts]},
        "samples": [
            {"index": i, "ratio": finite_or_none(r[i]), "d1": finite_or_none(d1[i]),
             "d2": finite_or_none(d2[i]), "nearest": int(nearest[i])}
            for i in range(len(r))
        ],
        "worst": order[:worst],
    }


def _memorized(ratio: np.ndarray, threshold: float) -> Optional[float]:
    """Fraction of ratios below the threshold, non-finite ones counted as memorized (fail closed)."""
    if not len(ratio):
        return None
    return float(((ratio < threshold) | ~np.isfinite(ratio)).sum() / len(ratio))


def entropy_section(sigmas, entropy) -> dict:
    """The per-run "entropy" section from per-sigma, per-sample top-K entropies in nats, shape (S, N).

    `sigmas` are in sampling order (descending); "final_mean" is the mean entropy at the last step.
    """
    h = np.asarray(entropy, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != len(sigmas):
        raise ValueError("entropy_section: entropy must have shape (len(sigmas), num_samples)")
    mean = h.mean(1)
    return {
        "sigmas": _floats(sigmas),
        "mean": _floats(mean),
        "median": _floats(np.median(h, 1)),
        "min": _floats(h.min(1)),
        "effective_points_mean": _floats(np.exp(h).mean(1)),
        "final_mean": finite_or_none(mean[-1]) if len(mean) else None,
    }


def curve_section(sigmas, values) -> dict:
    """A {"sigmas", "mean", "std"} section from per-sigma, per-point values, shape (S, N)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] != len(sigmas):
        raise ValueError("curve_section: values must have shape (len(sigmas), num_points)")
    return {"sigmas": _floats(sigmas), "mean": _floats(v.mean(1)), "std": _floats(v.std(1))}


# --------------------------------------------------------------------------------------------- summary

def summarize(report: Mapping[str, Any]) -> dict:
    """The flat summary of gateable metrics (float or None) derived from the report's sections.

    memorized_fraction: max over runs; memorized_fraction_<sampler>: per run; min_nn_ratio: min over
    runs; mean_nn_ratio: mean over all samples of all runs; collapse_sigma: max over runs of the largest
    sigma where the mean effective number of training points exp(H) drops below 2; final_entropy: min over runs of
    entropy.final_mean; score_cosine_deviation_small_sigma: score_cosine.mean at the smallest sigma;
    score_cosine_deviation_mean: mean of score_cosine.mean over sigmas; jacobian_ratio_max: max of
    jacobian.ratio; fid / fid_proxy: value of the first "clean-fid" / "proxy" entry of "fid".
    """
    summary: dict[str, Optional[float]] = {k: None for k in BASE_METRICS}
    runs = report.get("runs") or {}
    fractions, mins, weighted, finals, collapses = [], [], [], [], []
    per_run: dict[str, Optional[float]] = {}
    for name in sorted(runs):
        run = runs[name] or {}
        nn = run.get("nn_ratio")
        frac = finite_or_none(nn.get("memorized_fraction")) if nn else None
        per_run[sampler_metric(name)] = frac
        if frac is not None:
            fractions.append(frac)
        if nn:
            if finite_or_none(nn.get("min")) is not None:
                mins.append(float(nn["min"]))
            mean = finite_or_none(nn.get("mean"))
            if mean is not None:
                ratios = _finite(s.get("ratio") for s in nn.get("samples") or [])
                weighted.append((mean, max(len(ratios), 1)))
        ent = run.get("entropy")
        if ent and finite_or_none(ent.get("final_mean")) is not None:
            finals.append(float(ent["final_mean"]))
        if ent and finite_or_none(ent.get("collapse_sigma")) is not None:
            collapses.append(float(ent["collapse_sigma"]))
        elif ent and ent.get("sigmas"):
            collapses.append(collapse_sigma(ent["sigmas"], ent.get("effective_points_mean") or []))
    summary["memorized_fraction"] = max(fractions) if fractions else None
    summary["min_nn_ratio"] = min(mins) if mins else None
    if weighted:
        total = sum(w for _, w in weighted)
        summary["mean_nn_ratio"] = sum(m * w for m, w in weighted) / total
    summary["final_entropy"] = min(finals) if finals else None
    summary["collapse_sigma"] = max(collapses) if collapses else None

    sc = report.get("score_cosine")
    if sc:
        pairs = [(s, m) for s, m in zip(sc.get("sigmas") or [], sc.get("mean") or [])
                 if finite_or_none(s) is not None and finite_or_none(m) is not None]
        if pairs:
            summary["score_cosine_deviation_small_sigma"] = float(min(pairs, key=lambda p: p[0])[1])
            summary["score_cosine_deviation_mean"] = float(np.mean([m for _, m in pairs]))

    jac = report.get("jacobian")
    if jac:
        ratios = _finite(jac.get("ratio") or [])
        summary["jacobian_ratio_max"] = max(ratios) if ratios else None

    for entry in report.get("fid") or []:
        key = {"clean-fid": "fid", "proxy": "fid_proxy"}.get(entry.get("kind"))
        if key and summary[key] is None:
            summary[key] = finite_or_none(entry.get("value"))

    for key, value in per_run.items():
        summary[key] = value
    return {k: finite_or_none(v) for k, v in summary.items()}


def collapse_sigma(sigmas: Sequence[Any], effective_points: Sequence[Any], below: float = COLLAPSE_POINTS) -> float:
    """The largest sigma (sampling order: descending) at which mean exp(H) < `below`; 0 if it never drops."""
    for sigma, points in zip(sigmas, effective_points):
        if finite_or_none(points) is not None and float(points) < below and finite_or_none(sigma) is not None:
            return float(sigma)
    return 0.0


def attach_gates(report: dict, gates: Sequence[Gate | str]) -> dict:
    """Evaluate gates on report["summary"] and set report["gates"] and report["status"] (in place)."""
    report["gates"] = evaluate_gates(gates, report["summary"])
    report["status"] = gates_status(report["gates"])
    return report


def build_report(*, model: Mapping, data: Mapping, settings: Mapping, runs: Mapping[str, Mapping],
                 score_cosine: Optional[Mapping] = None, jacobian: Optional[Mapping] = None,
                 fid: Optional[Sequence[Mapping]] = None, gates: Sequence[Gate | str] = (),
                 provenance: Optional[Mapping] = None, memaudit_version: str = __version__) -> dict:
    """Assemble a complete "memaudit.scan/1" report: sections, summary, gates and status.

    Optional sections passed as None are left out (metric skipped). Raises UserError for a gate
    naming an unknown metric.
    """
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "memaudit_version": memaudit_version,
        "model": dict(model),
        "data": dict(data),
        "settings": dict(settings),
        "runs": {name: dict(run) for name, run in runs.items()},
    }
    if score_cosine is not None:
        report["score_cosine"] = dict(score_cosine)
    if jacobian is not None:
        report["jacobian"] = dict(jacobian)
    if fid is not None:
        report["fid"] = [dict(e) for e in fid]
    if provenance is not None:
        report["provenance"] = dict(provenance)
    report["summary"] = summarize(report)
    return attach_gates(report, gates)


# ------------------------------------------------------------------------------------------ validation

class _Check:
    @staticmethod
    def fail(where: str, what: str) -> None:
        raise ValueError(f"invalid report: {where} {what}")

    def dict(self, obj, where: str, keys: Sequence[str] = ()) -> Mapping:
        if not isinstance(obj, Mapping):
            self.fail(where, f"must be an object, got {type(obj).__name__}")
        for key in keys:
            if key not in obj:
                self.fail(f"{where}.{key}" if where else key, "is missing")
        return obj

    def list(self, obj, where: str) -> list:
        if not isinstance(obj, list):
            self.fail(where, f"must be a list, got {type(obj).__name__}")
        return obj

    def str(self, obj, where: str) -> str:
        if not isinstance(obj, str):
            self.fail(where, f"must be a string, got {type(obj).__name__}")
        return obj

    def int(self, obj, where: str, minimum: Optional[int] = None) -> int:
        if isinstance(obj, bool) or not isinstance(obj, int):
            self.fail(where, f"must be an integer, got {type(obj).__name__}")
        if minimum is not None and obj < minimum:
            self.fail(where, f"must be >= {minimum}, got {obj}")
        return obj

    def num(self, obj, where: str, nullable: bool = False) -> Optional[float]:
        if obj is None and nullable:
            return None
        if isinstance(obj, bool) or not isinstance(obj, (int, float)):
            self.fail(where, "must be a number" + (" or null" if nullable else "")
                      + f", got {type(obj).__name__}")
        if not math.isfinite(obj):
            self.fail(where, f"must be finite, got {obj}")
        return float(obj)

    def nums(self, obj, where: str, length: Optional[int] = None) -> list:
        self.list(obj, where)
        if length is not None and len(obj) != length:
            self.fail(where, f"must have {length} entries (one per sigma), got {len(obj)}")
        for i, v in enumerate(obj):
            self.num(v, f"{where}[{i}]", nullable=True)
        return obj

    def shape(self, obj, where: str) -> None:
        self.list(obj, where)
        if len(obj) != 3:
            self.fail(where, f"must be [C, H, W], got {len(obj)} entries")
        for i, v in enumerate(obj):
            self.int(v, f"{where}[{i}]", minimum=1)

    def curves(self, obj, where: str, keys: Sequence[str]) -> int:
        self.dict(obj, where, ("sigmas",) + tuple(keys))
        sigmas = self.nums(obj["sigmas"], f"{where}.sigmas")
        for key in keys:
            self.nums(obj[key], f"{where}.{key}", len(sigmas))
        return len(sigmas)


def validate_report(report: Any) -> None:
    """Check a report against schema "memaudit.scan/1"; raise ValueError naming the first problem."""
    c = _Check()
    c.dict(report, "report", TOP_KEYS)
    if report["schema"] != SCHEMA:
        c.fail("schema", f"must be {SCHEMA!r}, got {report['schema']!r}")
    c.str(report["memaudit_version"], "memaudit_version")

    model = c.dict(report["model"], "model", ("spec", "kind", "sigma_min", "sigma_max", "image_shape"))
    c.str(model["spec"], "model.spec")
    c.str(model["kind"], "model.kind")
    lo = c.num(model["sigma_min"], "model.sigma_min")
    hi = c.num(model["sigma_max"], "model.sigma_max")
    if not 0 <= lo <= hi:
        c.fail("model.sigma_min/sigma_max", f"must satisfy 0 <= sigma_min <= sigma_max, got {lo}, {hi}")
    c.shape(model["image_shape"], "model.image_shape")

    data = c.dict(report["data"], "data", ("path", "num_images", "image_shape"))
    c.str(data["path"], "data.path")
    c.int(data["num_images"], "data.num_images", minimum=0)
    c.shape(data["image_shape"], "data.image_shape")

    settings = c.dict(report["settings"], "settings", (
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

    runs = c.dict(report["runs"], "runs")
    for name, run in runs.items():
        where = f"runs.{name}"
        c.dict(run, where)
        unknown = set(run) - set(RUN_SECTIONS)
        if unknown:
            c.fail(where, f"has unknown section(s) {sorted(unknown)}; expected {list(RUN_SECTIONS)}")
        if "nn_ratio" in run:
            _validate_nn_ratio(c, run["nn_ratio"], f"{where}.nn_ratio")
        if "entropy" in run:
            e = f"{where}.entropy"
            c.curves(run["entropy"], e, ("mean", "median", "min", "effective_points_mean"))
            c.dict(run["entropy"], e, ("final_mean",))
            c.num(run["entropy"]["final_mean"], f"{e}.final_mean", nullable=True)
        if "trajectory_cosine" in run:
            c.curves(run["trajectory_cosine"], f"{where}.trajectory_cosine", ("mean", "std"))

    if "score_cosine" in report:
        c.curves(report["score_cosine"], "score_cosine", ("mean", "std"))
    if "jacobian" in report:
        c.curves(report["jacobian"], "jacobian", ("model", "empirical", "ratio", "step_expansion"))
    if "fid" in report:
        for i, entry in enumerate(c.list(report["fid"], "fid")):
            where = f"fid[{i}]"
            c.dict(entry, where, ("value", "kind", "message"))
            c.num(entry["value"], f"{where}.value", nullable=True)
            if entry["kind"] not in FID_KINDS:
                c.fail(f"{where}.kind", f"must be one of {list(FID_KINDS)}, got {entry['kind']!r}")
            c.str(entry["message"], f"{where}.message")
    if "provenance" in report:
        prov = c.dict(report["provenance"], "provenance", ("resumed", "runs"))
        if not isinstance(prov["resumed"], bool):
            c.fail("provenance.resumed", "must be true or false")
        for name, entry in c.dict(prov["runs"], "provenance.runs").items():
            c.dict(entry, f"provenance.runs.{name}", ("resumed_samples",))
            c.int(entry["resumed_samples"], f"provenance.runs.{name}.resumed_samples", minimum=0)
    if "duplicates" in data:
        dup = c.dict(data["duplicates"], "data.duplicates", ("tolerance", "num_clusters", "clusters"))
        c.num(dup["tolerance"], "data.duplicates.tolerance")
        c.int(dup["num_clusters"], "data.duplicates.num_clusters", minimum=0)
        for i, cluster in enumerate(c.list(dup["clusters"], "data.duplicates.clusters")):
            for j, member in enumerate(c.list(cluster, f"data.duplicates.clusters[{i}]")):
                c.int(member, f"data.duplicates.clusters[{i}][{j}]", minimum=0)
    extra = set(report) - set(TOP_KEYS) - set(OPTIONAL_KEYS)
    if extra:
        c.fail("report", f"has unknown key(s) {sorted(extra)}")

    summary = c.dict(report["summary"], "summary", BASE_METRICS)
    for name in runs:
        if sampler_metric(name) not in summary:
            c.fail(f"summary.{sampler_metric(name)}", "is missing")
    for key, value in summary.items():
        c.str(key, "summary key")
        c.num(value, f"summary.{key}", nullable=True)

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
        if not isinstance(gate["passed"], bool):
            c.fail(f"{where}.passed", "must be true or false")
        failed = failed or not gate["passed"]
    if report["status"] not in ("pass", "fail"):
        c.fail("status", f"must be 'pass' or 'fail', got {report['status']!r}")
    if report["status"] != ("fail" if failed else "pass"):
        c.fail("status", f"is {report['status']!r} but the gates say {'fail' if failed else 'pass'!r}")


def _validate_nn_ratio(c: _Check, nn: Any, where: str) -> None:
    c.dict(nn, where, ("memorized_fraction", "threshold", "mean", "median", "min", "histogram", "samples", "worst"))
    frac = c.num(nn["memorized_fraction"], f"{where}.memorized_fraction", nullable=True)
    if frac is not None and not 0 <= frac <= 1:
        c.fail(f"{where}.memorized_fraction", f"must lie in [0, 1], got {frac}")
    if "memorized_fraction_plain" in nn:
        c.num(nn["memorized_fraction_plain"], f"{where}.memorized_fraction_plain", nullable=True)
    c.num(nn["threshold"], f"{where}.threshold")
    for key in ("mean", "median", "min"):
        c.num(nn[key], f"{where}.{key}", nullable=True)
    hist = c.dict(nn["histogram"], f"{where}.histogram", ("bin_edges", "counts"))
    edges = c.nums(hist["bin_edges"], f"{where}.histogram.bin_edges")
    counts = c.list(hist["counts"], f"{where}.histogram.counts")
    if len(edges) != len(counts) + 1:
        c.fail(f"{where}.histogram", f"needs len(bin_edges) == len(counts) + 1, got {len(edges)} and {len(counts)}")
    for i, n in enumerate(counts):
        c.int(n, f"{where}.histogram.counts[{i}]", minimum=0)
    samples = c.list(nn["samples"], f"{where}.samples")
    indices = set()
    for i, s in enumerate(samples):
        sw = f"{where}.samples[{i}]"
        c.dict(s, sw, ("index", "ratio", "d1", "d2", "nearest"))
        indices.add(c.int(s["index"], f"{sw}.index", minimum=0))
        for key in ("ratio", "d1", "d2"):
            c.num(s[key], f"{sw}.{key}", nullable=True)
        c.int(s["nearest"], f"{sw}.nearest", minimum=0)
    for i, idx in enumerate(c.list(nn["worst"], f"{where}.worst")):
        c.int(idx, f"{where}.worst[{i}]", minimum=0)
        if idx not in indices:
            c.fail(f"{where}.worst[{i}]", f"names sample {idx}, which is not in {where}.samples")
