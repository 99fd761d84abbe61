"""The verdict counts mirrored copies once --match-flips is asked for (a new-user trial found the headline said
"Copied: 0%" for a model emitting mirror images of its training set)."""

import re
from pathlib import Path

import numpy as np

from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_a_model_copying_mirror_images_reads_high_with_match_flips(tmp_path, capsys):
    with np.load(ROOT / "examples" / "digits" / "digits32.npz") as npz:
        mirrored = npz["images"][..., ::-1].copy()  # the training set the model's copies are mirror images of
    data = tmp_path / "mirrored.npz"
    np.savez(data, images=mirrored)
    common = [str(ROOT / "examples" / "models" / "digits32"), str(data), "--samples", "24", "--sampler", "heun",
              "--skip", "entropy", "--skip", "cosine", "--skip", "jacobian", "--skip", "fid", "--quiet"]
    code, out, _ = run_cli(capsys, "scan", *common, "--html", str(tmp_path / "plain"))
    assert code == 0 and "Copied: 0%" in out
    code, out, _ = run_cli(capsys, "scan", *common, "--match-flips", "--html", str(tmp_path / "flips"))
    # the same samples against the unmirrored training set, with no transforms: the copies it counts are the
    # mirror images' copies, so the flip-aware fraction on the mirrored set must read the same
    original = [str(ROOT / "examples" / "models" / "digits32"), str(ROOT / "examples" / "digits" / "digits32.npz"),
                *common[2:]]
    code_o, out_o, _ = run_cli(capsys, "scan", *original)
    copied = re.search(r"Copied: ([\d.]+%)", out_o).group(1)
    assert code == 0 == code_o and float(copied[:-1]) >= 90
    assert f"Up to flips/shifts (--match-flips/--match-shifts): {copied}" in out
    assert "Memorization: high" in (tmp_path / "flips" / "index.html").read_text()  # upper-cased by CSS
    assert "Memorization: high" not in (tmp_path / "plain" / "index.html").read_text()
