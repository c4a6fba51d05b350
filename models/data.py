"""Read any folder in the ``index.csv`` layout of the project's chest X-ray data.

Columns: ``case_id, source, image_path, mask_path, tb_label, split``. ``mask_path`` may be
empty (TB label only) and so may ``tb_label`` (mask only): segmentation uses the rows with a
mask, the TB scorer the rows with a label. ``split`` is optional; without it every case belongs
to every split request. Paths are relative to the folder. The data is never copied: images are
read where they lie.

An export of archived studies (``cxrnode dataset export``) adds ``label_source`` (``manual``: a
radiologist's mask, ``pseudo``: the node's own mask; blank without a mask), ``label_quality``
(the pseudo-label's quality score, 0..1) and ``tb_label_source`` (``csv``, ``report`` or blank);
they are read when present (:attr:`Case.label_source` ...) and otherwise left at None. Other
extra columns are ignored.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REQUIRED_COLUMNS = ("case_id", "source", "image_path", "mask_path", "tb_label")


class DataError(ValueError):
    """A data folder or its index.csv cannot be used; the message is one readable line."""


@dataclass(frozen=True)
class Case:
    """One row of ``index.csv`` with absolute paths."""

    case_id: str
    source: str
    image_path: Path
    mask_path: Path | None
    tb_label: int | None
    split: str | None
    #: ``manual`` or ``pseudo`` (export columns; None when the index has no such column or it is blank)
    label_source: str | None = None
    #: quality score 0..1 of a pseudo-label mask (None when blank or absent)
    label_quality: float | None = None
    #: where the TB label came from: ``csv`` or ``report`` (None when blank or absent)
    tb_label_source: str | None = None


def read_index(data_dir: str | Path, split: str | None = None) -> list[Case]:
    """Parse ``data_dir/index.csv``; keep the rows of ``split`` (None = all rows).

    Raises :class:`DataError` for a missing folder or file, missing columns, bad labels,
    an unknown split or referenced files that do not exist.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    index = root / "index.csv"
    if not index.is_file():
        raise DataError(f"no index.csv in {root}")
    with index.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"{index}: missing column(s) {', '.join(missing)}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    has_split = "split" in columns
    cases: list[Case] = []
    for n, row in enumerate(rows, start=2):
        label_text = row["tb_label"]
        if label_text not in ("0", "1", ""):
            raise DataError(f"{index}, line {n}: tb_label must be 0, 1 or empty, got {label_text!r}")
        image = root / row["image_path"]
        if not row["image_path"] or not image.is_file():
            raise DataError(f"{index}, line {n}: image not found: {image}")
        mask = root / row["mask_path"] if row["mask_path"] else None
        if mask is not None and not mask.is_file():
            raise DataError(f"{index}, line {n}: mask not found: {mask}")
        quality_text = row.get("label_quality", "")
        try:
            quality = float(quality_text) if quality_text else None
        except ValueError:
            quality = None
        if quality_text and (quality is None or not 0.0 <= quality <= 1.0):
            raise DataError(f"{index}, line {n}: label_quality must be a number in 0..1 or empty, got {quality_text!r}")
        cases.append(
            Case(
                case_id=row["case_id"],
                source=row["source"] or "unknown",
                image_path=image,
                mask_path=mask,
                tb_label=int(label_text) if label_text else None,
                split=(row.get("split") or None) if has_split else None,
                label_source=row.get("label_source") or None,
                label_quality=quality,
                tb_label_source=row.get("tb_label_source") or None,
            )
        )
    if split is not None and has_split:
        known = {c.split for c in cases}
        if split not in known:
            raise DataError(f"{index}: no cases in split {split!r} (splits: {', '.join(sorted(map(str, known)))})")
        cases = [c for c in cases if c.split == split]
    if not cases:
        raise DataError(f"{index}: no cases")
    return cases


def load_image(path: str | Path) -> np.ndarray:
    """An image file as a 2-D float32 array in display orientation (grey values as stored)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "I", "I;16", "F"):
            im = im.convert("L")
        return np.asarray(im, dtype=np.float32)


def load_mask(path: str | Path) -> np.ndarray:
    """A mask file as a 2-D bool array (any non-zero value is lung; 0/255 PNGs thresholded >127)."""
    arr = load_image(path)
    return arr > (127 if arr.max() > 1 else 0)
