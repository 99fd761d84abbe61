"""Scan reports: the versioned JSON schema, terminal summary, HTML/Markdown with plots and images, JUnit XML."""

from memaudit.report.html import write_html
from memaudit.report.images import image_grid, pairs_grid, save_png
from memaudit.report.json_report import dumps_report, load_report, write_json
from memaudit.report.junit import write_junit
from memaudit.report.schema import (
    SCHEMA,
    attach_gates,
    build_report,
    curve_section,
    entropy_section,
    nn_ratio_section,
    summarize,
    validate_report,
)
from memaudit.report.terminal import print_summary

__all__ = [
    "SCHEMA",
    "attach_gates",
    "build_report",
    "curve_section",
    "dumps_report",
    "entropy_section",
    "image_grid",
    "load_report",
    "nn_ratio_section",
    "pairs_grid",
    "print_summary",
    "save_png",
    "summarize",
    "validate_report",
    "write_html",
    "write_json",
    "write_junit",
]
