"""Result encoders: DICOM SEG of the lungs and TID 1500 SR of the TB score.

One concept per module: ``uids`` (deterministic UIDs), ``algorithm`` (who
made it), ``device`` (the node as equipment), ``measure`` (lung areas),
``source`` (header defects mended for encoding), ``seg``, ``sr`` and
``verify`` (re-read before sending).
"""

from .algorithm import Algorithm, ResultAlgorithms
from .device import DEFAULT_DEVICE, NodeDevice, device_for
from .measure import lung_areas_mm2
from .seg import LUNG_SEGMENTS, build_segmentation
from .sr import build_report
from .uids import UID_PREFIX, ResultUIDs, result_uids
from .verify import UnreadableResult, reread

__all__ = [
    "DEFAULT_DEVICE",
    "LUNG_SEGMENTS",
    "UID_PREFIX",
    "Algorithm",
    "NodeDevice",
    "ResultAlgorithms",
    "ResultUIDs",
    "UnreadableResult",
    "build_report",
    "build_segmentation",
    "device_for",
    "lung_areas_mm2",
    "reread",
    "result_uids",
]
