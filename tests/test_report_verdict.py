"""The HTML report leads with the verdict (fraction copied with its interval, distinct images, calibration),
shows the attribution table and grid, keeps settings last, and renders in a real headless browser."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digits import digits_dataset
from memaudit.report.verdict import severity

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def html_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verdict")
    np.savez(tmp / "held.npz", images=digits_dataset()[1000:])

    from memaudit.cli.app import main

    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exc:
        mp.setenv("MEMAUDIT_CACHE", str(tmp / "cache"))
        main([str(a) for a in ("scan", ROOT / "examples/models/digits32", ROOT / "examples/digits/digits32.npz",
                               "--samples", "32", "--sampler", "heun", "--quiet", "--skip", "fid", "--skip",
                               "jacobian", "--skip", "cosine", "--holdout", tmp / "held.npz", "--html", tmp / "html",
                               "--json", tmp / "r.json")])
    assert exc.value.code == 0  # no gates: PASS, and the report must say what that means
    return tmp / "html", json.loads((tmp / "r.json").read_text())


def test_verdict_first_settings_last(html_report):
    folder, report = html_report
    text = (folder / "index.html").read_text()
    s = report["summary"]
    verdict, evidence, settings = text.index('class="verdict"'), text.index("Evidence per sampler"), text.index(
        "<h2>Settings</h2>")
    assert verdict < evidence < settings
    head = text[verdict:evidence]
    assert f"{100 * s['memorized_fraction']:.3g}%" in head and f"{100 * s['memorized_fraction_lower']:.3g}%" in head
    assert f"reproduced: {int(s['distinct_reproduced'])} of 32" in head and "Calibrated on 797" in head
    assert "speaks only of" in head and "(no gates)" in head
    assert severity(s) == "high" and "Memorization: high" in head
    assert "Reproduced training images" in text and 'src="attribution_heun.png"' in text
    first = report["runs"]["heun"]["attribution"]["images"][0]
    assert f"<td>{first['train_index']}</td>" in text[text.index("Reproduced training images"):]


def test_severity_follows_the_interval():
    assert severity({"memorized_fraction_lower": 0.02, "memorized_fraction_upper": 0.1}) == "high"
    assert severity({"memorized_fraction_lower": 0.0, "memorized_fraction_upper": 0.005}) == "low"
    assert severity({"memorized_fraction_lower": 0.0, "memorized_fraction_upper": 0.2}) == "unclear"
    assert severity({"memorized_fraction_lower": None, "memorized_fraction_upper": None}) == "unknown"


def test_severity_of_a_latent_model_is_the_worse_of_latent_and_decoded_space():
    latent_low = {"memorized_fraction_lower": 0.0, "memorized_fraction_upper": 0.005}
    assert severity({**latent_low, "decoded_memorized_fraction": 0.5, "decoded_memorized_fraction_lower": 0.3,
                     "decoded_memorized_fraction_upper": 0.7}) == "high"
    assert severity({**latent_low, "decoded_memorized_fraction": 0.0, "decoded_memorized_fraction_lower": None,
                     "decoded_memorized_fraction_upper": None}) == "unknown"  # not measured: no "low"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install -y chromium)")
def test_the_report_renders_in_headless_chromium(html_report, tmp_path):
    folder, _ = html_report
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2000", (folder / "index.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2000, 1200)
    band = image[40:300].reshape(-1, 3).astype(int)  # the verdict box: its red severity bar is drawn
    assert ((band[:, 0] > 180) & (band[:, 1] < 80) & (band[:, 2] < 80)).sum() > 500
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (folder / "index.html").as_uri()], check=True, timeout=120, capture_output=True, text=True)
    assert "Reproduced training images" in dom.stdout


def test_near_duplicate_clusters_get_a_grid(html_report, tmp_path):
    import torch

    from memaudit.report.html import write_html

    _, report = html_report
    report = json.loads(json.dumps(report))
    report["data"]["duplicates"].update({"num_clusters": 2, "num_images_in_clusters": 5,
                                         "clusters": [[0, 3], [1, 4, 7]]})
    train = torch.rand(8, 1, 8, 8) * 2 - 1
    index = write_html(report, tmp_path / "html", samples={}, train=train)
    text = index.read_text()
    assert 'src="duplicates_clusters.png"' in text and "Near-duplicate training images" in text
    grid = np.asarray(Image.open(tmp_path / "html" / "duplicates_clusters.png"))
    assert grid.shape[0] < grid.shape[1]  # 2 rows of 8
