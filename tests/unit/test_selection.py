"""Acceptance rules for chest films in any image container, and the node's own results."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from node.dicom import DX_FOR_PRESENTATION, MULTIFRAME_GRAYSCALE_WORD_SC, SECONDARY_CAPTURE
from node.settings import AcceptanceSettings
from node.worker.selection import rejection_reason

RULES = AcceptanceSettings()


def header(**values: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.Modality, ds.Rows, ds.Columns = SECONDARY_CAPTURE, "DX", 1024, 1024
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_a_chest_film_stored_as_secondary_capture_is_analysed() -> None:
    assert rejection_reason(header(), RULES) is None  # like NIH ChestX-ray14 in the NCCID
    assert rejection_reason(header(SOPClassUID=MULTIFRAME_GRAYSCALE_WORD_SC, NumberOfFrames=1), RULES) is None


@pytest.mark.parametrize(("values", "words"), [
    ({"Modality": "OT"}, "Modality OT"),
    ({"BurnedInAnnotation": "YES"}, "Burned In Annotation"),
    ({"SOPClassUID": MULTIFRAME_GRAYSCALE_WORD_SC, "NumberOfFrames": 3}, "3 frames"),
    ({"ViewPosition": "LL"}, "ViewPosition LL"),
    ({"ImageType": ["DERIVED", "SECONDARY"]}, "Image Type DERIVED"),
    ({"SourceImageSequence": [Dataset()]}, "Source Image Sequence present"),
    ({"Manufacturer": "cxrnode", "ManufacturerModelName": "cxrnode"}, "made by cxrnode"),
    ({"SOPClassUID": DX_FOR_PRESENTATION, "Manufacturer": "cxrnode", "ManufacturerModelName": "cxrnode"},
     "made by cxrnode"),
])
def test_what_is_not_a_chest_film_says_why(values: dict, words: str) -> None:
    reason = rejection_reason(header(**values), RULES)
    assert reason is not None and words in reason


def test_burned_in_secondary_captures_can_be_allowed() -> None:
    rules = AcceptanceSettings(allow_burned_in_annotation=True)
    assert rejection_reason(header(BurnedInAnnotation="YES"), rules) is None


def test_derived_secondary_captures_can_be_allowed_and_derived_radiographs_are_analysed() -> None:
    derived = header(ImageType=["DERIVED", "SECONDARY"])
    assert rejection_reason(derived, AcceptanceSettings(allow_derived_secondary_capture=True)) is None
    assert rejection_reason(header(ImageType=["ORIGINAL", "PRIMARY"]), RULES) is None
    # A modality's processed CR/DX is DERIVED\PRIMARY (the NEMA chest CR): still the radiograph.
    assert rejection_reason(header(SOPClassUID=DX_FOR_PRESENTATION, ImageType=["DERIVED", "PRIMARY"]), RULES) is None
