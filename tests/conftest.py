import numpy as np
import pytest
import torch

from memaudit.data import digits_dataset


@pytest.fixture(scope="session")
def digits32() -> torch.Tensor:
    """The first 32 scikit-learn digits as (32, 1, 8, 8) in [-1, 1] (real data shipped offline)."""
    return torch.from_numpy(digits_dataset(32).astype(np.float32) / 127.5 - 1.0)[:, None]
