import numpy as np
import pytest
import torch
from PIL import Image

from memaudit.report.images import auto_upscale, image_grid, pairs_grid, save_png


def test_grid_size_and_layout():
    images = torch.full((5, 1, 8, 8), -1.0)
    images[4] = 1.0
    grid = image_grid(images, nrow=3, padding=2, upscale=4, pad_value=128)
    assert grid.mode == "L"
    assert grid.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
    a = np.asarray(grid)
    assert (a[2:34, 2:34] == 0).all()  # first image, black, nearest-neighbour upscaled
    assert (a[36:68, 36:68] == 255).all()  # image 4: row 1, column 1
    assert (a[36:68, 70:102] == 128).all()  # empty slot stays padding
    assert (a[:2] == 128).all() and (a[:, 34:36] == 128).all()


def test_grid_nearest_neighbour_keeps_pixels_crisp():
    img = torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]])
    a = np.asarray(image_grid(img, nrow=1, padding=0, upscale=3))
    assert a.shape == (6, 6)
    assert (a[:3, :3] == 0).all() and (a[:3, 3:] == 255).all() and (a[3:, :3] == 255).all()


def test_grid_rgb_and_errors():
    grid = image_grid(torch.zeros(2, 3, 4, 4), nrow=8, padding=1)
    assert grid.mode == "RGB" and grid.size == (2 * 4 + 3, 4 + 2)
    assert np.asarray(grid)[1, 1].tolist() == [128, 128, 128]
    for bad in (torch.zeros(0, 1, 4, 4), torch.zeros(2, 2, 4, 4), torch.zeros(4, 4)):
        with pytest.raises(ValueError):
            image_grid(bad)


def test_pairs_grid_rows_are_sample_then_nearest(tmp_path):
    samples = torch.linspace(-1, 1, 4).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    train = samples.flip(0) * 0.5  # values differ from every sample
    grid = pairs_grid(samples, train, [3, 0], [1, 2], padding=2, labels=False)
    up = auto_upscale(8)
    assert up == 8
    assert grid.size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
    a = np.asarray(grid)
    assert a[2 + 10, 2 + 10] == 255  # row 0 left: sample 3 (value +1)
    assert a[2 + 10, 68 + 10] == round((1 + train[1, 0, 0, 0].item()) * 127.5)  # row 0 right: train 1
    assert a[68 + 10, 2 + 10] == 0  # row 1 left: sample 0 (value -1)
    path = tmp_path / "pairs.png"
    save_png(grid, path)
    with Image.open(path) as img:
        assert img.size == grid.size and np.array_equal(np.asarray(img), a)
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.png"]


def test_pairs_grid_several_pairs_per_row():
    samples = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 8, 8).contiguous()
    grid = pairs_grid(samples, samples * 0.5, [0, 1, 2, 3, 4], [4, 3, 2, 1, 0], padding=2, upscale=1, pairs_per_row=4,
                      labels=False)
    assert grid.size == (8 * 8 + 9 * 2, 2 * 8 + 3 * 2)  # 4 pairs (8 images) across, 2 rows
    a = np.asarray(grid)
    assert a[2 + 4, 2 + 4] == 0  # sample 0 (value -1)
    assert a[2 + 4, 12 + 4] == round((1 + 0.5) * 127.5)  # its pair: train 4 (value +0.5)
    assert a[2 + 4, 22 + 4] == round((1 - 0.5) * 127.5)  # next pair starts with sample 1 (value -0.5)
    assert a[12 + 4, 2 + 4] == 255  # second row starts with sample 4 (value +1)


def test_pairs_grid_mixed_channels_and_errors():
    grid = pairs_grid(torch.zeros(2, 3, 8, 8), torch.zeros(3, 1, 8, 8), [0], [2], upscale=1, labels=False)
    assert grid.mode == "RGB" and grid.size == (2 * 8 + 6, 8 + 4)
    with pytest.raises(ValueError):
        pairs_grid(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8), [], [])
    with pytest.raises(ValueError):
        pairs_grid(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 4, 4), [0], [0])


def test_pairs_grid_labels_its_columns_above_the_unchanged_grid():
    """The labelled grid is a LABEL_HEIGHT strip over the same pixels; the strip has ink over every column and
    none over the padding between them."""
    from memaudit.report.images import LABEL_HEIGHT

    samples = torch.zeros(6, 1, 8, 8)
    plain = np.asarray(pairs_grid(samples, samples, [0, 1, 2], [3, 4, 5], upscale=8, pairs_per_row=3, labels=False))
    labelled = np.asarray(pairs_grid(samples, samples, [0, 1, 2], [3, 4, 5], upscale=8, pairs_per_row=3))
    assert labelled.shape == (plain.shape[0] + LABEL_HEIGHT, plain.shape[1])
    assert np.array_equal(labelled[LABEL_HEIGHT:], plain)
    strip = labelled[:LABEL_HEIGHT]
    for col in range(6):
        x = 2 + col * 66
        assert (strip[:, x:x + 64] < 128).any(), f"column {col} has no label"
        assert (strip[:, x + 64:x + 66] == 255).all()  # nothing spills into the padding
