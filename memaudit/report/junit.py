"""JUnit XML for CI: testsuite "memaudit.scan", one testcase per gate (failure when the gate fails).

Without gates, one passing (informational) testcase per summary metric, its value in system-out.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import Any, Mapping

from memaudit.atomic import write_bytes_atomic
from memaudit.numbers import fmt

SUITE = "memaudit.scan"
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(value: Any) -> str:
    """str(value) without the characters XML 1.0 cannot carry."""
    return _XML_INVALID.sub("?", str(value))


def junit_tree(report: Mapping[str, Any]) -> ET.ElementTree:
    """The JUnit document as an ElementTree (<testsuites> holding one <testsuite name="memaudit.scan">)."""
    gates = list(report.get("gates") or [])
    summary = report.get("summary") or {}
    root = ET.Element("testsuites", name="memaudit")
    suite = ET.SubElement(root, "testsuite", name=SUITE)
    props = ET.SubElement(suite, "properties")
    model, data, settings = report.get("model", {}), report.get("data", {}), report.get("settings", {})
    for name, value in (("schema", report.get("schema")), ("memaudit_version", report.get("memaudit_version")),
                        ("model", model.get("spec")), ("data", data.get("path")), ("seed", settings.get("seed")),
                        ("status", report.get("status"))):
        if value is not None:
            ET.SubElement(props, "property", name=name, value=_xml_text(value))

    failures = 0
    if gates:
        for gate in gates:
            case = ET.SubElement(suite, "testcase", classname=f"{SUITE}.gates", name=_xml_text(gate.get("expr", "")),
                                 time="0")
            value = fmt(gate.get("value"), 6) if gate.get("value") is not None else "null"
            if not gate.get("passed"):
                failures += 1
                failure = ET.SubElement(case, "failure", type="GateFailed", message=_xml_text(
                    f"gate {gate.get('expr')} failed: {gate.get('metric')} = {value}, threshold "
                    f"{gate.get('op')} {fmt(gate.get('threshold'), 6)}"))
                failure.text = _xml_text(gate.get("reason", ""))
            else:
                ET.SubElement(case, "system-out").text = _xml_text(gate.get("reason", f"{gate.get('metric')} = {value}"))
    else:
        for metric, value in summary.items():
            case = ET.SubElement(suite, "testcase", classname=f"{SUITE}.summary", name=_xml_text(metric), time="0")
            text = f"{metric} = {fmt(value, 6)}" if value is not None else f"{metric} = null (not computed)"
            ET.SubElement(case, "system-out").text = _xml_text(text) + " (informational; no --fail-on gates were given)"
    tests = len(gates) if gates else len(summary)
    for el in (root, suite):
        el.set("tests", str(tests))
        el.set("failures", str(failures))
        el.set("errors", "0")
        el.set("skipped", "0")
        el.set("time", "0")
    return ET.ElementTree(root)


def junit_xml(report: Mapping[str, Any]) -> bytes:
    """The JUnit XML document as UTF-8 bytes with an XML declaration."""
    tree = junit_tree(report)
    ET.indent(tree, space="  ")
    return ET.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the JUnit XML atomically."""
    write_bytes_atomic(path, junit_xml(report))
