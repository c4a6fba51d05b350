"""The browser harness itself: a plain DX radiograph, stored in Orthanc, is drawn by OHIF v3.

Orthanc (DICOMweb + ServeFolders) serves the patched OHIF dist and the study; headless Chromium
(puppeteer-core, ``drive.mjs``) opens it. The screenshot must show *this* radiograph where OHIF
says the image lies: the pixels inside the reported image rectangle correlate with the source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.dicom_factory import FIXTURE_DIR, make_dx
from tests.viewer.ohif import ohif_url, rendered_fraction, viewport_pixels

pytestmark = pytest.mark.e2e

SOURCE_PNG = FIXTURE_DIR / "MCUCXR_0017_0.png"


def test_dx_is_rendered_in_ohif(viewer_pacs, drive, tmp_path: Path) -> None:
    dx = make_dx(SOURCE_PNG)
    dx_file = tmp_path / "dx.dcm"
    dx.save_as(dx_file, enforce_file_format=True)
    viewer_pacs.upload(dx_file)

    dump = drive(ohif_url(viewer_pacs.base_url, dx.StudyInstanceUID), tmp_path, name="dx", wait_for="image")
    print(f"\nOHIF screenshot: {dump['screenshot']}\nviewport: {dump['viewport_screenshot']}\n"
          f"dump: {dump['json_path']}\ntimings (ms): {dump['timings_ms']}")

    assert dump["ready"], f"no image shown ({dump['not_ready_because']}); page text: {dump['body_text']!r}"
    assert dump["page_errors"] == [], dump["page_errors"]
    assert dump["console_errors"] == [], dump["console_errors"]
    assert dump["request_failures"] == [], dump["request_failures"]
    (viewport,) = dump["viewports"]
    assert viewport["image_id"] and dx.SOPInstanceUID in viewport["image_id"]
    assert viewport["image_size"] == [dx.Columns, dx.Rows]

    canvas = viewport_pixels(dump["screenshot"], viewport["canvas_rect"])
    assert canvas.shape[0] > 300 and canvas.shape[1] > 300, canvas.shape
    assert rendered_fraction(canvas) > 0.2, "the viewport canvas is (nearly) all black"

    # The radiograph itself, in place and upright (mirrored gives r = 0.82): screenshot vs source
    # inside the image rectangle OHIF reports.
    shown = viewport_pixels(dump["screenshot"], viewport["image_rect"]).astype(np.float64).mean(axis=-1)
    source = np.asarray(Image.open(SOURCE_PNG).convert("L").resize((shown.shape[1], shown.shape[0])),
                        dtype=np.float64)
    correlation = float(np.corrcoef(shown.ravel(), source.ravel())[0, 1])
    print(f"screenshot vs source inside the image rectangle: r = {correlation:.3f}")
    assert correlation > 0.95, f"screenshot does not look like the uploaded radiograph (r = {correlation:.3f})"
