"""What the radiologist sees in OHIF v3 when the node could not measure the lung areas.

A radiograph whose header has no usable pixel spacing (no Imager Pixel Spacing, no Pixel Spacing)
cannot be measured in mm², so the node leaves the lung areas out of its SR and says why. OHIF
3.13.2 labels the TB measurement with the group's *first* Comment only (a second Comment is shown
nowhere), so the node writes the reason into the TB score's one Comment:
"TB score 0.123 (threshold 0.197): Normal. Lung areas not reported: no usable Imager Pixel
Spacing or Pixel Spacing in the source image". This routes such a DX through a real
``cxrnode serve`` to the viewer's real Orthanc and asserts that OHIF's measurement panel shows the
TB score together with that reason, with no page or console error.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.viewer.ohif import ohif_url
from tests.viewer.test_ohif_quality_check import sr_comments
from tests.viewer.test_ohif_results import (
    assert_clean,
    node,  # noqa: F401  (its fixture, used here too)
    route_source_dx,
)

pytestmark = pytest.mark.e2e

SIZE = (1024, 1024)  # rows, columns: as the other OHIF tests
NOT_REPORTED = "Lung areas not reported:"


@pytest.fixture(scope="module")
def unmeasurable_case(viewer_pacs, request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, tuple[str, bytes]]]:
    """(source dataset, its results in the viewer's PACS) for a DX without any pixel spacing."""
    request.getfixturevalue("node")  # the node the PACS routes to (test_ohif_results' fixture)
    ds, results = route_source_dx(viewer_pacs, tmp_path_factory.mktemp("no-spacing"), "no-spacing", size=SIZE,
                                  pixel_spacing=None)
    assert "ImagerPixelSpacing" not in ds and "PixelSpacing" not in ds
    return ds, results


def test_sr_shows_why_the_lung_areas_are_missing_beside_the_tb_score(viewer_pacs, drive, unmeasurable_case,
                                                                       tmp_path: Path) -> None:
    ds, results = unmeasurable_case
    comments = sr_comments(dcmread(io.BytesIO(results["sr"][1])))
    # The SR has one Comment (the TB group's): the score, then why the areas are missing.
    (comment,) = comments
    assert comment.startswith("TB score ") and NOT_REPORTED in comment, comment
    dump = drive(ohif_url(viewer_pacs.base_url, ds.StudyInstanceUID), tmp_path, name="sr-no-areas",
                 open_series=results["sr"][0], wait_for="sr", panel="measurements", settle_ms=2500)
    labels = [m["label"] for m in dump["measurements"]]
    text = (dump["panel"] or {}).get("text", "")
    print(f"\nOHIF with the SR without lung areas: {dump['screenshot']}\nmeasurement labels: {labels}\n"
          f"panel text: {text!r}")
    assert_clean(dump)
    # The TB finding is listed, labelled with the whole Comment: score and reason in one label ...
    (tb,) = [m for m in dump["measurements"] if (m["label"] or "").startswith("TB score ")]
    assert tb["label"] == comment, tb
    assert tb["display_text"]["primary"] == [comment], tb
    # ... and the panel shows both: the TB score with its threshold, and why there are no areas.
    for expected in ("TB score ", "(threshold ", NOT_REPORTED, "no usable Imager Pixel Spacing or Pixel Spacing"):
        assert expected in text, (expected, text)
    assert comment in text, text
    assert "mm²" not in text, text  # no area is shown, nor made up from the nominal spacing
