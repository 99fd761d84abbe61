"""The verdict a reviewer reads first: how much is copied (with its interval), how many distinct training images,
calibrated or not, and a severity from the interval. Gates are a separate matter (they pass or fail only on
--fail-on expressions).

severity: "high" when the lower end of the 95 % Wilson interval of the memorized fraction exceeds 1 % (copying is
established), "low" when the upper end is below 1 % (copying is bounded below 1 %), else "unclear" (too few
samples to tell); "unknown" when the fraction was not computed.
"""

from __future__ import annotations

from typing import Any, Mapping

from memaudit.numbers import finite_or_none, fmt

LEVEL = 0.01
COLOURS = {"high": "#d62728", "unclear": "#e6a700", "low": "#2ca02c", "unknown": "#7f7f7f"}


def _bounds(summary: Mapping[str, Any]) -> tuple:
    """(lower, upper) of the memorized fraction; with --match-flips/--match-shifts the larger of the plain and the
    flip/shift-aware bounds, since a mirrored copy is a copy; for a latent model the larger of the latent-space and
    the decoded pixel-space bounds."""
    keys = [("memorized_fraction_lower", "memorized_fraction_upper")]
    for name in ("match_memorized_fraction", "decoded_memorized_fraction"):
        if summary.get(name) is not None:
            keys.append((f"{name}_lower", f"{name}_upper"))
    pairs = [(finite_or_none(summary.get(lo)), finite_or_none(summary.get(hi))) for lo, hi in keys]
    if any(lo is None or hi is None for lo, hi in pairs):
        return None, None
    return max(lo for lo, _ in pairs), max(hi for _, hi in pairs)


def severity(summary: Mapping[str, Any]) -> str:
    lo, hi = _bounds(summary)
    if lo is None or hi is None:
        return "unknown"
    return "high" if lo > LEVEL else "low" if hi < LEVEL else "unclear"


def pct(value: Any) -> str:
    v = finite_or_none(value)
    return "n/a" if v is None else f"{100 * v:.3g}%"


def verdict_lines(report: Mapping[str, Any]) -> list[str]:
    """The verdict as sentences (the HTML shows them in a coloured box, the Markdown as a list)."""
    s = report.get("summary") or {}
    data = report.get("data") or {}
    runs = report.get("runs") or {}
    n = (report.get("settings") or {}).get("num_samples")
    out = [f"Copied: {pct(s.get('memorized_fraction'))} of samples (95 % interval {pct(s.get('memorized_fraction_lower'))}"
           f" to {pct(s.get('memorized_fraction_upper'))}, {n} samples per sampler, worst of {len(runs)} sampler(s); "
           f"NN ratio d1/d2 below the threshold)."]
    if finite_or_none(s.get("match_memorized_fraction")) is not None:
        out[0] += (f" Up to flips/shifts (--match-flips/--match-shifts): {pct(s.get('match_memorized_fraction'))} "
                   f"(95 % interval {pct(s.get('match_memorized_fraction_lower'))} to "
                   f"{pct(s.get('match_memorized_fraction_upper'))}); gate it with match_memorized_fraction_upper.")
    if finite_or_none(s.get("decoded_memorized_fraction")) is not None:
        out[0] += (f" That is in latent space; the decoded images: {pct(s.get('decoded_memorized_fraction'))} "
                   f"(95 % interval {pct(s.get('decoded_memorized_fraction_lower'))} to "
                   f"{pct(s.get('decoded_memorized_fraction_upper'))}); gate it with decoded_memorized_fraction_upper.")
    distinct = finite_or_none(s.get("distinct_reproduced"))
    if distinct is not None:
        out.append(f"Distinct training images reproduced: {int(distinct)} of {data.get('num_images', '?')} "
                   f"(the most copied one {int(s.get('max_copies_per_image') or 0)} times).")
    cal = report.get("calibration") or {}
    if cal.get("calibrated"):
        out.append(f"Calibrated on {cal.get('num_holdout')} held-out real images: the threshold flags "
                   f"{pct(cal.get('fpr'))} of them (false-positive rate, upper bound {pct(cal.get('fpr_upper'))}); "
                   f"at the calibrated threshold {fmt(cal.get('calibrated_threshold'))} (FPR {fmt(cal.get('target_fpr'))}) "
                   f"{pct(s.get('calibrated_memorized_fraction'))} of samples are copies; " + (
                       f"C_T {fmt(s.get('ct_score'))} (held-out baseline {fmt(cal.get('ct_baseline'))}; << 0 = copying)."
                       if s.get("ct_score") is not None else
                       "C_T not computed (no k-means cell holds more than 20 samples: draw more, or it was skipped)."))
    else:
        out.append("Uncalibrated: the threshold was not checked on held-out real images (pass --holdout DATA2).")
    extra = [f"DiffMemorize-compatible ratio {pct(s.get('diffmemorize_fraction'))}"
             if s.get("diffmemorize_fraction") is not None else None,
             f"partial copies (tiles) {pct(s.get('tiled_memorized_fraction'))}"
             if s.get("tiled_memorized_fraction") is not None else None,
             f"up to flips/shifts {pct(s.get('match_memorized_fraction'))}"
             if s.get("match_memorized_fraction") is not None else None,
             f"authenticity {pct(s.get('authenticity'))}" if s.get("authenticity") is not None else None]
    extra = [e for e in extra if e]
    if extra:
        out.append("Other criteria: " + "; ".join(extra) + ".")
    return out


def gates_line(report: Mapping[str, Any]) -> str:
    gates = report.get("gates") or []
    if not gates:
        return ("Gates: none given, so the status is PASS (no gates). PASS/FAIL speaks only of --fail-on gates, "
                "not of memorization.")
    failed = sum(1 for g in gates if not g.get("passed"))
    return (f"Gates: {'FAIL' if failed else 'PASS'} ({len(gates) - failed}/{len(gates)} passed). PASS/FAIL speaks "
            "only of the --fail-on gates, not of memorization.")
