"""The source image as the encoders see it: header defects that would break the results, mended.

highdicom copies every root-level Patient and Study attribute of the source
into the SEG and SR, and reads some of them as attributes. So:

* a source that lacks a Type 2 one (e.g. a minimal Secondary Capture without
  Patient's Birth Date) makes it fail with AttributeError: the copy adds it,
  empty, which is what Type 2 allows;
* an invalid optional value (e.g. Patient's Age ``81`` instead of ``081Y``)
  would make the results invalid: the copy leaves out invalid values of
  attributes other than the UIDs and :data:`TYPE2_PATIENT_STUDY_KEYWORDS`,
  which are kept as received so the PACS files the results with the source;
* a CR/DX Pixel Spacing of zero (NEMA RG1 CR) would be copied into the SEG's
  Pixel Measures: the copy leaves it out.

:func:`encoding_source` returns an :class:`EncodingSource`: a shallow copy of
the header, without Pixel Data (the encoders get pixels and masks as arrays),
that also carries the pixel spacing results are measured with. The received
object is never modified. The pipeline makes it once per job and hands it to
every encoder; an encoder given one uses it as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.datadict import dictionary_VR
from pydicom.valuerep import validate_value

from node.imaging import PixelSpacing, pixel_spacing_mm, spacing_attribute_mm

__all__ = ["TYPE2_PATIENT_STUDY_KEYWORDS", "EncodingSource", "encoding_source", "no_identifier_warnings"]

#: Type 2 attributes of the Patient and General Study modules that the results copy.
TYPE2_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

_KEPT_AS_RECEIVED = frozenset(
    {*TYPE2_PATIENT_STUDY_KEYWORDS, "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"}
)
_CHECKED_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UI"})  # string-valued
_PIXEL_DATA = Tag("PixelData")


class EncodingSource(Dataset):
    """The source image's header as the encoders use it, made by :func:`encoding_source`."""

    #: What results are measured with (:func:`node.imaging.pixel_spacing_mm`); None: no usable spacing.
    spacing: PixelSpacing | None = None


def encoding_source(source: Dataset) -> EncodingSource:
    """Return the header of ``source`` that highdicom can encode results for (``source`` itself
    when it is one already).

    Raises:
        ValueError: the source lacks a SOP Class, SOP Instance, Study or
            Series Instance UID (results could not reference it or file
            into its study).
    """
    if isinstance(source, EncodingSource):
        return source
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not source.get(keyword):
            raise ValueError(f"the source image has no {keyword}")
    missing = [keyword for keyword in TYPE2_PATIENT_STUDY_KEYWORDS if keyword not in source]
    left_out = {element.tag for element in source if _is_invalid_optional(element)} | {_PIXEL_DATA}
    if "PixelSpacing" in source and spacing_attribute_mm(source, "PixelSpacing") is None:
        left_out.add(source["PixelSpacing"].tag)
    # A malformed Type 2 value (a birth date "12/04/1936", a date stored with a binary VR, two
    # patient names) would stop highdicom: such a value is repaired in the copy, see _repair.
    repaired = {e.keyword: _repair(e) for e in source
                if e.keyword in TYPE2_PATIENT_STUDY_KEYWORDS and not e.is_empty and _malformed(e)}
    copy = EncodingSource()
    copy.spacing = pixel_spacing_mm(source)
    for element in source:
        if element.tag not in left_out and element.keyword not in repaired:
            copy.add(element)
    for keyword in missing:
        setattr(copy, keyword, "")
    for keyword, value in repaired.items():
        setattr(copy, keyword, value)
    if hasattr(source, "file_meta"):
        copy.file_meta = source.file_meta
    return copy


@contextmanager
def no_identifier_warnings() -> Iterator[None]:
    """Silence highdicom's person-name warning, whose text quotes the patient's name.

    The node routes warnings into its logs, and logs must not carry patient
    identifiers; the name is copied as received either way.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*unlikely to represent the intended person name", category=UserWarning
        )
        yield


def _is_invalid_optional(element: DataElement) -> bool:
    if element.keyword in _KEPT_AS_RECEIVED or element.VR not in _CHECKED_VRS or element.is_empty:
        return False
    return _is_invalid(element)


def _malformed(element: DataElement) -> bool:
    """A Type 2 patient/study value with the wrong VR, more than one value, or an invalid value."""
    if element.VR != dictionary_VR(element.tag) or isinstance(element.value, MultiValue):
        return True
    return element.VR in _CHECKED_VRS and _is_invalid(element)


def _repair(element: DataElement) -> str:
    """The value the results carry instead: the first of several valid values, else empty."""
    if element.VR == dictionary_VR(element.tag) and isinstance(element.value, MultiValue):
        first = element.value[0]
        candidate = DataElement(element.tag, element.VR, first)
        if element.VR not in _CHECKED_VRS or not _is_invalid(candidate):
            return str(first)
    return ""


def _is_invalid(element: DataElement) -> bool:
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    try:
        for value in values:
            validate_value(element.VR, str(value), config.RAISE)
    except ValueError:
        return True
    return False
