import os

# The test models are tiny (8x8 images): one torch thread is as fast, and it stays fast when the machine is
# shared (two threads on a busy 2-core machine made the suite 10x slower). Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from digits import digits_dataset


@pytest.fixture(scope="session")
def digits32() -> torch.Tensor:
    """The first 32 scikit-learn digits as (32, 1, 8, 8) in [-1, 1] (real data shipped offline)."""
    return torch.from_numpy(digits_dataset(32).astype(np.float32) / 127.5 - 1.0)[:, None]


@pytest.fixture(autouse=True)
def image_cache(tmp_path_factory, monkeypatch):
    """Every test caches decoded image folders in a fresh folder of its own (memaudit.imagecache), never in
    ~/.cache: the cache runs in every test as it does for users, and no entry of one test can serve another.
    (MEMAUDIT_IMAGE_CACHE comes before MEMAUDIT_CACHE, so tests that set the latter stay isolated too.)"""
    folder = tmp_path_factory.mktemp("image-cache")
    monkeypatch.setenv("MEMAUDIT_IMAGE_CACHE", str(folder))
    return folder


@pytest.fixture(autouse=True)
def config_home(tmp_path_factory, monkeypatch):
    """Every test keeps its image cache secret (memaudit.imagecache.cache_secret: $XDG_CONFIG_HOME/memaudit/
    cache.key) in a fresh folder of its own, never in ~/.config, and no MEMAUDIT_CACHE_SECRET of the caller's
    environment reaches it."""
    folder = tmp_path_factory.mktemp("config-home")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    monkeypatch.delenv("MEMAUDIT_CACHE_SECRET", raising=False)
    return folder
