"""Self-contained HTML report (inline SVG plots, PNG grids beside it) plus a Markdown summary.

write_html() replaces its output folder as a whole (built in a temporary folder, then renamed), so
give it a dedicated folder such as <out>/report; it refuses to replace a folder holding anything
that is not a memaudit report file.
"""

from __future__ import annotations

import html
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from torch import Tensor

from memaudit.atomic import atomic_dir, write_text_atomic
from memaudit.errors import UserError
from memaudit.metrics import METRICS
from memaudit.metrics.base import RUN, Histogram, Note, PairGrid, Plot
from memaudit.numbers import finite_or_none, fmt
from memaudit.report.images import auto_upscale, image_grid, pairs_grid, save_png
from memaudit.report.terminal import cell, run_columns, statements
from memaudit.report.verdict import COLOURS, gates_line, severity, verdict_lines

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
REPORT_FILES = re.compile(r"(index\.html|report\.md|[a-z]+_[A-Za-z0-9_.-]*\.png)")

W, H = 640, 320
ML, MR, MT, MB = 64, 170, 34, 48  # margins: left, right (legend), top (title), bottom (axis label)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: float) -> str:
    """Fixed-precision SVG coordinate (deterministic output)."""
    return f"{v:.2f}"


# ------------------------------------------------------------------------------------------------ axes

def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.3g}"


class _Axis:
    """Maps data values to pixels along one axis, linear or log10."""

    def __init__(self, values: Iterable[float], lo_px: float, hi_px: float, log: bool,
                 include: Sequence[float] = ()) -> None:
        vals = [v for v in list(values) + list(include) if v is not None and math.isfinite(v) and (v > 0 or not log)]
        self.log = log
        if log:
            vals = [math.log10(v) for v in vals]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        if hi - lo < 1e-12:
            pad = 0.5 if log else (abs(lo) * 0.1 or 1.0)
            lo, hi = lo - pad, hi + pad
        elif not log:
            pad = 0.05 * (hi - lo)
            lo, hi = lo - (pad if lo != 0 else 0), hi + pad
        self.lo, self.hi, self.lo_px, self.hi_px = lo, hi, lo_px, hi_px

    def valid(self, v: Optional[float]) -> bool:
        return v is not None and math.isfinite(v) and (v > 0 or not self.log)

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        return self.lo_px + (t - self.lo) / (self.hi - self.lo) * (self.hi_px - self.lo_px)

    def ticks(self) -> list[float]:
        if self.log:
            d0, d1 = math.floor(self.lo), math.ceil(self.hi)
            decades = [10.0 ** d for d in range(d0, d1 + 1) if self.lo - 1e-9 <= d <= self.hi + 1e-9]
            if len(decades) >= 2:
                step = max(1, math.ceil(len(decades) / 8))
                return decades[::step]
            ticks = [m * 10.0 ** d for d in range(d0, d1 + 1) for m in (1, 2, 5)]
            return [t for t in ticks if self.lo - 1e-9 <= math.log10(t) <= self.hi + 1e-9]
        step = _nice_step(self.hi - self.lo)
        first = math.ceil(self.lo / step - 1e-9)
        ticks, k = [], first
        while k * step <= self.hi + 1e-9 * step and len(ticks) < 20:
            ticks.append(round(k * step, 12))
            k += 1
        return ticks


def _frame(title: str, xlabel: str, ylabel: str, xa: _Axis, ya: _Axis) -> list[str]:
    x0, x1, y0, y1 = ML, W - MR, H - MB, MT
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}">',
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>',
        f'<text x="{W / 2 - MR / 2:.0f}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{esc(title)}</text>',
    ]
    for t in xa.ticks():
        px = xa(t)
        out.append(f'<line x1="{_num(px)}" y1="{y0}" x2="{_num(px)}" y2="{y1}" stroke="#e5e5e5"/>')
        out.append(f'<line x1="{_num(px)}" y1="{y0}" x2="{_num(px)}" y2="{y0 + 5}" stroke="#333"/>')
        out.append(f'<text x="{_num(px)}" y="{y0 + 18}" text-anchor="middle" font-size="11">{esc(_tick_label(t))}</text>')
    for t in ya.ticks():
        py = ya(t)
        out.append(f'<line x1="{x0}" y1="{_num(py)}" x2="{x1}" y2="{_num(py)}" stroke="#e5e5e5"/>')
        out.append(f'<line x1="{x0 - 5}" y1="{_num(py)}" x2="{x0}" y2="{_num(py)}" stroke="#333"/>')
        out.append(f'<text x="{x0 - 8}" y="{_num(py + 4)}" text-anchor="end" font-size="11">{esc(_tick_label(t))}</text>')
    out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{(x0 + x1) / 2:.0f}" y="{H - 10}" text-anchor="middle" font-size="12">{esc(xlabel)}</text>')
    out.append(f'<text x="16" y="{(y0 + y1) / 2:.0f}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 16 {(y0 + y1) / 2:.0f})">{esc(ylabel)}</text>')
    return out


def svg_line_plot(title: str, series: Sequence[Mapping[str, Any]], xlabel: str = "sigma", ylabel: str = "",
                  logx: bool = True, logy: bool = False, include_y: Sequence[float] = ()) -> str:
    """An inline SVG line plot. Each series: {"label", "x": [...], "y": [...], optional "dash"}.

    Null / non-finite points (and non-positive ones on a log axis) break the line.
    """
    xs = [finite_or_none(v) for s in series for v in s["x"]]
    ys = [finite_or_none(v) for s in series for v in s["y"]]
    xa = _Axis(xs, ML, W - MR, logx)
    ya = _Axis(ys, H - MB, MT, logy, include=include_y)
    out = _frame(title, xlabel + (" (log scale)" if logx else ""), ylabel + (" (log scale)" if logy else ""), xa, ya)
    for k, s in enumerate(series):
        color = s.get("color") or PALETTE[k % len(PALETTE)]
        dash = ' stroke-dasharray="6 4"' if s.get("dash") else ""
        points = sorted(((finite_or_none(x), finite_or_none(y)) for x, y in zip(s["x"], s["y"])),
                        key=lambda p: (p[0] is None, p[0] or 0.0))
        segments: list[list[tuple[float, float]]] = [[]]
        for x, y in points:
            if xa.valid(x) and ya.valid(y):
                segments[-1].append((xa(x), ya(y)))
            elif segments[-1]:
                segments.append([])
        for seg in segments:
            if len(seg) >= 2:
                pts = " ".join(f"{_num(px)},{_num(py)}" for px, py in seg)
                out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            if len(seg) <= 40:
                out.extend(f'<circle cx="{_num(px)}" cy="{_num(py)}" r="2.5" fill="{color}"/>' for px, py in seg)
        ly = MT + 12 + 18 * k
        lx = W - MR + 12
        out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 22}" y2="{ly - 4}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 28}" y="{ly}" font-size="11">{esc(s["label"])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def svg_histogram(title: str, bin_edges: Sequence[float], counts: Sequence[int],
                  threshold: Optional[float] = None, xlabel: str = "NN ratio d1/d2") -> str:
    """An inline SVG bar histogram with an optional vertical threshold line."""
    edges = [finite_or_none(e) for e in bin_edges]
    include = [0.0] + ([threshold] if finite_or_none(threshold) is not None else [])
    xa = _Axis(edges + include, ML, W - MR, False)
    xa.lo, xa.hi = min(v for v in edges + include if v is not None), max(v for v in edges + include if v is not None)
    ya = _Axis([float(c) for c in counts], H - MB, MT, False, include=[0.0])
    ya.lo = 0.0
    out = _frame(title, xlabel, "samples", xa, ya)
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        if lo is None or hi is None or not c:
            continue
        x, top = xa(lo), ya(c)
        out.append(f'<rect x="{_num(x + 0.5)}" y="{_num(top)}" width="{_num(max(xa(hi) - x - 1, 0.5))}" '
                   f'height="{_num(ya(0) - top)}" fill="{PALETTE[0]}"><title>[{lo:.3g}, {hi:.3g}): {int(c)}</title></rect>')
    if finite_or_none(threshold) is not None:
        px = xa(threshold)
        out.append(f'<line x1="{_num(px)}" y1="{H - MB}" x2="{_num(px)}" y2="{MT}" stroke="#d62728" '
                   f'stroke-width="2" stroke-dasharray="6 4"/>')
        lx = W - MR + 12
        out.append(f'<line x1="{lx}" y1="{MT + 8}" x2="{lx + 22}" y2="{MT + 8}" stroke="#d62728" stroke-width="2" '
                   f'stroke-dasharray="6 4"/>')
        out.append(f'<text x="{lx + 28}" y="{MT + 12}" font-size="11">threshold {esc(fmt(threshold, 3))}</text>')
        out.append(f'<text x="{lx + 28}" y="{MT + 28}" font-size="11">left of it: memorized</text>')
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- report

def _safe_names(runs: Iterable[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    used: set[str] = set()
    for run in sorted(runs):
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", run).strip(".") or "run"
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names[run] = name
    return names


def check_html_folder(folder: str | os.PathLike) -> None:
    """UserError unless `folder` can take the HTML report: new, empty, or holding only report files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write the HTML report to {folder}: it is a file, not a folder")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if not REPORT_FILES.fullmatch(p.name))
        if foreign:
            raise UserError(f"refusing to replace {folder}: it holds files that are not part of a memaudit "
                            f"HTML report (e.g. {foreign[0]}); choose an empty or dedicated folder")


def run_evidence(report: Mapping[str, Any], run: str) -> list:
    """Every run metric's figures for one run (Note, Histogram, PairGrid), in METRICS order."""
    sections = (report.get("runs") or {}).get(run) or {}
    return [block for m in METRICS if m.scope == RUN and m.name in sections
            for block in m.evidence(run, sections[m.name])]


def _images_for_run(tmp: Path, fname: str, blocks: list, samples: Optional[Tensor], train: Optional[Tensor],
                    max_samples: int) -> dict[str, Any]:
    """Write samples_<run>.png and one <file>_<run>.png per pair grid into tmp; return the file names."""
    out: dict[str, Any] = {"pairs": {}}
    if samples is None or len(samples) == 0:
        return out
    upscale = auto_upscale(samples.shape[-2])
    shown = samples[:max_samples]
    grid = image_grid(shown, nrow=min(16, max(1, math.ceil(math.sqrt(len(shown))))), upscale=upscale)
    out["samples"] = f"samples_{fname}.png"
    out["samples_count"] = len(shown)
    save_png(grid, tmp / out["samples"])
    for block in blocks:
        if not isinstance(block, PairGrid) or train is None or not len(train) or not block.sample_indices:
            continue
        for i, j in zip(block.sample_indices, block.train_indices):
            if not (0 <= i < len(samples)) or not (0 <= j < len(train)):
                raise ValueError(f"pair sample {i} / training image {j} is out of range "
                                 f"({len(samples)} samples, {len(train)} training images)")
        name = f"{block.file}_{fname}.png"
        save_png(pairs_grid(samples, train, block.sample_indices, block.train_indices, upscale=upscale,
                            pairs_per_row=4), tmp / name)
        out["pairs"][block.title] = name
    return out


CLUSTER_ROWS, CLUSTER_COLS = 16, 8
DUPLICATES_PNG = "duplicates_clusters.png"


def _duplicates_grid(tmp: Path, report: Mapping[str, Any], train: Optional[Tensor]) -> Optional[str]:
    """duplicates_clusters.png: one row per near-duplicate cluster (at most 16 rows of 8 members; blank-padded)."""
    clusters = ((report.get("data") or {}).get("duplicates") or {}).get("clusters") or []
    if train is None or not len(train) or not clusters:
        return None
    import torch

    rows = []
    for members in clusters[:CLUSTER_ROWS]:
        members = [m for m in members if 0 <= m < len(train)][:CLUSTER_COLS]
        row = train[members].detach().cpu().float()
        blank = torch.ones((CLUSTER_COLS - len(members),) + tuple(train.shape[1:]))
        rows.append(torch.cat([row, blank]))
    save_png(image_grid(torch.cat(rows), nrow=CLUSTER_COLS, upscale=auto_upscale(train.shape[-2])),
             tmp / DUPLICATES_PNG)
    return DUPLICATES_PNG


def merged_plots(report: Mapping[str, Any]) -> list[Plot]:
    """Every metric's plots, those with the same title merged into one, in METRICS order."""
    merged: dict[str, Plot] = {}
    for metric in METRICS:
        for plot in metric.plots(report):
            if plot.title in merged:
                first = merged[plot.title]
                plot = Plot(first.title, first.ylabel, list(first.series) + list(plot.series), first.logy,
                            tuple(first.include_y) + tuple(plot.include_y))
            merged[plot.title] = plot
    return list(merged.values())


def _svg(plot: Plot, runs: Sequence[str]) -> str:
    colour = {run: PALETTE[k % len(PALETTE)] for k, run in enumerate(sorted(runs))}
    series = [{"label": s.label, "x": s.x, "y": s.y, "dash": s.dash,
               "color": s.color or colour.get(s.run) or PALETTE[k % len(PALETTE)]}
              for k, s in enumerate(plot.series)]
    return svg_line_plot(plot.title, series, ylabel=plot.ylabel, logy=plot.logy, include_y=plot.include_y)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], raw_cols: Sequence[int] = ()) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c if i in raw_cols else esc(c)}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _gate_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(str(g.get("expr", "")), fmt(g.get("value"), 6), "PASS" if g.get("passed") else "FAIL",
             str(g.get("reason", ""))) for g in report.get("gates") or []]


def _run_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The per-sampler table: headers and one row per run, from the run metrics' columns."""
    runs = report.get("runs") or {}
    headers = ["sampler"] + [column.header for _, column in run_columns()]
    rows = [[name] + [cell(column, (runs[name] or {}).get(metric.name) or {}) for metric, column in run_columns()]
            for name in sorted(runs)]
    return headers, rows


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 10px; text-align: left; font-size: 14px; }
th { background: #f3f3f3; }
.status { display: inline-block; padding: 4px 14px; border-radius: 4px; font-weight: bold; color: #fff; }
.pass { background: #2ca02c; } .fail { background: #d62728; }
td.pass, td.fail { color: #fff; font-weight: bold; }
img.grid { image-rendering: pixelated; border: 1px solid #ccc; max-width: 100%; }
svg.plot { margin: 0.5em 0; max-width: 100%; height: auto; }
code { background: #f3f3f3; padding: 0 3px; }
.verdict { border-left: 10px solid; padding: 0.6em 1em; margin: 1em 0; background: #fafafa; font-size: 17px; }
.verdict p { margin: 0.35em 0; }
.severity { font-weight: bold; text-transform: uppercase; }
.gatesline { color: #444; }
"""


def _evidence_html(run: str, blocks: list, images: Mapping[str, Any]) -> list[str]:
    out = []
    for block in blocks:
        if isinstance(block, Note):
            out.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Histogram):
            out.append(svg_histogram(block.title, block.bin_edges, block.counts, block.threshold, block.xlabel))
        elif isinstance(block, PairGrid) and block.title in images.get("pairs", {}):
            out.append(f"<h4>{esc(block.title)}</h4>")
            out.append(f'<img class="grid" src="{esc(images["pairs"][block.title])}" alt="{esc(block.title)} for '
                       f'{esc(run)}">')
            out.append(_table(block.headers, block.rows))
    if images.get("samples"):
        out.append(f"<h4>Samples (first {images['samples_count']})</h4>")
        out.append(f'<img class="grid" src="{esc(images["samples"])}" alt="samples for {esc(run)}">')
    return out


def render_html(report: Mapping[str, Any], images: Mapping[str, Mapping[str, Any]]) -> str:
    """The index.html text; `images` maps run name -> the image files written beside it."""
    model, data, settings = report.get("model", {}), report.get("data", {}), report.get("settings", {})
    status = report.get("status", "pass")
    sev = severity(report.get("summary") or {})
    body = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>memaudit scan: {esc(model.get('spec', ''))}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>memaudit scan: {esc(model.get('spec', ''))}</h1>",
        f'<div class="verdict" style="border-color: {COLOURS[sev]}">',
        f'<p><span class="severity" style="color: {COLOURS[sev]}">Memorization: {esc(sev)}</span> '
        f"(high: the interval's lower end exceeds 1 %; low: its upper end is below 1 %)</p>",
    ]
    body += [f"<p>{esc(line)}</p>" for line in verdict_lines(report)]
    body += ["</div>",
             f'<p class="gatesline"><span class="status {"pass" if status == "pass" else "fail"}">'
             f"{esc(str(status).upper())}</span> {'(no gates) ' if not report.get('gates') else ''}"
             f"{esc(gates_line(report))}</p>"]
    gate_rows = _gate_rows(report)
    if gate_rows:
        body.append(_table(["gate (fails when true)", "value", "result", "reason"],
                           [(e, v, f'<span class="status {r.lower()}">{r}</span>', why) for e, v, r, why in gate_rows],
                           raw_cols=[2]))
    else:
        body.append("<p>No gates (pass <code>--fail-on METRIC&gt;NUMBER</code> to gate CI on a metric, e.g. "
                    "<code>memorized_fraction_upper&gt;0.01</code>).</p>")

    runs = report.get("runs") or {}
    body.append("<h2>Evidence per sampler</h2>")
    for name in sorted(runs):
        body.append(f"<h3>Sampler {esc(name)}</h3>")
        body.extend(_evidence_html(name, run_evidence(report, name), images.get(name) or {}))
    dup = data.get("duplicates") or {}
    if dup.get("num_clusters"):
        body.append("<h2>Near-duplicate training images</h2>")
        body.append(f"<p>{dup['num_clusters']} clusters hold {dup.get('num_images_in_clusters')} training images "
                    f"(tolerance {fmt(dup.get('tolerance'))}); NN ratios use the nearest distinct image.</p>")
        if images.get("_duplicates"):
            body.append(f'<img class="grid" src="{esc(images["_duplicates"])}" alt="near-duplicate clusters, one '
                        f'per row">')
        body.append(_table(["cluster", "size", "training images"],
                           [(k + 1, len(c), ", ".join(map(str, c[:20])) + (" ..." if len(c) > 20 else ""))
                            for k, c in enumerate(dup.get("clusters") or [])]))

    plots = merged_plots(report)
    if plots:
        body.append("<h2>Curves over the noise level sigma</h2>")
        body.extend(_svg(plot, runs) for plot in plots)

    body.append("<h2>All numbers</h2>")
    headers, rows = _run_rows(report)
    if rows:
        body.append(_table(headers, rows))
    body.append(_table(["metric", "value"], [(k, fmt(v, 6)) for k, v in (report.get("summary") or {}).items()]))
    body.extend(f"<p>{esc(line)}</p>" for line in statements(report))
    body += [
        "<h2>Settings</h2>",
        _table(["", "value"], [
            ("model", f"{model.get('spec', '')} ({model.get('kind', '')}), sigma in "
                      f"[{fmt(model.get('sigma_min'))}, {fmt(model.get('sigma_max'))}], image shape {model.get('image_shape')}"),
            ("training data", f"{data.get('path', '')}: {data.get('num_images', '')} images of shape {data.get('image_shape')}"),
        ] + [(k, ", ".join(map(str, v)) if isinstance(v, list) else fmt(v) if isinstance(v, float) else v)
             for k, v in sorted(settings.items())]),
        f"<p>schema <code>{esc(report.get('schema', ''))}</code>, memaudit {esc(report.get('memaudit_version', ''))}</p>",
    ]
    body += ["</body>", "</html>", ""]
    return "\n".join(body)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def md(value: Any) -> str:
    """Escape a string for a Markdown table cell / paragraph (one line)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).splitlines()))


def render_markdown(report: Mapping[str, Any], images: Mapping[str, Mapping[str, Any]]) -> str:
    """report.md: status, per-sampler table, summary metrics, statements, gates and the same images."""
    model, data = report.get("model", {}), report.get("data", {})
    lines = [f"# memaudit scan: {md(model.get('spec', ''))}", "",
             f"**Memorization: {md(severity(report.get('summary') or {}))}**", ""]
    lines += [f"- {md(line)}" for line in verdict_lines(report)] + ["",
             f"**Status: {md(str(report.get('status', 'pass')).upper())}**"
             f"{'' if report.get('gates') else ' (no gates)'}: {md(gates_line(report))}", "",
             f"Model {md(model.get('spec', ''))} ({md(model.get('kind', ''))}) on {md(data.get('path', ''))} "
             f"({md(data.get('num_images', ''))} images).", ""]
    headers, rows = _run_rows(report)
    if rows:
        lines += ["| " + " | ".join(md(h) for h in headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
        lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
        lines.append("")
    lines += ["## Summary metrics", "", "| metric | value |", "|---|---:|"]
    lines += [f"| `{k}` | {fmt(v, 6)} |" for k, v in (report.get("summary") or {}).items()]
    lines.append("")
    for line in statements(report):
        lines += [md(line), ""]
    lines += ["## Gates", ""]
    gate_rows = _gate_rows(report)
    if gate_rows:
        lines += ["| gate (fails when true) | value | result | reason |", "|---|---:|---|---|"]
        lines += [f"| {md(e)} | {v} | **{r}** | {md(why)} |" for e, v, r, why in gate_rows]
    else:
        lines.append("No gates.")
    lines.append("")
    for name in sorted(report.get("runs") or {}):
        imgs = images.get(name) or {}
        if imgs.get("pairs") or imgs.get("samples"):
            lines += [f"## Sampler {md(name)}", ""]
        for title, file in (imgs.get("pairs") or {}).items():
            lines += [f"{md(title)}:", "", f"![{md(title)}]({file})", ""]
        if imgs.get("samples"):
            lines += ["Samples:", "", f"![samples]({imgs['samples']})", ""]
    lines.append("Plots: see index.html.")
    return "\n".join(lines) + "\n"


def write_html(report: Mapping[str, Any], folder: str | os.PathLike,
               samples: Optional[Mapping[str, Tensor]] = None, train: Optional[Tensor] = None,
               max_samples: int = 64) -> Path:
    """Write folder/index.html, folder/report.md, folder/samples_<run>.png and the metrics' pair grids.

    samples: generated images (N, C, H, W) in [-1, 1] per run name; train: training images in [-1, 1],
    indexed by the pair grids' training indices. Runs without samples get no images. The folder is replaced
    atomically as a whole. Returns the path of index.html.
    """
    folder = Path(folder)
    check_html_folder(folder)
    samples = samples or {}
    runs = report.get("runs") or {}
    names = _safe_names(runs)
    with atomic_dir(folder) as tmp:
        images = {run: _images_for_run(tmp, names[run], run_evidence(report, run), samples.get(run), train,
                                       max_samples) for run in sorted(runs)}
        duplicates_png = _duplicates_grid(tmp, report, train)
        if duplicates_png:
            images["_duplicates"] = duplicates_png
        write_text_atomic(tmp / "index.html", render_html(report, images))
        write_text_atomic(tmp / "report.md", render_markdown(report, images))
    return folder / "index.html"
