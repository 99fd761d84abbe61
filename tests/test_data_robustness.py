"""Data loading under hostile input: byte order, a lone (H, W, C) image, decompression bombs, quiet cache notes."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from memaudit.data import array_to_dataset, load_dataset
from memaudit.errors import UserError

from tests.cli_helpers import run_cli


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def one_error_line(err: str) -> str:
    """The single stderr line of a refused command (asserting there is exactly one, and no internal error)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], err
    return lines[0]


# --- byte order: a non-native array reads exactly as its native copy ---

RNG = np.random.default_rng(5)
# (native dtype, values, how they must be read, their expected [-1, 1] values computed here in float64)
BYTE_ORDER_CASES = [
    ("u2", RNG.integers(0, 256, (4, 6, 6)), "uint16 [0, 65535]", lambda v: v / 65535 * 2 - 1),
    ("u2", np.r_[0, 65535, RNG.integers(0, 65536, 142)].reshape(4, 6, 6), "uint16 [0, 65535]",
     lambda v: v / 65535 * 2 - 1),
    ("i2", np.r_[0, 255, RNG.integers(0, 256, 142)].reshape(4, 6, 6), "int16 [0, 255]", lambda v: v / 255 * 2 - 1),
    ("u4", np.r_[0, 255, RNG.integers(0, 256, 142)].reshape(4, 6, 6), "uint32 [0, 255]", lambda v: v / 255 * 2 - 1),
    ("f4", RNG.random((4, 6, 6, 3)), "float32 [0, 1]", lambda v: v * 2 - 1),
    ("f8", RNG.random((4, 3, 6, 6)) * 2 - 1, "float64 [-1, 1]", lambda v: v),
    ("f4", np.r_[0, 255, RNG.random(142) * 255].reshape(4, 6, 6), "float32 [0, 255]", lambda v: v / 255 * 2 - 1),
]


def as_nchw(values: np.ndarray) -> np.ndarray:
    """The test's own layout reading: (N, H, W) -> (N, 1, H, W), (N, H, W, 3) -> (N, 3, H, W), NCHW as is."""
    if values.ndim == 3:
        return values[:, None]
    return values.transpose(0, 3, 1, 2) if values.shape[-1] == 3 else values


@pytest.mark.parametrize("code, values, reading, expected", BYTE_ORDER_CASES)
def test_a_non_native_byte_order_array_reads_exactly_as_its_native_copy(tmp_path, code, values, reading,
                                                                         expected):
    native = values.astype(np.dtype("=" + code))
    swapped = native.astype(native.dtype.newbyteorder("S"))
    assert not swapped.dtype.isnative and np.array_equal(swapped, native)
    np.save(tmp_path / "native.npy", native)
    np.save(tmp_path / "swapped.npy", swapped)
    np.savez(tmp_path / "swapped.npz", images=swapped)
    base = load_dataset(tmp_path / "native.npy")
    assert base.value_range == reading
    np.testing.assert_allclose(base.images.numpy(), expected(as_nchw(values.astype(np.float64))), atol=2e-6)
    for other in (load_dataset(tmp_path / "swapped.npy"), load_dataset(tmp_path / "swapped.npz"),
                  array_to_dataset(swapped)):
        assert other.value_range == base.value_range
        assert torch.equal(other.images, base.images)


def test_a_big_endian_array_with_a_value_range_reads_as_its_native_copy():
    native = np.r_[0, 1000, RNG.integers(0, 1001, 46)].reshape(3, 4, 4).astype("=u2")
    swapped = native.astype(native.dtype.newbyteorder("S"))
    base, other = array_to_dataset(native, value_range=(0, 1000)), array_to_dataset(swapped, value_range=(0, 1000))
    assert base.value_range == other.value_range == "uint16 [0, 1000] (--value-range)"
    np.testing.assert_allclose(base.images.numpy(), native[:, None] / 1000 * 2 - 1, atol=1e-6)
    assert torch.equal(other.images, base.images)


# --- a lone (H, W, C) image saved without its image axis ---

@pytest.mark.parametrize("shape, fix, apply", [((32, 32, 3), "a[None]", lambda a: a[None]),
                                              ((16, 20, 4), "a[None, ..., :3]", lambda a: a[None, ..., :3])])
def test_one_hwc_image_without_its_image_axis_is_refused_with_the_fix(tmp_path, capsys, shape, fix, apply):
    a = RNG.integers(0, 256, shape).astype(np.uint8)
    np.save(tmp_path / "one.npy", a)
    with pytest.raises(UserError) as err:
        load_dataset(tmp_path / "one.npy")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'one.npy'}: shape {shape} looks like one (H, W, C) image")
    assert fix in message and "\n" not in message
    fixed = array_to_dataset(apply(a))  # the advice works: one image, its pixels as they are
    np.testing.assert_allclose(fixed.images.numpy(), a[None, ..., :3].transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
    code, _, stderr = run_cli(capsys, "scan", "empirical", tmp_path / "one.npy", "--dry-run", "--quiet")
    assert code == 2 and "looks like one (H, W, C) image" in one_error_line(stderr)


@pytest.mark.parametrize("shape", [(3, 4, 4), (5, 3, 3), (6, 8, 8), (2, 5, 7)])
def test_grayscale_sets_of_square_or_wider_images_still_read_as_n_h_w(shape):
    a = RNG.integers(0, 256, shape).astype(np.uint8)
    images = array_to_dataset(a).images
    assert images.shape == (shape[0], 1, shape[1], shape[2])
    np.testing.assert_allclose(images.numpy(), a[:, None] / 127.5 - 1, atol=1e-6)


# --- images over Pillow's decompression-bomb limit ---

@pytest.fixture
def bomb_limit(monkeypatch):
    """Pillow's decompression-bomb limit lowered to 100 pixels: it warns above 100 and refuses above 200."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    return 100


@pytest.mark.parametrize("height, width", [(11, 10), (21, 10)])  # Pillow warns at 110 pixels, refuses at 210
@pytest.mark.parametrize("workers", [1, 4])
def test_an_image_over_pillows_bomb_limit_is_a_one_line_error(tmp_path, monkeypatch, bomb_limit, height, width,
                                                               workers):
    import memaudit.data as data

    for i in range(12):
        write_png(tmp_path / f"{i:02d}.png", np.full((10, 10), i, np.uint8))  # 100 pixels: at the limit, allowed
    write_png(tmp_path / "05.png", np.zeros((height, width), np.uint8))
    monkeypatch.setattr(data, "DECODE_WORKERS", workers)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UserError) as err:
            data.load_dataset(tmp_path, cache_dir="off")
    message = str(err.value)
    assert message.startswith(f"cannot read image {tmp_path / '05.png'}: it has {height * width} pixels, over "
                              f"Pillow's decompression-bomb limit of {bomb_limit} pixels")
    assert "\n" not in message and not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters  # the loader leaves the process's warning filters as they were


def test_images_at_the_bomb_limit_load_unchanged(tmp_path, bomb_limit):
    a = RNG.integers(0, 256, (10, 10)).astype(np.uint8)  # exactly 100 pixels
    write_png(tmp_path / "a.png", a)
    np.testing.assert_allclose(load_dataset(tmp_path, cache_dir="off").images[0, 0].numpy(), a / 127.5 - 1,
                               atol=1e-6)


def test_the_cli_refuses_a_bomb_sized_image_in_one_line(tmp_path, capsys, bomb_limit):
    write_png(tmp_path / "d" / "a.png", np.zeros((10, 10), np.uint8))
    write_png(tmp_path / "d" / "b.png", np.zeros((30, 20), np.uint8))
    code, _, stderr = run_cli(capsys, "scan", "empirical", tmp_path / "d", "--dry-run", "--quiet",
                              "--cache-dir", "off")
    line = one_error_line(stderr)
    assert code == 2 and "b.png: it has 600 pixels" in line and "decompression-bomb limit of 100" in line


# --- cache notes without a note callback (--quiet) ---

def rgb_folder(root, count=6):
    rng = np.random.default_rng(11)
    for i in range(count):
        write_png(root / f"{i:02d}.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return root


def test_cache_notes_without_a_callback_are_plain_stderr_lines(tmp_path, capsys):
    folder = rgb_folder(tmp_path / "d")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_dataset(folder, cache_dir=blocker / "cache")
    assert not seen
    err = capsys.readouterr().err
    assert err.startswith("warning: image cache not written (") and err.endswith(
        f"{folder} will be decoded again next time\n") and err.count("\n") == 1


def test_a_damaged_cache_entry_without_a_callback_is_one_plain_note(tmp_path, capsys, image_cache):
    folder = rgb_folder(tmp_path / "d")
    load_dataset(folder)
    [npy] = image_cache.glob("*.npy")
    npy.write_bytes(b"garbage")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_dataset(folder)
    assert not seen
    err = capsys.readouterr().err
    assert err.startswith(f"note: ignoring the image cache entry {npy.with_suffix('')}") and err.count("\n") == 1


def test_quiet_cli_prints_cache_notes_as_plain_lines(tmp_path, capsys):
    folder = rgb_folder(tmp_path / "d")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "scan", "empirical", folder, "--dry-run", "--quiet",
                           "--cache-dir", blocker / "cache")
    assert code == 0
    assert [line for line in err.splitlines() if "image cache" in line] == [
        f"warning: image cache not written (cannot write {blocker / 'cache'}: Not a directory); {folder} will be "
        "decoded again next time"]
    assert "UserWarning" not in err and "data.py" not in err
