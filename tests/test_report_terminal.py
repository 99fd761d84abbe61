import io

from rich.console import Console

from memaudit.metrics.entropy import section_collapse
from memaudit.report.terminal import print_summary

try:
    from report_fixture import make_report
except ImportError:  # tests/ imported as a package
    from tests.report_fixture import make_report


def _render(report, **kwargs):
    console = Console(record=True, width=120, file=io.StringIO(), **kwargs)
    print_summary(report, console)
    return console.export_text(), console.file.getvalue()


def test_summary_contains_runs_metrics_and_gates():
    report = make_report(gates=["memorized_fraction>0.01", "fid_proxy>=100", "fid<300"])
    text, raw = _render(report)
    for name in ("heun", "sde"):
        frac = report["runs"][name]["nn_ratio"]["memorized_fraction"]
        assert f"{frac:.4g}" in text
    ent = report["runs"]["heun"]["entropy"]
    assert f"{section_collapse(ent):.3g}" in text
    assert f"{report['summary']['min_nn_ratio']:.4g}" in text
    assert "score-cosine" in text and "jacobian" in text and f"FID proxy: {report['summary']['fid_proxy']:.5g}" in text
    assert "clean-fid not installed" in text
    lines = text.splitlines()
    gate_line = next(line for line in lines if "memorized_fraction>0.01" in line)
    assert "FAIL" in gate_line
    assert "PASS" in next(line for line in lines if "fid_proxy>=100" in line)
    assert "status: FAIL" in text and "(1/3 gates passed)" in text
    assert "\x1b[" not in raw  # plain text, no colour codes, when not a terminal
    assert "\u256d" not in raw and "+" in raw  # ASCII table borders


def test_passing_status_and_no_gates():
    text, _ = _render(make_report(gates=["memorized_fraction>0.99"]))
    assert "status: PASS" in text and "FAIL" not in text
    text, _ = _render(make_report(with_optional=False))
    assert "status: PASS (no gates)" in text and "jacobian" not in text


def test_terminal_output_is_coloured():
    _, raw = _render(make_report(gates=["memorized_fraction>0.01"]), force_terminal=True, color_system="standard")
    assert "\x1b[" in raw and "FAIL" in raw
