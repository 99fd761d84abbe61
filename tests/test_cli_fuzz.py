"""Issue 13: the CLI fuzzed with hypothesis over model specs, data arrays and option values.

Whatever comes in, `memaudit scan` answers with exit 0 (gates passed), 1 (a gate failed) or 2 (bad input,
one `error:` line), never a traceback and never the internal-error code 3 (docs/reliability.md).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "digits32")
COUNTER = itertools.count()

DTYPES = [np.uint8, np.uint16, np.int64, np.float32, np.float64, np.bool_, np.complex64]
SPECS = st.one_of(
    st.sampled_from([MODEL, "empirical", "empirical:k=3", "empirical:T=2,h=0.5", "empirical:chunk=1"]),
    st.sampled_from(["nope/model", "empirical:", "empirical:T=", "empirical:k=0", "empirical:q=1"]),
    st.builds(lambda t: f"empirical:T={t}", st.floats(allow_nan=True, allow_infinity=True)),
    st.text(min_size=1, max_size=12),
)


@st.composite
def valid_arrays(draw):
    """Arrays the scan should accept: 2-6 images of 8x8, in any supported layout, dtype and value range."""
    n = draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    layout = draw(st.sampled_from([(n, 8, 8), (n, 8, 8, 1), (n, 1, 8, 8), (n, 8, 8, 3)]))
    kind = draw(st.sampled_from(["uint8", "unit", "signed", "dup"]))
    if kind == "uint8":
        values = rng.integers(0, 256, layout).astype(np.uint8)
    elif kind == "unit":
        values = rng.random(layout).astype(np.float32)
    elif kind == "signed":
        values = rng.uniform(-1, 1, layout)
    else:
        values = np.repeat(rng.integers(0, 256, (1, *layout[1:])), n, axis=0).astype(np.uint8)
        values[-1] = 255 - values[-1]
    return values, draw(st.sampled_from([".npy", ".npz"]))


@st.composite
def wild_arrays(draw):
    n = draw(st.integers(0, 5))
    h, w = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    c = draw(st.sampled_from([None, 1, 2, 3, 4]))
    shape = (n, h, w) if c is None else draw(st.sampled_from([(n, h, w, c), (n, c, h, w)]))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["unit", "byte", "wide", "signed", "special"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = {"unit": rng.random(shape), "byte": rng.integers(0, 256, shape), "wide": rng.normal(0, 100, shape),
              "signed": rng.uniform(-1, 1, shape), "special": rng.choice([0.0, np.nan, np.inf, -1.0, 300.0], shape)}[kind]
    with np.errstate(invalid="ignore", over="ignore"):
        return values.astype(dtype), draw(st.sampled_from([".npy", ".npz"]))


arrays = lambda: st.one_of(valid_arrays(), wild_arrays())  # noqa: E731

VALID_OPTIONS = {
    "--samples": st.integers(1, 4).map(str), "--sampler": st.sampled_from(["heun", "sde", "ddpm", "edm-sde", "euler"]),
    "--fail-on": st.sampled_from(["memorized_fraction>0.5", "fid<1", "collapse_sigma>1e9", "min_nn_ratio<0.2"]),
    "--skip": st.sampled_from(["entropy", "cosine", "fid"]), "--seed": st.integers(0, 2**63 - 1).map(str),
    "--threshold": st.floats(0.01, 1).map(str), "--dup-tol": st.floats(0, 0.9).map(str),
    "--topk": st.integers(1, 40).map(str), "--batch-size": st.integers(1, 3).map(str),
}
OPTION_VALUES = {
    "--samples": st.integers(-1, 4).map(str), "--steps": st.integers(-1, 3).map(str),
    "--batch-size": st.integers(-1, 3).map(str), "--threshold": st.floats(-1, 2).map(str),
    "--topk": st.integers(-1, 5).map(str), "--seed": st.sampled_from(["0", "-1", str(2**63), "x", "7"]),
    "--sampler": st.sampled_from(["heun", "sde", "ddpm", "edm-sde", "euler", "magic", ""]),
    "--fail-on": st.sampled_from(["memorized_fraction>0.5", "fid<1", "x>>1", "min_nn_ratio<=nan",
                                  "collapse_sigma>1e9", "memorized_fraction_heun>=0"]),
    "--resize": st.integers(-1, 9).map(str), "--channels": st.integers(0, 4).map(str),
    "--dup-tol": st.floats(-1, 2).map(str), "--sigma-min": st.floats(-1, 100).map(str),
    "--sigma-max": st.floats(-1, 200).map(str), "--fid": st.sampled_from(["off", "proxy", "auto", "bogus"]),
    "--value-range": st.sampled_from(["0,255", "0,1", "1,0", "a,b", "0,16"]),
    "--skip": st.sampled_from(["entropy", "cosine", "jacobian", "fid", "nope"]),
}


@st.composite
def options(draw):
    table = draw(st.sampled_from([VALID_OPTIONS, OPTION_VALUES]))
    chosen = draw(st.lists(st.sampled_from(sorted(table)), max_size=4, unique=True))
    out = []
    for name in chosen:
        out += [name, draw(table[name])]
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=int(os.environ.get("MEMAUDIT_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=SPECS, data=arrays(), opts=options())
def test_scan_never_crashes(capsys, monkeypatch, folder, spec, data, opts):
    array, suffix = data
    path = folder / f"d{next(COUNTER)}{suffix}"
    if suffix == ".npy":
        np.save(path, array)
    else:
        np.savez(path, images=array)
    monkeypatch.setenv("MEMAUDIT_CACHE", str(folder / "cache"))
    fast = ["--samples", "2", "--steps", "2", "--skip", "jacobian", "--quiet"]
    code, out, err = run_cli(capsys, "scan", spec, path, *fast, *opts, "--fid", "proxy")
    assert code in (0, 1, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
