"""Regressions from the newcomer trial (docs/newcomer-trial.md): what a first-time user reads and installs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from digits import digits_dataset
from memaudit.gates import parse_gates
from memaudit.report.html import render_html, render_markdown
from memaudit.report.schema import attach_gates

from report_fixture import make_report

ROOT = Path(__file__).resolve().parents[1]


def test_a_pass_without_gates_says_so():
    """A memorizing model scanned without --fail-on is 'PASS': the reports must say that no gate was given."""
    report = make_report(0)
    assert not report["gates"]
    assert "(no gates)" in render_html(report, {}) and "(no gates)" in render_markdown(report, {})
    gated = attach_gates(make_report(0), parse_gates(["memorized_fraction>0.99"]))
    assert "(no gates)" not in render_html(gated, {}) and "(no gates)" not in render_markdown(gated, {})


def test_bundled_digits32_are_the_first_32_digits():
    digits = digits_dataset()
    assert digits.shape == (1797, 8, 8) and digits.dtype == np.uint8
    with np.load(ROOT / "examples" / "digits" / "digits32.npz") as npz:
        assert np.array_equal(digits_dataset(32), npz["images"])


def test_install_stays_small():
    """No heavy runtime dependency beyond torch: scikit-learn/scipy only for tests, no CUDA packages."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for d in deps}
    assert "torch" in names
    assert not names & {"scikit-learn", "scipy", "tensorflow", "jax", "diffusers", "clean-fid", "torchvision"}
    assert not [n for n in names if n.startswith(("nvidia", "cuda", "triton"))]


def test_readme_setup_paths_exist():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up (two commands)")[1].split("## ")[0]
    assert "memaudit scan examples/models/digits32 examples/digits/digits32.npz" in setup
    assert (ROOT / "examples" / "models" / "digits32" / "config.json").is_file()
    assert "../shared/" not in readme  # links must work in a clone
