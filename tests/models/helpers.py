"""Helpers shared by the models tests."""

from __future__ import annotations

import numpy as np


def upscale_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resample (stand-in for a full-size acquisition)."""
    rows = (np.arange(shape[0]) * a.shape[0] // shape[0]).astype(int)
    cols = (np.arange(shape[1]) * a.shape[1] // shape[1]).astype(int)
    return a[rows][:, cols]
