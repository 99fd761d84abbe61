"""Terminal summary of a scan report (rich), drawn from the metric list: the verdict first (memaudit.report.verdict),
then the per-sampler table (a row per run-metric column, a column per sampler), the metrics' one-line statements. Plain ASCII without colour off a terminal."""

from __future__ import annotations

from typing import Any, Mapping

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from memaudit.metrics import METRICS
from memaudit.metrics.base import RUN
from memaudit.numbers import finite_or_none, fmt
from memaudit.report.verdict import verdict_lines


def cell(column, section: Mapping) -> str:
    """A column's value for one run, formatted ('n/a' when the section is missing or the value null)."""
    value = column.value(section) if section else None
    v = finite_or_none(value)
    if column.percent:
        return "n/a" if v is None else f"{v:.{column.digits}g} ({100 * v:.1f}%)"
    return fmt(value, column.digits)


def run_columns() -> list[tuple[Any, Any]]:
    """(metric, column) of every run metric's table columns, in METRICS order."""
    return [(m, col) for m in METRICS if m.scope == RUN for col in m.columns]


def statements(report: Mapping[str, Any]) -> list[str]:
    """Every metric's one-line statements, in METRICS order."""
    return [line for metric in METRICS for line in metric.lines(report)]


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


def _table(title: str, styled: bool) -> Table:
    return Table(title=title, box=box.ROUNDED if styled else box.ASCII, title_justify="left",
                 header_style="bold" if styled else "", title_style="bold" if styled else "")


def print_summary(report: Mapping[str, Any], console: Console) -> None:
    """Print the scan summary: a per-sampler table, the metrics' statements, then the gates."""
    styled = console.is_terminal
    say = lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    model, data, settings = report.get("model", {}), report.get("data", {}), report.get("settings", {})
    say(f"memaudit scan of {model.get('spec', '?')} ({model.get('kind', '?')}) on {data.get('path', '?')} "
        f"({data.get('num_images', '?')} images): {settings.get('num_samples', '?')} samples per sampler, "
        f"seed {settings.get('seed', '?')}, features {settings.get('features', '?')}")
    for line in _data_lines(report):
        say(line)

    for line in verdict_lines(report):
        say(line)
    runs = report.get("runs") or {}
    if runs:  # one row per measure, one column per sampler: readable however many metrics there are
        table = _table("Memorization per sampler", styled)
        table.add_column("measure")
        for name in sorted(runs):
            table.add_column(name, justify="right")
        for metric, column in run_columns():
            cells = []
            for name in sorted(runs):
                section = (runs[name] or {}).get(metric.name) or {}
                text = Text(cell(column, section))
                if styled and column.percent and finite_or_none(column.value(section) if section else None):
                    text.stylize("red")
                cells.append(text)
            table.add_row(Text(column.header), *cells)
        console.print(table)
    else:
        say("no sampler runs")
    for line in statements(report):
        say(line)

    gates = report.get("gates") or []
    if gates:
        gt = _table("Gates (--fail-on: a gate fails when its condition holds)", styled)
        for header, justify in (("gate", "left"), ("value", "right"), ("result", "left"), ("reason", "left")):
            gt.add_column(header, justify=justify, overflow="fold")  # long gate names wrap, never cut
        for g in gates:
            gt.add_row(Text(str(g.get("expr", ""))), fmt(g.get("value"), 6), _word(bool(g.get("passed")), styled),
                       Text(str(g.get("reason", ""))))
        console.print(gt)
    line = Text("status: ")
    line.append_text(_word(report.get("status", "pass") == "pass", styled))
    failed = sum(1 for g in gates if not g.get("passed"))
    line.append(f" ({len(gates) - failed}/{len(gates)} gates passed)" if gates else " (no gates)")
    console.print(line)
