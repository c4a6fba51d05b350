"""Hypothesis strategies that damage valid radiographs: element edits and byte edits.

A :class:`Mutant` is a valid base object (one of :func:`bases`) plus a list of operations:
delete an element, give it another value, give it another VR (raw bytes), set an odd image
geometry (Rows / Columns / Bits / Photometric combinations), then truncate, flip, insert or
overwrite bytes of the encoded dataset. :meth:`Mutant.encode` returns the file meta (kept
valid, so it can be sent) and the damaged dataset bytes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from typing import Any

from hypothesis import strategies as st
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.dicom_factory import dataset_bytes, make_cr, make_dx, montgomery_case, part10_bytes

#: Elements the loader, the acceptance rules, the pixel reader or the encoders look at.
KEYWORDS = (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "PixelData",
    "PlanarConfiguration", "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter",
    "WindowWidth", "VOILUTFunction", "PresentationLUTShape", "ImagerPixelSpacing",
    "PixelSpacing", "PixelSpacingCalibrationType", "PatientOrientation", "ViewPosition",
    "BodyPartExamined", "Modality", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
    "SeriesInstanceUID", "SpecificCharacterSet", "PatientName", "PatientID", "StudyDate",
    "StudyTime", "AccessionNumber", "ImageLaterality", "LossyImageCompression",
)
VRS = ("AE", "AS", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OW", "PN",
       "SH", "SL", "SQ", "SS", "ST", "TM", "UI", "UL", "UN", "US", "UT")


@cache
def bases() -> tuple[Dataset, ...]:
    """Valid small radiographs: native explicit / implicit, RLE, JPEG-LS, JPEG 2000."""
    image, _ = montgomery_case()
    size = (256, 256)
    return (
        make_dx(image, size=size),
        make_cr(image, size=size, bits_stored=8, photometric="MONOCHROME1",
                transfer_syntax=ImplicitVRLittleEndian, pixel_spacing=None),
        make_dx(image, size=size, bits_stored=16, transfer_syntax=RLELossless),
        make_dx(image, size=size, transfer_syntax=JPEGLSLossless),
        make_cr(image, size=size, transfer_syntax=JPEG2000Lossless),
    )


# --- element operations ------------------------------------------------------------------

@dataclass(frozen=True)
class Delete:
    keyword: str

    @property
    def keywords(self) -> tuple[str, ...]:
        return (self.keyword,)

    def apply(self, ds: Dataset) -> None:
        if self.keyword in ds:
            del ds[self.keyword]


@dataclass(frozen=True)
class Replace:
    """Another value with the element's own VR (pydicom may warn; it encodes what it can)."""

    keyword: str
    value: Any

    @property
    def keywords(self) -> tuple[str, ...]:
        return (self.keyword,)

    def apply(self, ds: Dataset) -> None:
        tag = Tag(tag_for_keyword(self.keyword))
        vr = dictionary_VR(tag).split(" or ")[0]
        try:
            ds[tag] = DataElement(tag, vr, self.value)
        except Exception:  # noqa: BLE001 - not a value of that VR: store its text raw
            raw = str(self.value).encode("utf-8", "replace")
            RawValue(self.keyword, vr, raw + b" " * (len(raw) % 2)).apply(ds)


@dataclass(frozen=True)
class RawValue:
    """Raw bytes under any VR: a wrong VR, a wrong length, bytes that are not text."""

    keyword: str
    vr: str
    value: bytes

    @property
    def keywords(self) -> tuple[str, ...]:
        return (self.keyword,)

    def apply(self, ds: Dataset) -> None:
        tag = Tag(tag_for_keyword(self.keyword))
        syntax = ds.file_meta.TransferSyntaxUID
        ds[tag] = RawDataElement(tag, None if syntax.is_implicit_VR else self.vr,
                                 len(self.value), self.value, 0, syntax.is_implicit_VR, True)


@dataclass(frozen=True)
class Geometry:
    """An odd image-pixel module: any Rows / Columns / Bits / Photometric combination."""

    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    pixel_representation: int
    samples_per_pixel: int
    photometric: str

    keywords = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation")

    def apply(self, ds: Dataset) -> None:
        ds.Rows, ds.Columns = self.rows, self.columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = (self.bits_allocated, self.bits_stored,
                                                       self.high_bit)
        ds.PixelRepresentation = self.pixel_representation
        ds.SamplesPerPixel = self.samples_per_pixel
        ds.PhotometricInterpretation = self.photometric


# --- byte operations on the encoded dataset --------------------------------------------------

@dataclass(frozen=True)
class Truncate:
    fraction: float

    def apply(self, data: bytes) -> bytes:
        return data[: int(len(data) * self.fraction)]


@dataclass(frozen=True)
class Flip:
    fraction: float
    mask: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        at = min(int(len(data) * self.fraction), len(data) - 1)
        return data[:at] + bytes([data[at] ^ self.mask]) + data[at + 1:]


@dataclass(frozen=True)
class Overwrite:
    fraction: float
    chunk: bytes
    insert: bool

    def apply(self, data: bytes) -> bytes:
        at = int(len(data) * self.fraction)
        end = at if self.insert else at + len(self.chunk)
        return data[:at] + self.chunk + data[end:]


ElementOp = Delete | Replace | RawValue | Geometry
ByteOp = Truncate | Flip | Overwrite


@dataclass(frozen=True)
class Mutant:
    base: int
    element_ops: tuple[ElementOp, ...]
    byte_ops: tuple[ByteOp, ...]

    @property
    def is_unchanged(self) -> bool:
        return not self.element_ops and not self.byte_ops

    def encode(self, sop_instance_uid: str | None = None) -> tuple[FileMetaDataset, bytes]:
        """(file meta, damaged dataset bytes); a fresh SOP Instance UID when one is given.

        An element operation whose result pydicom refuses to encode is undone (rare).
        """
        ds = copy.deepcopy(bases()[self.base])
        if sop_instance_uid is not None:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        pristine = copy.deepcopy(ds)
        try:
            for op in self.element_ops:
                op.apply(ds)
            data = dataset_bytes(ds)
        except Exception:  # noqa: BLE001 - rare: redo one operation at a time, undoing failures
            ds, data = pristine, dataset_bytes(pristine)
            for op in self.element_ops:
                tags = [Tag(tag_for_keyword(k)) for k in op.keywords]
                saved = {t: ds.get_item(t) for t in tags if t in ds}
                try:
                    op.apply(ds)
                    data = dataset_bytes(ds)
                except Exception:  # noqa: BLE001 - pydicom refused to encode: undo it
                    for tag in tags:
                        if tag in saved:
                            ds[tag] = saved[tag]
                        elif tag in ds:
                            del ds[tag]
        for byte_op in self.byte_ops:
            data = byte_op.apply(data)
        return ds.file_meta, data

    def file_bytes(self, sop_instance_uid: str | None = None) -> bytes:
        meta, data = self.encode(sop_instance_uid)
        return part10_bytes(meta, data)


# --- strategies ---------------------------------------------------------------------------

_ints = st.one_of(st.integers(-2, 70_000), st.sampled_from([0, 1, 7, 8, 12, 15, 16, 17, 32, 64,
                                                             255, 256, 4096, 65535]))
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -1.0, 1e-300, 1e300]))
_texts = st.one_of(st.text(max_size=20), st.sampled_from(
    ["", "MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "LL", "RL", "PA",
     "HAND", "CHEST", "1.2.840.10008.5.1.4.1.1.2", "../..", "INVERSE", "SIGMOID", "0\\0",
     "0.1\\0.1", "-1\\2", "nan\\inf", "L\\F", "R\\H"]))
_values = st.one_of(_ints, _floats, _texts, st.lists(st.one_of(_ints, _floats, _texts),
                                                     max_size=4), st.none())
_geometry = (
    st.builds(Geometry, _ints, _ints, st.sampled_from([1, 8, 12, 16, 32, 64, 0, 3]),
              st.integers(0, 40), st.integers(-1, 40), st.integers(0, 2),
              st.sampled_from([1, 3, 0, 2]),
              st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL_422",
                               "PALETTE COLOR", "", "monochrome2"]))
)



def element_ops(keywords: tuple[str, ...] = KEYWORDS) -> st.SearchStrategy[ElementOp]:
    """Element operations on ``keywords``."""
    names = st.sampled_from(keywords)
    return st.one_of(
        st.builds(Delete, names),
        st.builds(Replace, names, _values),
        st.builds(RawValue, names, st.sampled_from(VRS), st.binary(max_size=24)),
        _geometry,
    )


#: Byte snippets that break the stream's structure rather than a value.
NASTY = (
    b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00",  # SQ, no end
    b"\xfe\xff\x00\xe0\xf0\xff\xff\xff",  # an item with a length beyond the end
    b"\x28\x00\x10\x00US\x02\x00",  # Rows with no value bytes
    b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff",  # Pixel Data: undefined length, no items
    b"\x08\x00\x18\x00UI\xff\xff",  # SOP Instance UID longer than the stream
)
_fraction = st.floats(0.0, 1.0)
byte_ops: st.SearchStrategy[ByteOp] = st.one_of(
    st.builds(Truncate, _fraction),
    st.builds(Flip, _fraction, st.integers(1, 255)),
    st.builds(Overwrite, _fraction,
              st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from(NASTY)),
              st.booleans()),
)


def mutants(*, with_bytes: bool = True,
            keywords: tuple[str, ...] = KEYWORDS) -> st.SearchStrategy[Mutant]:
    """Mutants of the bases (some left unchanged: controls that must succeed)."""
    return st.builds(
        Mutant,
        st.integers(0, len(bases()) - 1),
        st.lists(element_ops(keywords), max_size=3).map(tuple),
        st.lists(byte_ops, max_size=2).map(tuple) if with_bytes else st.just(()),
    )


def fresh_uid() -> str:
    return generate_uid()
