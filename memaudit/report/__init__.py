"""Scan reports: the versioned JSON schema, terminal summary, HTML/Markdown with plots and images, JUnit XML."""

from memaudit.report.html import write_html
from memaudit.report.json_report import dumps_report, write_json
from memaudit.report.junit import write_junit
from memaudit.report.schema import SCHEMA, attach_gates, build_report, summarize, validate_report
from memaudit.report.terminal import print_summary

__all__ = ["SCHEMA", "attach_gates", "build_report", "dumps_report", "print_summary", "summarize",
           "validate_report", "write_html", "write_json", "write_junit"]
