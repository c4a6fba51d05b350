"""What the radiologist sees in OHIF v3 when the lung segmentation failed the plausibility check.

A radiograph whose pixels are stored inverted under a MONOCHROME2 header (how inverted polarity
reaches a node) makes the lung segmentation implausible (models.plausibility). The node still sends
its SEG, SR and Secondary Capture, and says so: in the SR beside the TB score, and in amber in the
SC's caption. This routes such a radiograph through a real ``cxrnode serve`` to the viewer's real
Orthanc and asserts on what OHIF shows, with no page or console error:

* the SR's measurement panel shows the quality-check warning **and** the TB score. OHIF 3.13.2
  labels the TB measurement with the group's *first* Comment only (a second Comment is shown
  nowhere, one before the score's would hide the score), so the node writes both into one Comment:
  "TB score 0.999 (threshold 0.197): Abnormal. Quality check: lung segmentation implausible ...".
  On the image, the arrow's label is that one long line, cut at the canvas edge;
* the Secondary Capture shows the amber warning line in its caption band, above the radiograph,
  at the rows where the node drew it. Part of it is covered, though (not asserted: it depends on
  when OHIF draws its own controls): OHIF opens its cine player for Modality OT over the top of the
  viewport, right on the words "implausible (plausibility"; stored as Modality DX, the same picture
  shows whole, but an SC that looks like a radiograph could be routed back to the node.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from node.dicom import SECONDARY_CAPTURE
from node.results.picture import QUALITY_CHECK
from tests.viewer.ohif import ohif_url, viewport_pixels
from tests.viewer.test_ohif_results import (
    assert_clean,
    node,  # noqa: F401  (its fixture, used here too)
    route_source_dx,
)

pytestmark = pytest.mark.e2e

SIZE = (1024, 1024)  # rows, columns: as the other OHIF tests


@pytest.fixture(scope="module")
def inverted_case(viewer_pacs, request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, tuple[str, bytes]]]:
    """(source dataset, its results in the viewer's PACS) for a radiograph stored inverted."""
    request.getfixturevalue("node")  # the node the PACS routes to (test_ohif_results' fixture)
    return route_source_dx(viewer_pacs, tmp_path_factory.mktemp("inverted"), "inverted", invert=True, size=SIZE)


def sr_comments(sr: Any) -> list[str]:
    """Every TEXT Comment (DCM 121106) of the SR, depth first."""
    found, stack = [], list(reversed(sr.ContentSequence))
    while stack:
        item = stack.pop()
        concept = item.get("ConceptNameCodeSequence")
        if item.ValueType == "TEXT" and concept and concept[0].CodeValue == "121106":
            found.append(str(item.TextValue))
        stack.extend(reversed(list(item.get("ContentSequence", []))))
    return found


def quality_warnings(comments: list[str]) -> list[str]:
    return [c[c.index(QUALITY_CHECK):] for c in comments if QUALITY_CHECK in c]


def amber(rgb: np.ndarray) -> np.ndarray:
    """Pixels near the caption warning's amber (255, 191, 0), allowing for resampling on the screen."""
    rgb = rgb.astype(int)
    return (rgb[..., 0] > 190) & (rgb[..., 1] > 120) & (rgb[..., 1] < 225) & (rgb[..., 2] < 90) \
        & (rgb[..., 0] - rgb[..., 1] > 35)


def test_sr_shows_the_quality_warning_and_the_tb_score(viewer_pacs, drive, inverted_case, tmp_path: Path) -> None:
    ds, results = inverted_case
    warnings = quality_warnings(sr_comments(dcmread(io.BytesIO(results["sr"][1]))))
    assert len(warnings) == 1 and "implausible" in warnings[0], warnings  # the case is one the node flags
    dump = drive(ohif_url(viewer_pacs.base_url, ds.StudyInstanceUID), tmp_path, name="sr-quality",
                 open_series=results["sr"][0], wait_for="sr", panel="measurements", settle_ms=2500)
    labels = [m["label"] for m in dump["measurements"]]
    text = (dump["panel"] or {}).get("text", "")
    print(f"\nOHIF with the flagged SR: {dump['screenshot']}\nmeasurement labels: {labels}\npanel text: {text!r}")
    assert_clean(dump)
    assert sorted(labels)[:2] == ["Left lung", "Right lung"] and len(labels) == 3, dump["measurements"]
    # The panel says both: the TB score with its threshold, and that it must not be relied on.
    for expected in ("TB score ", "(threshold ", QUALITY_CHECK, "implausible", "check the lung outlines"):
        assert expected in text, (expected, text)
    (tb,) = [m for m in dump["measurements"] if m["label"] not in ("Left lung", "Right lung")]
    assert tb["label"].startswith("TB score ") and tb["label"].endswith(warnings[0]), tb  # both, in one label
    # The panel row's title cuts the label with an ellipsis after "Quality..."; the line below it
    # (the measurement's primary display text) wraps and shows all of it.
    assert tb["display_text"]["primary"] == [tb["label"]], tb
    assert warnings[0] in text, text


@pytest.fixture(scope="module")
def sc_on_screen(viewer_pacs, drive, inverted_case, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Any, dict[str, Any], np.ndarray]:
    """(the SC, OHIF's dump with the SC opened, the screenshot inside the SC's image rectangle)."""
    ds, results = inverted_case
    folder = tmp_path_factory.mktemp("sc-quality")
    (folder / "sc-quality.dcm").write_bytes(results["sc"][1])  # beside the screenshots, to compare
    sc = dcmread(io.BytesIO(results["sc"][1]))
    dump = drive(ohif_url(viewer_pacs.base_url, ds.StudyInstanceUID), folder, name="sc-quality",
                 open_series=results["sc"][0], wait_for="image")
    print(f"\nOHIF with the flagged Secondary Capture: {dump['screenshot']}")
    viewports = dump["viewports"]
    rect = viewports[0].get("image_rect") if viewports else None  # none: the tests fail in assert_clean
    shown = viewport_pixels(dump["screenshot"], rect) if rect else np.zeros((0, 0, 3), dtype=np.uint8)
    return sc, dump, shown


def test_secondary_capture_shows_the_amber_warning_in_its_caption(sc_on_screen) -> None:
    sc, dump, shown = sc_on_screen
    assert sc.SOPClassUID == SECONDARY_CAPTURE
    band = sc.Rows - sc.Columns  # the caption band above the (square) radiograph
    drawn = amber(sc.pixel_array)
    rows = np.nonzero(drawn.any(axis=1))[0]
    assert drawn[band:].sum() == 0 and rows.size, "the node drew no amber line in the caption band"
    assert_clean(dump)
    (viewport,) = dump["viewports"]
    assert sc.SOPInstanceUID in viewport["image_id"] and viewport["image_size"] == [sc.Columns, sc.Rows]
    scale = shown.shape[0] / sc.Rows  # screen px per picture row
    on_screen = amber(shown)
    screen_rows = np.nonzero(on_screen.any(axis=1))[0]
    print(f"amber pixels: {int(drawn.sum())} in the SC (rows {rows.min()}-{rows.max()} of a {band}-row band), "
          f"{int(on_screen.sum())} on the screen (rows {screen_rows.min() if screen_rows.size else None}-"
          f"{screen_rows.max() if screen_rows.size else None} of {shown.shape[0]}, scale {scale:.2f})")
    # Visible: a good part of the drawn warning, allowing for the smaller scale on the screen ...
    assert on_screen.sum() > 0.3 * drawn.sum() * scale ** 2, (int(on_screen.sum()), int(drawn.sum()), scale)
    # ... in the caption band, at the rows of the warning line, and nowhere on the radiograph.
    assert on_screen[int(np.ceil(band * scale)) + 2:].sum() == 0
    margin = 3
    assert screen_rows.min() >= rows.min() * scale - margin and screen_rows.max() <= rows.max() * scale + margin
