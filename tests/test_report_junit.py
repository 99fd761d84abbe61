import xml.etree.ElementTree as ET

from memaudit.report.junit import junit_xml, write_junit

try:
    from report_fixture import make_report
except ImportError:  # tests/ imported as a package
    from tests.report_fixture import make_report


def _suite(path):
    root = ET.parse(path).getroot()
    suites = root.findall("testsuite") if root.tag == "testsuites" else [root]
    assert [s.get("name") for s in suites] == ["memaudit.scan"]
    return suites[0]


def test_one_testcase_per_gate_and_failures_counted(tmp_path):
    report = make_report(gates=["memorized_fraction>0.01", "fid_proxy>=100", "final_entropy<10", "fid<300"])
    path = tmp_path / "junit.xml"
    write_junit(report, path)
    suite = _suite(path)
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [g["expr"] for g in report["gates"]]
    failed = [c for c in cases if c.find("failure") is not None]
    expected_failed = [g["expr"] for g in report["gates"] if not g["passed"]]
    assert [c.get("name") for c in failed] == expected_failed == ["memorized_fraction>0.01", "final_entropy<10", "fid<300"]
    assert suite.get("tests") == "4" and suite.get("failures") == str(len(expected_failed))
    message = failed[0].find("failure").get("message")
    assert f"{report['summary']['memorized_fraction']:.6g}" in message and "0.01" in message
    fid_message = failed[2].find("failure").get("message")
    assert "null" in fid_message and "unavailable" in failed[2].find("failure").text


def test_all_gates_pass():
    report = make_report(gates=["memorized_fraction>0.9"])
    suite = ET.fromstring(junit_xml(report)).find("testsuite")
    assert suite.get("failures") == "0" and suite.find("testcase/failure") is None


def test_no_gates_one_passing_case_per_metric(tmp_path):
    report = make_report()
    path = tmp_path / "junit.xml"
    write_junit(report, path)
    suite = _suite(path)
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == list(report["summary"])
    assert suite.get("failures") == "0" and all(c.find("failure") is None for c in cases)
    assert suite.get("tests") == str(len(report["summary"]))


def test_odd_characters_still_give_valid_xml():
    report = make_report(gates=["fid<1"])
    report["model"]["spec"] = "we<ird> & \"quoted\" \x01 \u00e9"
    report["gates"][0]["reason"] = "a\x0bb <&>"
    root = ET.fromstring(junit_xml(report))
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["model"].startswith("we<ird> & \"quoted\"")
