"""Anatomical plausibility of a two-lung mask: a reference-free check of a segmentation.

A score in 0..1 (3 decimals), the product of four factors, each 1 for what real lungs look like
and falling to 0 for what a person would reject at a glance. On the mask in the standard view
(the patient's left on the image's right), at any size:

* **area**: both lungs together cover 12-42 % of the image (1), falling linearly to 0 at 4 % and
  60 %. The shared reference masks cover 9.9-43 % (1st-99th percentile 13-40 %);
* **balance**: the smaller lung has at least half the area of the larger (1), falling to 0 at
  15 %. Reference masks: 5th percentile 0.68, median 0.85;
* **compactness**: each lung's largest connected component holds at least 95 % of its pixels (1),
  falling to 0 at 60 %. The two largest components of the reference masks hold 94-100 %;
* **sides**: the patient's left lung lies on the image's right half and the right lung on its
  left half (centroids); 0 otherwise, and 0 when a lung is empty.

A correct mask scores 1.0 or close; a missing lung, a lung on the wrong side, a fragmented blob or
a mask over the mediastinum scores 0 or low. It is not a Dice estimate. It needs no reference mask,
so it is what tells a failed segmentation on data without annotations: ``cxrnode evaluate`` reports
it per case (and how many cases fall below :data:`PLAUSIBLE`), and the dataset export uses it as the
quality of the node's own masks as pseudo-labels (``node.dataset.labels.pseudo_quality``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.components import label_components

__all__ = ["CHECK_SIDE", "PLAUSIBLE", "analysis_plausibility", "lung_plausibility"]

#: Below this score a segmentation counts as implausible (``evaluate``'s ``n_implausible``); the same
#: value is the dataset export's default ``[dataset] min_pseudo_quality``.
PLAUSIBLE = 0.5


def _ramp(x: float, low: float, high: float) -> float:
    return float(np.clip((x - low) / (high - low), 0.0, 1.0))


def _largest_share(mask: np.ndarray) -> float:
    _, sizes = label_components(mask, connectivity=8)
    return float(sizes.max() / sizes.sum()) if sizes.size and sizes.sum() else 0.0


def lung_plausibility(patient_left: np.ndarray, patient_right: np.ndarray) -> float:
    """Anatomical plausibility (0..1, 3 decimals) of a two-lung mask in the standard view (the
    patient's left on the image's right); see the module docstring for the four factors."""
    left, right = np.asarray(patient_left, bool), np.asarray(patient_right, bool)
    if left.shape != right.shape or left.ndim != 2:
        raise ValueError(f"two 2-D masks of one shape expected, got {left.shape} and {right.shape}")
    height, width = left.shape
    left_area, right_area = int(left.sum()), int(right.sum())
    if not left_area or not right_area:
        return 0.0
    area = (left_area + right_area) / (height * width)
    f_area = _ramp(area, 0.04, 0.12) * (1.0 - _ramp(area, 0.42, 0.60))
    f_balance = _ramp(min(left_area, right_area) / max(left_area, right_area), 0.15, 0.5)
    f_compact = _ramp(min(_largest_share(left), _largest_share(right)), 0.6, 0.95)
    columns = np.arange(width)
    left_x = float((left.sum(axis=0) * columns).sum() / left_area)
    right_x = float((right.sum(axis=0) * columns).sum() / right_area)
    f_sides = 1.0 if right_x < width / 2 < left_x else 0.0
    return round(f_area * f_balance * f_compact * f_sides, 3)


#: :func:`analysis_plausibility` looks at masks no larger than this (every k-th pixel of a larger
#: one): the factors are shares and positions, the same at 512 px, and a 2048 px mask costs ~40 ms.
CHECK_SIDE = 512


def analysis_plausibility(analysis: Any) -> float:
    """:func:`lung_plausibility` of a :class:`models.inference.LungAnalysis` (its ``image_right`` is
    the patient's left lung on a PA view in display orientation), on every k-th pixel of masks
    larger than :data:`CHECK_SIDE`."""
    left, right = np.asarray(analysis.image_right, bool), np.asarray(analysis.image_left, bool)
    step = max(1, -(-max(left.shape) // CHECK_SIDE))
    return lung_plausibility(left[::step, ::step], right[::step, ::step])
