import json

import numpy as np
import pytest
import torch

from memaudit.report.json_report import dumps_report, to_jsonable, write_json
from memaudit.report.schema import validate_report

try:
    from report_fixture import make_report
except ImportError:  # tests/ imported as a package
    from tests.report_fixture import make_report


def test_round_trip_and_byte_identical(tmp_path):
    report = make_report(seed=1, gates=["memorized_fraction>0.01"])
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    write_json(report, a)
    write_json(make_report(seed=1, gates=["memorized_fraction>0.01"]), b)  # rebuilt from the same seed
    assert a.read_bytes() == b.read_bytes()
    loaded = json.loads(a.read_text())
    validate_report(loaded)
    assert loaded["status"] == "fail"
    assert loaded["runs"].keys() == report["runs"].keys()
    assert len(loaded["runs"]["heun"]["nn_ratio"]["samples"]) == 32
    write_json(loaded, c)  # re-writing a loaded report changes nothing
    assert c.read_bytes() == a.read_bytes()
    write_json(make_report(seed=2), b)
    assert a.read_bytes() != b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json"]  # no temp leftovers


def test_format_sorted_indented():
    text = dumps_report({"b": 1, "a": {"d": 2.0, "c": [1, 2]}})
    assert text == '{\n  "a": {\n    "c": [\n      1,\n      2\n    ],\n    "d": 2.0\n  },\n  "b": 1\n}\n'


def test_rounding_and_non_finite():
    out = json.loads(dumps_report({
        "x": 0.123456789, "big": 123456789.0, "tiny": 1.23456789e-9, "nan": float("nan"), "inf": float("-inf"),
        "np32": np.float32(0.1), "npint": np.int64(7), "arr": np.array([1.5, np.nan]), "t": torch.tensor([0.25, 2.0]),
        "tuple": (1, 2), "flag": True, "int": 12345678901,
    }))
    assert out["x"] == 0.123457
    assert out["big"] == 123457000.0
    assert out["tiny"] == 1.23457e-9
    assert out["nan"] is None and out["inf"] is None
    assert out["np32"] == 0.1
    assert out["npint"] == 7 and isinstance(out["npint"], int)
    assert out["arr"] == [1.5, None]
    assert out["t"] == [0.25, 2.0]
    assert out["tuple"] == [1, 2] and out["flag"] is True and out["int"] == 12345678901


def test_rounding_is_idempotent():
    for v in (1 / 3, 2 / 3 * 1e-7, 123.4565, 9.999995, -0.00012345678):
        once = to_jsonable(v)
        assert to_jsonable(once) == once


def test_unserialisable_raises():
    with pytest.raises(TypeError):
        dumps_report({"x": object()})


def test_an_invalid_report_is_never_written(tmp_path):
    report = make_report()
    del report["settings"]["seed"]
    with pytest.raises(ValueError, match="settings.seed"):
        write_json(report, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
