"""``cxrnode evaluate --overlays DIR``: a picture per case and an index page, worst case first.

Each case's picture puts three panels side by side, the classic way to show a segmentation
result: the prediction (the patient's left lung green, the right blue), the reference mask
(yellow) and the difference (red: predicted but not in the reference; orange: in the reference
but missed), with the case, its Dice and the TB score in the caption. ``index.html`` lists the
cases sorted by Dice, lowest first, so the failures are looked at first.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from node.results.picture import lung_layers, overlay_picture

__all__ = ["CasePicture", "case_picture", "write_index"]

REFERENCE_COLOUR = (255, 210, 0)
FALSE_POSITIVE_COLOUR = (255, 40, 40)
FALSE_NEGATIVE_COLOUR = (255, 140, 0)
PANEL_SIDE = 512


@dataclass(frozen=True)
class CasePicture:
    case_id: str
    source: str
    dice: float
    tb_score: float
    tb_label: int | None
    file_name: str


def case_picture(image: np.ndarray, image_left: np.ndarray, image_right: np.ndarray, reference: np.ndarray,
                 caption: list[str]) -> Image.Image:
    """Prediction, reference and difference panels of one case, side by side.

    ``image`` is 2-D in [0, 1]; masks are boolean in its geometry. The data sets are PA/AP
    films in standard display, so the lung on the image's right is the patient's left.
    """
    predicted = image_left | image_right
    panels = [
        overlay_picture(image, lung_layers(image_right, image_left), [*caption, "prediction"],
                        max_side=PANEL_SIDE),
        overlay_picture(image, [(reference, REFERENCE_COLOUR)], [*caption, "reference"],
                        patient_left_on_image_right=None, max_side=PANEL_SIDE),
        overlay_picture(image, [(predicted & ~reference, FALSE_POSITIVE_COLOUR),
                                (reference & ~predicted, FALSE_NEGATIVE_COLOUR)],
                        [*caption, "difference: red extra, orange missed"],
                        patient_left_on_image_right=None, max_side=PANEL_SIDE),
    ]
    out = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    x = 0
    for panel in panels:
        out.paste(panel, (x, 0))
        x += panel.width
    return out


def write_index(folder: Path, cases: list[CasePicture]) -> Path:
    """``folder/index.html``: every case's picture, lowest Dice first."""
    rows = []
    for case in sorted(cases, key=lambda c: c.dice):
        label = "-" if case.tb_label is None else ("TB" if case.tb_label else "normal")
        rows.append(
            f"<tr><td>{html.escape(case.case_id)}</td><td>{html.escape(case.source)}</td>"
            f"<td>{case.dice:.4f}</td><td>{case.tb_score:.3f}</td><td>{label}</td>"
            f'<td><a href="{html.escape(case.file_name)}"><img src="{html.escape(case.file_name)}" '
            f'alt="{html.escape(case.case_id)}" width="768"></a></td></tr>')
    page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>cxrnode evaluation overlays</title>"
            "<style>body{font-family:sans-serif;background:#111;color:#eee}td{padding:4px 8px;"
            "vertical-align:top}th{text-align:left}</style></head><body>"
            "<h1>Lung segmentation, worst case first</h1><p>Research use only. NOT FOR DIAGNOSIS.</p>"
            "<table><tr><th>case</th><th>source</th><th>Dice</th><th>TB score</th><th>TB label</th>"
            "<th>prediction | reference | difference</th></tr>" + "".join(rows) + "</table></body></html>")
    index = folder / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
