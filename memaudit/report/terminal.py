"""Terminal summary of a scan report (rich). Plain ASCII text without colour when not on a terminal."""

from __future__ import annotations

from typing import Any, Mapping

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from memaudit.report.schema import collapse_sigma, finite_or_none, fmt


def _pct(value: Any) -> str:
    v = finite_or_none(value)
    return "n/a" if v is None else f"{v:.4g} ({100 * v:.1f}%)"


def _word(passed: bool, styled: bool) -> Text:
    word = "PASS" if passed else "FAIL"
    return Text(word, style=("bold green" if passed else "bold red") if styled else "")


def _data_lines(report: Mapping[str, Any]) -> list[str]:
    """How the data were read, near-duplicate clusters, and which runs resumed from saved samples."""
    data, lines = report.get("data") or {}, []
    if data.get("value_range"):
        lines.append(f"training values read as {data['value_range']}")
    dup = data.get("duplicates") or {}
    if dup.get("num_clusters"):
        lines.append(f"warning: {dup.get('num_images_in_clusters')} training images form {dup['num_clusters']} "
                     f"near-duplicate clusters; NN ratios use the nearest distinct image (data.duplicates)")
    runs = ((report.get("provenance") or {}).get("runs") or {})
    resumed = [f"{name} {r['resumed_samples']}" for name, r in sorted(runs.items()) if r.get("resumed_samples")]
    if resumed:
        lines.append(f"resumed from saved samples: {', '.join(resumed)} (spot-checked; see provenance)")
    return lines


def print_summary(report: Mapping[str, Any], console: Console) -> None:
    """Print the scan summary: a per-sampler table, score-cosine / Jacobian / FID lines, then the gates."""
    styled = console.is_terminal
    table_box = box.ROUNDED if styled else box.ASCII
    model, data, settings = report.get("model", {}), report.get("data", {}), report.get("settings", {})
    console.print(
        f"memaudit scan of {model.get('spec', '?')} ({model.get('kind', '?')}) on {data.get('path', '?')} "
        f"({data.get('num_images', '?')} images): {settings.get('num_samples', '?')} samples per sampler, "
        f"seed {settings.get('seed', '?')}, features {settings.get('features', '?')}",
        markup=False, highlight=False, soft_wrap=True,
    )
    for line in _data_lines(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    runs = report.get("runs") or {}
    table = Table(title="Memorization per sampler", box=table_box, title_justify="left",
                  header_style="bold" if styled else "", title_style="bold" if styled else "")
    table.add_column("sampler")
    table.add_column("memorized fraction", justify="right")
    table.add_column("mean NN ratio", justify="right")
    table.add_column("min NN ratio", justify="right")
    table.add_column("collapse sigma", justify="right")
    for name in sorted(runs):
        run = runs[name] or {}
        nn = run.get("nn_ratio") or {}
        ent = run.get("entropy") or {}
        frac = Text(_pct(nn.get("memorized_fraction")))
        if styled and finite_or_none(nn.get("memorized_fraction")):
            frac.stylize("red")
        collapse = collapse_sigma(ent["sigmas"], ent.get("effective_points_mean") or []) if ent.get("sigmas") else None
        table.add_row(Text(name), frac, fmt(nn.get("mean")), fmt(nn.get("min")), fmt(collapse, 3))
    if runs:
        console.print(table)
        threshold = next((r["nn_ratio"].get("threshold") for r in runs.values() if r and r.get("nn_ratio")), None)
        if threshold is not None:
            console.print(f"memorized = nearest/second-nearest training distance ratio < {fmt(threshold)}; "
                          "collapse sigma = noise level where one training image takes over the sampling path "
                          "(fewer than 2 effective points; larger = earlier)", markup=False, highlight=False,
                          soft_wrap=True)
    else:
        console.print("no sampler runs", markup=False, highlight=False)

    summary = report.get("summary") or {}
    lines = []
    if "score_cosine" in report:
        lines.append(f"score-cosine deviation on noisy training points: {fmt(summary.get('score_cosine_deviation_small_sigma'))} "
                     f"at the smallest sigma, {fmt(summary.get('score_cosine_deviation_mean'))} mean over sigmas (0 = empirical score)")
    if "jacobian" in report:
        lines.append(f"jacobian spectral norm ratio model/empirical: max {fmt(summary.get('jacobian_ratio_max'))}")
    for entry in report.get("fid") or []:
        label = "FID (clean-fid)" if entry.get("kind") == "clean-fid" else "FID proxy"
        message = f" - {entry['message']}" if entry.get("message") else ""
        lines.append(f"{label}: {fmt(entry.get('value'), 5)}{message}")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    gates = report.get("gates") or []
    if gates:
        gt = Table(title="Gates (--fail-on: a gate fails when its condition holds)", box=table_box,
                   title_justify="left", header_style="bold" if styled else "", title_style="bold" if styled else "")
        gt.add_column("gate")
        gt.add_column("value", justify="right")
        gt.add_column("result")
        gt.add_column("reason")
        for g in gates:
            gt.add_row(Text(str(g.get("expr", ""))), fmt(g.get("value"), 6), _word(bool(g.get("passed")), styled),
                       Text(str(g.get("reason", ""))))
        console.print(gt)
    status = report.get("status", "pass")
    line = Text("status: ")
    line.append_text(_word(status == "pass", styled))
    failed = sum(1 for g in gates if not g.get("passed"))
    line.append(f" ({len(gates) - failed}/{len(gates)} gates passed)" if gates else " (no gates)")
    console.print(line)
