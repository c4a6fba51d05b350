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
    """Encode ``ds`` to bytes, parse them back (``hd.seg.segread``, ``hd.sr.srread``, or pydicom
    with its pixels decoded for a Secondary Capture), and return those bytes: what is archived
    and sent is exactly what was checked.

    Checks that the SOP Instance UID survives and, for a SEG, that it still
    has segments; for an SR, that its content is a parseable template; for an SC, that its
    pixels decode to Rows x Columns x 3.

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
            sr = hd.sr.srread(io.BytesIO(data))
            sr.content  # parse the content tree
            reread_uid = sr.SOPInstanceUID
    except UnreadableResult:
        raise
    except Exception as exc:
        raise UnreadableResult(f"result does not re-read: {type(exc).__name__}: {exc}") from exc
    if reread_uid != ds.SOPInstanceUID:
        raise UnreadableResult("re-read result has a different SOP Instance UID")
    return data
