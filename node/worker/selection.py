"""Acceptance rules from the settings, applied to a received dataset.

An object outside the rules is archived and its job discarded with the reason; it is never
silently dropped. The rules are data (``[acceptance]`` in the config), not code.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from node.dicom import ACCEPTED_SOP_CLASSES
from node.settings import AcceptanceSettings


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip().upper() if value is not None else ""


def rejection_reason(ds: Dataset, rules: AcceptanceSettings) -> str | None:
    """None if ``ds`` is to be analysed, else a sentence saying why not."""
    if str(ds.get("SOPClassUID", "")) not in ACCEPTED_SOP_CLASSES:
        return f"SOP class {ds.get('SOPClassUID', '(none)')} is not a CR or DX image"
    modality = _text(ds, "Modality")
    if modality not in rules.modalities:
        return f"Modality {modality or '(none)'} is not one of {', '.join(rules.modalities)}"
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
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < rules.min_rows or columns < rules.min_columns:
        return f"image {rows}x{columns} is smaller than {rules.min_rows}x{rules.min_columns}"
    return None
