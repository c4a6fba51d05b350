"""Acceptance rules from the settings, applied to a received dataset.

An object outside the rules is archived and its job discarded with the reason; it is never
silently dropped. The rules are data (``[acceptance]`` in the config), not code.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from node.dicom import ANALYSED_SOP_CLASSES, CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING
from node.results.device import MANUFACTURER, MODEL_NAME
from node.settings import AcceptanceSettings

_RADIOGRAPH_CLASSES = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING)


class _Unreadable(ValueError):
    """An attribute the rules need cannot be decoded."""


def _value(ds: Dataset, keyword: str) -> object:
    try:
        return ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - a malformed element (wrong VR, bad bytes)
        raise _Unreadable(f"{keyword} cannot be read ({type(exc).__name__})") from None


def _text(ds: Dataset, keyword: str) -> str:
    value = _value(ds, keyword)
    return str(value).strip().upper()[:64] if value is not None else ""


def _size(ds: Dataset, keyword: str) -> int:
    value = _value(ds, keyword)
    if value is None or value == "":
        raise _Unreadable(f"{keyword} is missing")
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise _Unreadable(f"{keyword} is not an integer") from None


def _derived(ds: Dataset) -> str:
    """Why the header says the image was made from another image, or ''.

    Only for Secondary Capture: CR and DX For Presentation are routinely DERIVED (processed by the
    modality; the NEMA chest CR says DERIVED\\PRIMARY) and are still the radiograph.
    """
    image_type = _value(ds, "ImageType")
    values = [image_type] if isinstance(image_type, str) else list(image_type or [])
    if values and str(values[0]).strip().upper() == "DERIVED":
        return "Image Type DERIVED"
    for keyword, name in (("SourceImageSequence", "Source Image Sequence"),
                          ("DerivationCodeSequence", "Derivation Code Sequence")):
        if _value(ds, keyword):
            return f"{name} present"
    return ""


def rejection_reason(ds: Dataset, rules: AcceptanceSettings) -> str | None:
    """None if ``ds`` is to be analysed, else a sentence saying why not.

    Never raises: an attribute that cannot be decoded is itself the reason.
    """
    try:
        return _reason(ds, rules)
    except _Unreadable as exc:
        return str(exc)


def _reason(ds: Dataset, rules: AcceptanceSettings) -> str | None:
    # First, whatever its class: every SEG, SR and SC the node writes says so, whatever identity
    # ([node] institution, station, serial) the installation has.
    if _text(ds, "Manufacturer") == MANUFACTURER.upper() and _text(ds, "ManufacturerModelName") == MODEL_NAME.upper():
        return "made by cxrnode (its own result routed back): never analysed"
    sop_class = _text(ds, "SOPClassUID")
    if sop_class not in ANALYSED_SOP_CLASSES:
        return f"SOP class {sop_class or '(none)'} is not a radiograph image class"
    modality = _text(ds, "Modality")
    if modality not in rules.modalities:
        return f"Modality {modality or '(none)'} is not one of {', '.join(rules.modalities)}"
    if sop_class not in _RADIOGRAPH_CLASSES:
        # A Secondary Capture is a chest film only when its header says so, and not a picture of one.
        if _text(ds, "BurnedInAnnotation") == "YES" and not rules.allow_burned_in_annotation:
            return "Secondary Capture with Burned In Annotation YES (a picture, not a radiograph)"
        if not rules.allow_derived_secondary_capture and (derived := _derived(ds)):
            return f"Secondary Capture derived from another image ({derived}): a processed copy, not a film"
        frames = _value(ds, "NumberOfFrames")
        if frames not in (None, "", 1, "1"):
            return f"multi-frame Secondary Capture ({frames} frames)"
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        if body_part not in rules.body_parts:
            return f"BodyPartExamined {body_part} is not one of {', '.join(rules.body_parts)}"
    elif not rules.allow_missing_body_part:
        return "BodyPartExamined is missing"
    view = _text(ds, "ViewPosition")
    if view:
        if view not in rules.view_positions:
            return f"ViewPosition {view} is not one of {', '.join(rules.view_positions)}"
    elif not rules.allow_missing_view_position:
        return "ViewPosition is missing"
    rows, columns = _size(ds, "Rows"), _size(ds, "Columns")
    if rows < rules.min_rows or columns < rules.min_columns:
        return f"image {rows}x{columns} is smaller than {rules.min_rows}x{rules.min_columns}"
    return None
