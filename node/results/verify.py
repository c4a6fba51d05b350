"""Re-read an encoded result before it is sent (STYLE 13: read back what you write)."""

from __future__ import annotations

import io

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

__all__ = ["UnreadableResult", "encode", "reread"]


class UnreadableResult(ValueError):
    """An encoded result does not survive a round trip through highdicom's (or pydicom's) readers."""


def encode(ds: Dataset) -> bytes:
    """Return ``ds`` as a DICOM Part 10 file, in bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def reread(ds: Dataset) -> bytes:
    """Encode ``ds`` to bytes, parse them back, and return those bytes: what is archived and
    sent is exactly what was checked.

    Checks that the SOP Instance UID survives and, for a SEG, that ``hd.seg.segread`` reads it
    with its segments; for an SC, that its pixels decode to Rows x Columns x 3; for an SR, that
    its content tree is still there (:func:`_check_report`).

    Raises:
        UnreadableResult: encoding or re-reading failed, with the cause chained.
    """
    try:
        data = encode(ds)
        if ds.SOPClassUID == SegmentationStorage:
            seg = hd.seg.segread(io.BytesIO(data))
            if not seg.SegmentSequence:
                raise UnreadableResult("re-read SEG has no segments")
            reread_uid = seg.SOPInstanceUID
        elif ds.SOPClassUID == SecondaryCaptureImageStorage:
            sc = dcmread(io.BytesIO(data))
            if sc.pixel_array.shape != (sc.Rows, sc.Columns, 3):
                raise UnreadableResult(f"re-read SC has pixels of shape {sc.pixel_array.shape}")
            reread_uid = sc.SOPInstanceUID
        else:
            reread_uid = _check_report(dcmread(io.BytesIO(data)), ds).SOPInstanceUID
    except UnreadableResult:
        raise
    except Exception as exc:
        raise UnreadableResult(f"result does not re-read: {type(exc).__name__}: {exc}") from exc
    if reread_uid != ds.SOPInstanceUID:
        raise UnreadableResult("re-read result has a different SOP Instance UID")
    return data


def _check_report(read: Dataset, built: Dataset) -> Dataset:
    """An SR parsed back: a root CONTAINER with as many content items as ``built``.

    Its content was validated when it was built (highdicom checks the TID 1500 templates and
    parses the whole tree in the SR's constructor); parsing it again as templates here
    (``hd.sr.srread``) took as long as building it, to learn nothing new about the bytes.
    """
    if read.get("ValueType") != "CONTAINER":
        raise UnreadableResult("re-read SR has no root CONTAINER")
    items = len(read.get("ContentSequence") or ())
    if not items or items != len(built.get("ContentSequence") or ()):
        raise UnreadableResult(f"re-read SR has {items} content items, "
                               f"{len(built.get('ContentSequence') or ())} were encoded")
    return read
