"""The two lung-mask conventions in the reference data, and the region they dispute.

Montgomery's NLM masks leave out the lung behind the heart (the NLM convention); most Shenzhen
masks do too, but some (about one in ten) draw it. A segmenter trained on both learns an average
of the two in that region by accident: uncertain probabilities behind the heart on every image.
This module holds the rule that tells the two apart and the region they disagree on, shared by
the label audit (:mod:`models.experiments.mask_convention_audit`) and convention-aware training
(``cxrnode train segmentation --ignore-disputed``, :mod:`models.training.segmentation`).

Rule: the yardstick is a segmenter that follows the NLM convention. Per reference mask, the share
of the reference lung in the image's right half (the patient's left lung, where the heart is)
that the segmentation leaves out. Montgomery's masks define the convention, so the cut-off is
``CUTOFF_FACTOR`` times the 95th percentile of that share over the Montgomery training masks; a
mask above it is labelled ``includes_retrocardiac``. A case where the yardstick misses lower left
lung for another reason is labelled the same way, so read the label as "disagrees with the NLM
convention behind the heart".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: The cut-off is this many times the Montgomery training masks' 95th percentile.
CUTOFF_FACTOR = 2.0
NLM, INCLUDES = "nlm", "includes_retrocardiac"
#: The source whose masks define the NLM convention.
DEFINING_SOURCE = "montgomery"


def _pair(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape or reference.ndim != 2:
        raise ValueError(f"masks must be 2-D and the same shape, got {prediction.shape} and {reference.shape}")
    return prediction, reference


def missed_heart_side_share(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Share of the reference lung in the image's right half that ``prediction`` leaves out,
    relative to the whole reference lung (0 when the reference is empty)."""
    prediction, reference = _pair(prediction, reference)
    total = int(reference.sum())
    if total == 0:
        return 0.0
    half = reference.shape[1] // 2
    return float((reference[:, half:] & ~prediction[:, half:]).sum() / total)


def cutoff(shares: Sequence[float], sources: Sequence[str]) -> float:
    """The ``includes_retrocardiac`` cut-off from the missed shares of the defining source's masks
    (pass training masks only: the cut-off must not come from the cases it is checked on)."""
    if len(shares) != len(sources):
        raise ValueError("shares and sources differ in length")
    defining = [s for s, src in zip(shares, sources) if src == DEFINING_SOURCE]
    if not defining:
        raise ValueError(f"no {DEFINING_SOURCE.capitalize()} training masks: they define the NLM convention's cut-off")
    return CUTOFF_FACTOR * float(np.percentile(defining, 95))


def label(share: float, cut: float) -> str:
    """``includes_retrocardiac`` above the cut-off, else ``nlm``."""
    return INCLUDES if share > cut else NLM


def disputed_region(prediction: np.ndarray, reference: np.ndarray, grow: int = 2) -> np.ndarray:
    """Where a mask drawn the other way disputes the NLM convention: reference lung in the image's
    right half that ``prediction`` (an NLM-convention segmentation) leaves out, grown by ``grow``
    pixels (the border of the disputed area is uncertain too), kept to the right half."""
    prediction, reference = _pair(prediction, reference)
    if grow < 0:
        raise ValueError(f"grow must be >= 0, got {grow}")
    half = reference.shape[1] // 2
    region = np.zeros_like(reference)
    region[:, half:] = reference[:, half:] & ~prediction[:, half:]
    if grow and region.any():
        region = ndimage.binary_dilation(region, iterations=grow)
        region[:, :half] = False
    return region
