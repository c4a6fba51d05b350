"""Lung areas from masks and pixel spacing."""

from __future__ import annotations

import numpy as np

from node.imaging import PixelSpacing

__all__ = ["LUNG_SIDES", "area_mm2", "lung_areas_mm2"]

#: Keys of the area dictionaries: the patient's left and right lung.
LUNG_SIDES = ("left", "right")


def area_mm2(mask: np.ndarray, spacing: PixelSpacing) -> float:
    """Area of a binary 2-D mask in mm²: pixel count x row spacing x column spacing.

    With Imager Pixel Spacing this is the area at the detector plane,
    magnification included (see :func:`node.imaging.pixel_spacing_mm`).

    Raises:
        ValueError: the mask is not 2-D.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return float(np.count_nonzero(mask)) * spacing.row_mm * spacing.column_mm


def lung_areas_mm2(patient_left: np.ndarray, patient_right: np.ndarray, spacing: PixelSpacing) -> dict[str, float]:
    """Areas of the patient's left and right lung, keyed ``"left"`` and ``"right"``."""
    return {"left": area_mm2(patient_left, spacing), "right": area_mm2(patient_right, spacing)}
