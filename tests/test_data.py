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
    """An object array (.npy, memory-mapped, or inside a .npz) is refused in words, not numpy's own text."""
    objects = np.array([{"a": 1}], dtype=object)
    np.save(tmp_path / "o.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "o.npz", images=objects)
    for name in ("o.npy", "o.npz"):
        with pytest.raises(UserError) as err:
            load_images(tmp_path / name)
        assert str(err.value) == (f"cannot read array file {tmp_path / name}: it holds Python objects (an object "
                                  "array), not numbers")


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
    parallel = data.load_dataset(folder, cache_dir="off", **options)
    same_dataset(parallel, serial_load(monkeypatch, folder, cache_dir="off", **options))
    assert parallel.class_names == ["cat", "dog"] and len(parallel.labels) == 24


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_parallel_same_size_folder_is_byte_identical(tmp_path, monkeypatch, channels):
    import memaudit.data as data

    rng = np.random.default_rng(3)
    for i in range(40):  # 8-bit, one size: held as uint8 bytes with a tiny float budget
        write_png(tmp_path / f"{39 - i:02d}.png", rng.integers(0, 256, (6, 6, 3) if i % 3 else (6, 6), np.uint8))
    monkeypatch.setattr(data, "DECODE_WORKERS", 4)
    off = dict(channels=channels, cache_dir="off")
    same_dataset(data.load_dataset(tmp_path, **off), serial_load(monkeypatch, tmp_path, **off))
    monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", "1")
    small = data.load_dataset(tmp_path, limit=30, **off)
    same_dataset(small, serial_load(monkeypatch, tmp_path, limit=30, **off))
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


# --- the content-hash image cache (issue 12) ---

def rgb_folder(root, count=10, labelled=True):
    rng = np.random.default_rng(11)
    for i in range(count):
        sub = ("b" if i % 3 else "a") if labelled else ""
        write_png(root / sub / f"{i:02d}.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return root


def no_decoding(monkeypatch):
    """Make any image decode fail: a load that succeeds after this came from the cache."""
    import memaudit.data as data

    def refuse(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(data, "_open_image", refuse)


def entries(cache):
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("options", [{}, dict(channels=1), dict(resize=4), dict(limit=7)])
def test_second_load_is_a_cache_hit_with_an_identical_dataset(tmp_path, monkeypatch, image_cache, options):
    import memaudit.data as data

    folder = rgb_folder(tmp_path / "d")
    first = data.load_dataset(folder, **options)
    assert len(entries(image_cache)) == 2 and stat_mode(image_cache) == 0o700
    no_decoding(monkeypatch)
    again = data.load_dataset(folder, **options)
    same_dataset(again, first)
    assert again.class_names == ["a", "b"] and again.labels.tolist() == first.labels.tolist()


def stat_mode(path):
    import stat

    return stat.S_IMODE(path.stat().st_mode)


def test_cache_hit_equals_an_uncached_serial_load(tmp_path, monkeypatch):
    folder = mixed_folder(tmp_path / "mixed")
    reference = serial_load(monkeypatch, folder, resize=5, cache_dir="off")
    from memaudit.data import load_dataset

    load_dataset(folder, resize=5)
    no_decoding(monkeypatch)
    same_dataset(load_dataset(folder, resize=5), reference)


def test_large_folder_is_held_as_memory_mapped_bytes_from_the_cache(tmp_path, monkeypatch):
    from memaudit.data import load_dataset

    folder = rgb_folder(tmp_path / "d", labelled=False)
    floats = load_dataset(folder, cache_dir="off").images
    monkeypatch.setenv("MEMAUDIT_FLOAT_BUDGET", "1")
    fresh = load_dataset(folder)
    no_decoding(monkeypatch)
    hit = load_dataset(folder)
    for dataset in (fresh, hit):
        assert dataset.store.is_bytes and dataset.value_range == "8-bit images [0, 255]"
        assert dataset.images.numpy().tobytes() == floats.numpy().tobytes()


@pytest.mark.parametrize("change", ["bytes", "rename", "resize", "add", "remove"])
def test_any_change_to_the_files_or_options_is_a_miss(tmp_path, monkeypatch, image_cache, change):
    from memaudit.data import load_dataset

    folder = rgb_folder(tmp_path / "d")
    load_dataset(folder)
    target = folder / "b" / "04.png"
    resize = None
    if change == "bytes":  # the same size, one pixel different
        img = np.asarray(Image.open(target)).copy()
        img[0, 0, 0] ^= 1
        before = target.stat().st_size
        Image.fromarray(img).save(target)
        assert target.stat().st_size == before  # (the file's size alone cannot tell the change)
    elif change == "rename":
        target.rename(folder / "b" / "04x.png")
    elif change == "resize":
        resize = 3
    elif change == "add":
        write_png(folder / "a" / "99.png", np.zeros((6, 6, 3), np.uint8))
    else:
        target.unlink()
    expected = load_dataset(folder, resize=resize, cache_dir="off")
    decoded = []
    import memaudit.data as data

    real = data._open_image
    monkeypatch.setattr(data, "_open_image", lambda p: decoded.append(p) or real(p))
    same_dataset(load_dataset(folder, resize=resize), expected)
    assert decoded and len(entries(image_cache)) == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "sidecar", "no-sidecar", "pickle", "shape"])
def test_a_damaged_cache_entry_is_ignored_and_rewritten(tmp_path, monkeypatch, image_cache, damage):
    import json

    from memaudit.data import load_dataset

    folder = rgb_folder(tmp_path / "d")
    expected = load_dataset(folder)
    [npy] = image_cache.glob("*.npy")
    meta = npy.with_suffix(".json")
    raw = npy.read_bytes()
    if damage == "truncate":
        npy.write_bytes(raw[:len(raw) // 2])
    elif damage == "garbage":
        npy.write_bytes(b"garbage")
    elif damage == "flip":  # same size, one pixel changed: caught by the recorded sha256
        npy.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    elif damage == "sidecar":
        meta.write_text("{not json")
    elif damage == "no-sidecar":  # an interrupted write: the .npy without its sidecar is never used
        meta.unlink()
    elif damage == "pickle":
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        record = json.loads(meta.read_text())
        np.save(npy, np.zeros([record["shape"][0] - 1] + record["shape"][1:], np.uint8))
    notes = []
    same_dataset(load_dataset(folder, note=notes.append), expected)
    assert (not notes) if damage == "no-sidecar" else ("ignoring the image cache entry" in notes[0])
    no_decoding(monkeypatch)
    same_dataset(load_dataset(folder), expected)  # rewritten: a hit again


def test_an_unwritable_cache_folder_costs_the_cache_not_the_load(tmp_path):
    from memaudit.data import load_dataset

    folder = rgb_folder(tmp_path / "d")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    notes = []
    dataset = load_dataset(folder, cache_dir=blocker / "cache", note=notes.append)
    same_dataset(dataset, load_dataset(folder, cache_dir="off"))
    assert len(notes) == 1 and notes[0].startswith("warning: image cache not written")


def test_cache_folder_settings(tmp_path, monkeypatch):
    from memaudit.imagecache import cache_dir

    assert cache_dir(tmp_path / "x") == tmp_path / "x" and cache_dir("off") is None
    assert cache_dir() is not None  # the test's own folder (conftest)
    monkeypatch.setenv("MEMAUDIT_IMAGE_CACHE", "off")
    assert cache_dir() is None
    monkeypatch.delenv("MEMAUDIT_IMAGE_CACHE")
    monkeypatch.setenv("MEMAUDIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" / "images"
    monkeypatch.setenv("MEMAUDIT_CACHE", "OFF")
    assert cache_dir() is None
    monkeypatch.delenv("MEMAUDIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "memaudit" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "memaudit" / "images"


def test_cache_off_writes_nothing(tmp_path, monkeypatch, image_cache):
    from memaudit.data import load_dataset

    monkeypatch.setenv("MEMAUDIT_IMAGE_CACHE", "off")
    load_dataset(rgb_folder(tmp_path / "d"))
    assert entries(image_cache) == []


def test_arrays_are_never_cached(tmp_path, image_cache):
    from memaudit.data import load_dataset

    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4), np.uint8))
    load_dataset(tmp_path / "a.npy")
    assert entries(image_cache) == []


def test_an_interrupted_cache_write_leaves_no_entry(tmp_path, monkeypatch, image_cache):
    import memaudit.imagecache as imagecache
    from memaudit.data import load_dataset

    folder = rgb_folder(tmp_path / "d")
    real_save = np.save

    def interrupted(fh, array, allow_pickle):
        real_save(fh, array[:1], allow_pickle=allow_pickle)  # half written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(imagecache.np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(folder)
    assert list(image_cache.iterdir()) == []  # not even the temporary file
    monkeypatch.setattr(imagecache.np, "save", real_save)
    same_dataset(load_dataset(folder), load_dataset(folder, cache_dir="off"))


def test_cli_shows_a_load_bar_and_takes_cache_dir(tmp_path, monkeypatch, image_cache):
    import memaudit.progress as progress
    from memaudit.cli.app import main

    bars = []
    monkeypatch.setattr(progress, "_interactive", lambda: True)  # (stderr is captured: no terminal)
    real_task = progress.ProgressTracker.task
    monkeypatch.setattr(progress.ProgressTracker, "task",
                        lambda self, name, total: bars.append((name, total, self.progress.live.transient))
                        or real_task(self, name, total))
    folder = rgb_folder(tmp_path / "d", labelled=False)
    run = ["train", str(folder), "--out", str(tmp_path / "m"), "--steps", "1", "--width", "4", "--levels", "1"]
    with pytest.raises(SystemExit) as code:
        main(run + ["--cache-dir", str(tmp_path / "mine")])
    assert code.value.code == 0 and ("load DATA", 10, True) in bars
    assert len(entries(tmp_path / "mine")) == 2 and entries(image_cache) == []
    bars.clear()
    with pytest.raises(SystemExit):
        main(run + ["--cache-dir", "off", "--quiet"])
    assert "load DATA" not in [name for name, _, _ in bars] and entries(image_cache) == []
