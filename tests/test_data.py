"""Data loading: folders, arrays, layouts, value ranges and bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from digits import digits_dataset
from memaudit.data import array_to_images, load_images, to_uint8
from memaudit.errors import UserError


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_recursive_grayscale(tmp_path):
    a = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    write_png(tmp_path / "a.png", a)
    write_png(tmp_path / "sub" / "deeper" / "b.png", 255 - a)
    (tmp_path / "notes.txt").write_text("ignored")
    images = load_images(tmp_path)
    assert images.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(images[0, 0].numpy(), a / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(images[1, 0].numpy(), (255 - a) / 127.5 - 1, atol=1e-6)


def test_folder_rgb_and_jpeg_and_mixed_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    write_png(tmp_path / "c.png", rgb)
    Image.fromarray(rgb).save(tmp_path / "d.jpg", quality=95)
    write_png(tmp_path / "e.png", rgb[..., 0])  # grayscale among RGB -> converted to RGB
    images = load_images(tmp_path)
    assert images.shape == (3, 3, 6, 6)
    np.testing.assert_allclose(images[0].permute(1, 2, 0).numpy(), rgb / 127.5 - 1, atol=1e-6)
    assert load_images(tmp_path, channels=1).shape == (3, 1, 6, 6)


def test_mixed_sizes_need_resize(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "b.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(UserError, match="--resize"):
        load_images(tmp_path)
    assert load_images(tmp_path, resize=4).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("make", [
    lambda p: p.mkdir(),
    lambda p: (p.mkdir(), (p / "x.png").write_bytes(b"not a png")),
    lambda p: p.with_suffix(".txt").write_text("x"),
])
def test_bad_inputs(tmp_path, make):
    target = tmp_path / "data"
    make(target)
    if not target.exists():
        target = target.with_suffix(".txt")
    with pytest.raises(UserError):
        load_images(target)


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_images(tmp_path / "nope")


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_array_layouts(tmp_path, layout):
    base = np.random.default_rng(1).integers(0, 256, size=(5, 1, 7, 7), dtype=np.uint8)
    arr = {"nhw": base[:, 0], "nhwc": base.transpose(0, 2, 3, 1), "nchw": base}[layout]
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "b.npz", images=arr, labels=np.arange(5))
    for name in ("a.npy", "b.npz"):
        images = load_images(tmp_path / name)
        np.testing.assert_allclose(images.numpy(), base / 127.5 - 1, atol=1e-6)


def test_value_ranges():
    unit = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_allclose(array_to_images(unit).numpy().ravel(), unit.ravel() * 2 - 1, atol=1e-6)
    signed = unit * 2 - 1
    np.testing.assert_allclose(array_to_images(signed).numpy().ravel(), signed.ravel(), atol=1e-6)
    with pytest.raises(UserError):
        array_to_images(unit * 1000)
    with pytest.raises(UserError):
        array_to_images(np.full((1, 2, 2), np.nan, np.float32))


def test_npz_needs_named_array(tmp_path):
    np.savez(tmp_path / "c.npz", a=np.zeros((2, 4, 4)), b=np.zeros((2, 4, 4)))
    with pytest.raises(UserError, match="images"):
        load_images(tmp_path / "c.npz")


def test_pickled_object_arrays_are_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError):
        load_images(tmp_path / "o.npy")


def test_digits_are_real_and_round_trip():
    d = digits_dataset()
    assert d.shape == (1797, 8, 8) and d.dtype == np.uint8 and d.max() == 255
    images = array_to_images(d)
    assert np.array_equal(to_uint8(images)[..., 0], d)


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3]))))
def test_property_uint8_arrays_round_trip(arr):
    images = array_to_images(arr)
    assert images.shape == (arr.shape[0], arr.shape[3], arr.shape[1], arr.shape[2])
    assert images.min() >= -1 and images.max() <= 1
    assert np.array_equal(to_uint8(images), arr)


@settings(max_examples=60, deadline=None)
@given(arrays(st.sampled_from([np.float32, np.float64, np.int16, np.uint8]),
              st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)))
def test_property_any_array_loads_or_is_a_user_error(arr):
    try:
        images = array_to_images(arr)
    except UserError:
        return
    assert images.ndim == 4 and images.shape[1] in (1, 3)
    assert torch.isfinite(images).all() and images.abs().max() <= 1


def test_bundled_digits_are_scikit_learns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    expected = np.round(sklearn_datasets.load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    assert np.array_equal(digits_dataset(), expected)
    assert np.array_equal(load_images("examples/digits/digits32.npz").numpy(), array_to_images(expected[:32]).numpy())


def test_resize_is_the_same_for_folders_and_arrays(tmp_path):
    arr = np.random.default_rng(3).integers(0, 256, size=(3, 12, 12), dtype=np.uint8)
    for i, a in enumerate(arr):
        write_png(tmp_path / "imgs" / f"{i}.png", a)
    np.save(tmp_path / "a.npy", arr)
    from_folder = load_images(tmp_path / "imgs", resize=5)
    from_array = load_images(tmp_path / "a.npy", resize=5)
    assert from_folder.shape == (3, 1, 5, 5)
    torch.testing.assert_close(from_folder, from_array, rtol=0, atol=0)


# --- parallel folder decoding (issue 12) ---

def mixed_folder(root, count=24):
    """A folder of `count` images of mixed sizes and modes (L, RGB, RGBA, P, 16-bit I;16, JPEG) in class
    subfolders, with names whose sorted order differs from their creation order."""
    rng = np.random.default_rng(7)
    for i in range(count):
        h, w = 6 + i % 3, 5 + i % 4
        path = root / ("cat" if i % 2 else "dog") / f"{(i * 7) % count:03d}"
        kind = i % 6
        if kind == 0:
            write_png(path.with_suffix(".png"), rng.integers(0, 256, (h, w), dtype=np.uint8))
        elif kind == 1:
            write_png(path.with_suffix(".png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        elif kind == 2:
            write_png(path.with_suffix(".png"), rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
        elif kind == 3:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P").save(path.with_suffix(".png"))
        elif kind == 4:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(path.with_suffix(".png"))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path.with_suffix(".jpg"))
    return root


def serial_load(monkeypatch, *args, **kwargs):
    """The load with one decoding thread: the reference the parallel load must equal byte for byte."""
    import memaudit.data as data

    with monkeypatch.context() as mp:
        mp.setattr(data, "DECODE_WORKERS", 1)
        return data.load_dataset(*args, **kwargs)


def same_dataset(a, b):
    assert type(a.data) is type(b.data) and a.value_range == b.value_range
    assert a.images.dtype == b.images.dtype and a.images.shape == b.images.shape
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert (a.labels is None and b.labels is None) or torch.equal(a.labels, b.labels)
    assert a.class_names == b.class_names and a.labels_problem == b.labels_problem


@pytest.mark.parametrize("options", [dict(resize=5), dict(resize=4, channels=1), dict(resize=7, channels=3)])
def test_parallel_folder_load_is_byte_identical_to_serial(tmp_path, monkeypatch, options):
    import memaudit.data as data

    folder = mixed_folder(tmp_path / "mixed")
    monkeypatch.setattr(data, "DECODE_WORKERS", 4)
    parallel = data.load_dataset(folder, **options)
    same_dataset(parallel, serial_load(monkeypatch, folder, **options))
    assert parallel.class_names == ["cat", "dog"] and len(parallel.labels) == 24


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_parallel_same_size_folder_is_byte_identical(tmp_path, monkeypatch, channels):
    import memaudit.data as data

    rng = np.random.default_rng(3)
    for i in range(40):  # 8-bit, one size: held as uint8 bytes with a tiny float budget
        write_png(tmp_path / f"{39 - i:02d}.png", rng.integers(0, 256, (6, 6, 3) if i % 3 else (6, 6), np.uint8))
    monkeypatch.setattr(data, "DECODE_WORKERS", 4)
    same_dataset(data.load_dataset(tmp_path, channels=channels), serial_load(monkeypatch, tmp_path, channels=channels))
    monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", "1")
    small = data.load_dataset(tmp_path, channels=channels, limit=30)
    same_dataset(small, serial_load(monkeypatch, tmp_path, channels=channels, limit=30))
    assert len(small.images) == 30


def test_parallel_load_reports_progress_in_order(tmp_path, monkeypatch):
    import memaudit.data as data

    for i in range(30):
        write_png(tmp_path / f"{i:02d}.png", np.full((4, 4), i, np.uint8))
    monkeypatch.setattr(data, "DECODE_WORKERS", 4)
    calls = []
    data.load_dataset(tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls == sorted(calls) and calls[-1] == (30, 30) and {t for _, t in calls} == {30}


@pytest.mark.parametrize("workers", [1, 4])
def test_corrupt_image_in_a_parallel_load_is_a_one_line_error(tmp_path, monkeypatch, workers):
    import memaudit.data as data

    for i in range(12):
        write_png(tmp_path / f"{i:02d}.png", np.full((4, 4), i, np.uint8))
    (tmp_path / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "09.png").write_bytes(b"")  # a later bad file: the first in file order is the one reported
    monkeypatch.setattr(data, "DECODE_WORKERS", workers)
    with pytest.raises(UserError) as err:
        data.load_dataset(tmp_path)
    assert str(err.value).startswith(f"cannot read image {tmp_path / '05.png'}: ") and "\n" not in str(err.value)


def test_corrupt_image_in_a_folder_exits_2_with_one_line(tmp_path, capsys):
    from memaudit.cli.app import main

    for i in range(6):
        write_png(tmp_path / "data" / f"{i}.png", np.full((4, 4), i * 40, np.uint8))
    (tmp_path / "data" / "3.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as code:
        main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and err.startswith("error: cannot read image") and "3.png" in err
    assert len(err.splitlines()) == 1
