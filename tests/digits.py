"""scikit-learn's 8x8 handwritten digits (1,797 real images), shipped offline as examples/digits/digits.npz."""

from pathlib import Path
from typing import Optional

import numpy as np

DIGITS_NPZ = Path(__file__).resolve().parents[1] / "examples" / "digits" / "digits.npz"


def digits_dataset(limit: Optional[int] = None) -> np.ndarray:
    """The digits as uint8 (N, 8, 8) (values 0..16 scaled by 255/16 and rounded, as the bundled file holds them)."""
    with np.load(DIGITS_NPZ, allow_pickle=False) as npz:
        array = npz["images"]
    return array[:limit] if limit is not None else array
