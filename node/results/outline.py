"""A lung mask's outline as a closed polyline in DICOM image coordinates (scikit-image).

SCOORD Graphic Data is (column, row) with the origin at the top left corner of the top left
pixel (PS3.3 C.18.6.1.1), so a pixel centre is (c + 0.5, r + 0.5). The outline is the 0.5
iso-line of the mask (:func:`skimage.measure.find_contours`) around its largest region,
simplified to within ``tolerance_px`` (:func:`skimage.measure.approximate_polygon`). The
polyline is closed: its last point repeats the first.

The contours are traced on the mask's bounding box only (a lung is a small part of a
radiograph): marching squares is local and its coordinates are half-integers, so moving them
back by the box's integer offset gives exactly the points the whole mask would.
"""

from __future__ import annotations

import numpy as np
from skimage import measure

__all__ = ["MaskBounds", "mask_bounds", "mask_outline"]

#: (rows, columns) slices of a mask's bounding box.
MaskBounds = tuple[slice, slice]


def mask_bounds(mask: np.ndarray) -> MaskBounds | None:
    """The bounding box of a 2-D boolean mask's True pixels; None when it has none."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)


def mask_outline(mask: np.ndarray, tolerance_px: float = 1.0) -> np.ndarray | None:
    """(N, 2) float32 (column, row) points of the closed outline of ``mask``; None when it is empty."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask outline needs a 2-D mask, got shape {mask.shape}")
    bounds = mask_bounds(mask)
    if bounds is None:
        return None
    padded = np.pad(mask[bounds], 1).astype(np.float32)  # closes contours that touch the border
    # Back to the whole mask's padded grid (exact: half-integers plus integers).
    origin = np.array([bounds[0].start, bounds[1].start], dtype=np.float64)
    contours = [contour + origin for contour in measure.find_contours(padded, 0.5)]
    longest = max(contours, key=lambda c: _polygon_area(c))
    simplified = measure.approximate_polygon(longest, tolerance=tolerance_px)
    rows, columns = simplified[:, 0] - 1.0, simplified[:, 1] - 1.0  # undo the padding
    points = np.stack([columns + 0.5, rows + 0.5], axis=1)
    points[:, 0] = np.clip(points[:, 0], 0.0, mask.shape[1])
    points[:, 1] = np.clip(points[:, 1], 0.0, mask.shape[0])
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points.astype(np.float32)


def _polygon_area(contour: np.ndarray) -> float:
    y, x = contour[:, 0], contour[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)
