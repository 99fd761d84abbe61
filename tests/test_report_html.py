import re
import xml.etree.ElementTree as ET

import pytest

from memaudit.report.images import LABEL_HEIGHT
from PIL import Image

from memaudit.errors import UserError
from memaudit.report.html import svg_histogram, svg_line_plot, write_html

try:
    from report_fixture import NUM_SAMPLES, make_report, make_tensors
except ImportError:  # tests/ imported as a package
    from tests.report_fixture import NUM_SAMPLES, make_report, make_tensors


@pytest.fixture
def written(tmp_path):
    report = make_report(gates=["memorized_fraction>0.01", "fid_proxy>=100"])
    samples, train = make_tensors()
    folder = tmp_path / "html"
    index = write_html(report, folder, samples=samples, train=train)
    return report, folder, index


def _svgs(text):
    return re.findall(r"<svg.*?</svg>", text, flags=re.S)


def test_files_and_self_contained_html(written):
    report, folder, index = written
    assert index == folder / "index.html" and index.exists()
    assert sorted(p.name for p in folder.iterdir()) == [
        "index.html", "report.md", "samples_heun.png", "samples_sde.png", "worst_heun.png", "worst_sde.png"]
    text = index.read_text()
    svgs = _svgs(text)
    # 2 histograms + entropy + effective points + cosine + jacobian + step expansion
    assert len(svgs) == 7
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', text)
    assert sorted(srcs) == ["samples_heun.png", "samples_sde.png", "worst_heun.png", "worst_sde.png"]
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "memorized_fraction&gt;0.01" in text and "FAIL" in text and "PASS" in text
    assert f"{report['runs']['sde']['nn_ratio']['memorized_fraction']:.4g}" in text


def test_png_grid_sizes(written):
    report, folder, _ = written
    worst = len(report["runs"]["heun"]["nn_ratio"]["worst"])
    assert worst == 16
    with Image.open(folder / "worst_heun.png") as img:
        # 8x8 images upscaled 8x, 4 pairs (sample | nearest) per row, 2 px padding, under the column labels
        rows = -(-worst // 4)
        assert img.size == (8 * 64 + 9 * 2, rows * 64 + (rows + 1) * 2 + LABEL_HEIGHT)
    with Image.open(folder / "samples_sde.png") as img:
        cols = 6  # ceil(sqrt(32))
        rows = -(-NUM_SAMPLES // cols)
        assert img.size == (cols * 64 + (cols + 1) * 2, rows * 64 + (rows + 1) * 2)


def test_log_sigma_axis_and_threshold_line(written):
    _, _, index = written
    text = index.read_text()
    entropy = next(s for s in _svgs(text) if "Top-K entropy" in s)
    labels = re.findall(r">([^<>]+)</text>", entropy)
    for tick in ("0.01", "0.1", "1", "10"):
        assert tick in labels
    assert "sigma (log scale)" in labels
    hist = next(s for s in _svgs(text) if "NN ratio histogram (heun)" in s)
    assert "threshold 0.333" in hist and 'stroke="#d62728"' in hist


def test_markdown_report(written):
    report, folder, _ = written
    md = (folder / "report.md").read_text()
    assert "](worst_heun.png)" in md and "![samples](samples_sde.png)" in md
    assert "**Status: FAIL**" in md and "| memorized\\_fraction\\>0.01 |" in md
    assert f"`memorized_fraction_sde` | {report['summary']['memorized_fraction_sde']:.6g}" in md


def test_strings_are_escaped(tmp_path):
    report = make_report()
    report["model"]["spec"] = "<script>alert(1)</script>"
    report["fid"][1]["message"] = "a & b <i>"
    text = write_html(report, tmp_path / "h").read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "a &amp; b &lt;i&gt;" in text


def test_replaces_report_folder_but_refuses_foreign_one(tmp_path, written):
    report, folder, _ = written
    write_html(report, folder)  # no tensors this time: the old PNGs go away
    assert sorted(p.name for p in folder.iterdir()) == ["index.html", "report.md"]
    assert "<img" not in (folder / "index.html").read_text()
    scan_dir = tmp_path / "scan"
    scan_dir.mkdir()
    (scan_dir / "report.json").write_text("{}")
    with pytest.raises(UserError, match="report.json"):
        write_html(report, scan_dir)
    assert (scan_dir / "report.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_run_names_become_safe_file_names(tmp_path):
    report = make_report(samplers=("edm/sde",))
    samples, train = make_tensors(samplers=("edm/sde",))
    folder = tmp_path / "h"
    write_html(report, folder, samples=samples, train=train)
    assert (folder / "worst_edm_sde.png").exists()


def test_plot_helpers_handle_gaps_and_degenerate_ranges():
    svg = svg_line_plot("t", [{"label": "a", "x": [0.1, 1.0, 10.0, 0.0], "y": [1.0, None, 3.0, 2.0]}])
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.findall(f"{ns}polyline") == []  # the gap splits the line into single points
    assert len(root.findall(f"{ns}circle")) == 2  # sigma=0 is dropped on a log axis
    svg = svg_line_plot("t", [{"label": "a", "x": [1.0, 1.0], "y": [5.0, 5.0]}], logx=False)
    ET.fromstring(svg)
    svg = svg_histogram("h", [0.0, 0.5, 1.0], [0, 0], threshold=1 / 3)
    assert "<rect x=" in svg and "NaN" not in svg and "nan" not in svg
