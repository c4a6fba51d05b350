"""What the radiologist sees: the node's SEG, SR and Secondary Capture opened in OHIF v3.

The PACS is a real Orthanc with DICOMweb that also serves OHIF; it routes each radiograph to a real
``cxrnode serve`` (real networks on the CPU), which sends its results back to it. Headless
Chromium opens the study in OHIF and the assertions are on what OHIF shows:

* the SEG hydrates with no page or console error, its labelmap holds exactly the node's pixels,
  the segment labelled "Left lung" lies on the **patient's** left, known from how the test built
  the image (not from the node's output), for PA and AP views, mirrored images and absent Patient
  Orientation, and at an image size whose bit-packed frames have an odd length;
* on the screen, the overlay changes the pixels inside each lung (towards that segment's colour)
  and nothing far outside the lungs (screenshot with the SEG against one without it);
* the SR lists both lungs with their areas and the TB result; the Secondary Capture shows the
  picture with the patient's left lung on the image's right.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from scipy import ndimage

from node.dicom import SECONDARY_CAPTURE
from tests.dicom_factory import FIXTURE_DIR, make_dx, nema_chest_cr_path, reference_lung_masks
from tests.servers import NodeProcess, Orthanc, free_port, wait_until
from tests.viewer.ohif import ohif_url, page_xy, viewport_pixels

pytestmark = pytest.mark.e2e

SOURCE_PNG = FIXTURE_DIR / "MCUCXR_0017_0.png"
MASK_PNG = FIXTURE_DIR / "MCUCXR_0017_0_mask.png"
RESULT_TIMEOUT_S = 240

# (id, view position, Patient Orientation or None, mirrored pixel data, (rows, columns))
CASES = [
    ("pa", "PA", ("L", "F"), False, (1024, 1024)),
    ("ap", "AP", ("L", "F"), False, (1024, 1024)),
    ("pa-mirrored", "PA", ("R", "F"), True, (1024, 1024)),
    ("ap-no-orientation", "AP", None, False, (1024, 1024)),
    # 1955 x 1841 like the NEMA chest CR: 1-bit frames would have an odd byte length.
    ("pa-odd-size", "PA", ("L", "F"), False, (1841, 1955)),
]


@pytest.fixture(scope="module")
def node(viewer_pacs: Orthanc, tmp_path_factory: pytest.TempPathFactory):
    """A node that sends SEG, SR and SC to the viewer's PACS, which routes radiographs to it."""
    port = free_port()
    node = NodeProcess(tmp_path_factory.mktemp("viewer-node"), port, destinations=[
        {"name": "viewer-pacs", "ae_title": viewer_pacs.aet, "host": "127.0.0.1",
         "port": viewer_pacs.dicom_port, "outputs": ["seg", "sr", "sc"]}])
    viewer_pacs._request("PUT", "/modalities/cxrnode",
                         f'{{"AET": "{node.ae_title}", "Host": "127.0.0.1", "Port": {port}}}'.encode())
    try:
        node.start()
        yield node
    finally:
        if node.proc is not None:
            node.stop()


def truth_masks(mirrored: bool, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(patient's left, patient's right) lung of the built image, from the reference mask."""
    left, right = reference_lung_masks(MASK_PNG, shape)
    return (left[:, ::-1], right[:, ::-1]) if mirrored else (left, right)


def build_case(case: tuple, tmp_path: Path) -> tuple[Any, Path]:
    name, view, orientation, mirrored, size = case
    pixels = np.asarray(Image.open(SOURCE_PNG).convert("L"))
    if mirrored:
        pixels = pixels[:, ::-1]
    options = {"view_position": view, "size": size}
    if orientation is not None:
        options["patient_orientation"] = orientation
    ds = make_dx(pixels, **options)
    if orientation is None:
        del ds.PatientOrientation
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path


def route_source_dx(pacs: Orthanc, folder: Path, name: str, invert: bool = False,
                    **dx_options: Any) -> tuple[Any, dict[str, tuple[str, bytes]]]:
    """The source radiograph as a PA DX (``make_dx`` with ``dx_options``; ``invert``: stored inverted),
    saved in ``folder`` and routed through the node: (dataset, its results as :func:`route_and_wait` gives them)."""
    pixels = np.asarray(Image.open(SOURCE_PNG).convert("L"))
    ds = make_dx(255 - pixels if invert else pixels, view_position="PA", patient_orientation=("L", "F"), **dx_options)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, route_and_wait(pacs, path, ds.StudyInstanceUID)


def series_uid(pacs: Orthanc, series_id: str) -> str:
    return str(pacs.get(f"/series/{series_id}")["MainDicomTags"]["SeriesInstanceUID"])


def route_and_wait(pacs: Orthanc, path: Path, study_uid: str) -> dict[str, tuple[str, bytes]]:
    """Store ``path`` in the PACS, route it to the node, wait for SEG, SR and SC: kind -> (series, file)."""
    instance = pacs.upload(path)
    answer = pacs.post("/modalities/cxrnode/store", {"Resources": [instance], "Synchronous": True})
    assert answer["FailedInstancesCount"] == 0, answer

    def arrived() -> dict[str, str] | None:
        found = {kind: pacs.series_of_study(study_uid, modality) for kind, modality in
                 (("seg", "SEG"), ("sr", "SR"), ("sc", "OT"))}
        return {k: v[0] for k, v in found.items()} if all(found.values()) else None

    series = wait_until(arrived, RESULT_TIMEOUT_S, what="SEG, SR and SC in the viewer's PACS")
    return {kind: (series_uid(pacs, sid), pacs.instance_files(sid)[0]) for kind, sid in series.items()}


def image_grid(dump: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """The screenshot inside the image rectangle OHIF reports, resampled to ``shape`` (rows, columns)."""
    (viewport,) = dump["viewports"]
    crop = viewport_pixels(dump["screenshot"], viewport["image_rect"])
    return np.asarray(Image.fromarray(crop).resize(shape[::-1], Image.Resampling.BILINEAR)).astype(float)


def visible_box(viewport: dict[str, Any]) -> tuple[float, float, float, float]:
    """The part of the image (column0, row0, column1, row1, image pixels) shown inside the canvas."""
    canvas, (x0, y0) = viewport["canvas_rect"], viewport["image_to_page"]["origin"]
    column_step, row_step = viewport["image_to_page"]["column_step"][0], viewport["image_to_page"]["row_step"][1]
    columns, rows = viewport["image_size"]
    return (max(0.0, (canvas["x"] - x0) / column_step), max(0.0, (canvas["y"] - y0) / row_step),
            min(float(columns), (canvas["x"] + canvas["width"] - x0) / column_step),
            min(float(rows), (canvas["y"] + canvas["height"] - y0) / row_step))


#: OHIF's viewport overlay text (date, W/L, image number) sits in these screen bands of the canvas.
OVERLAY_TEXT_BANDS_PX = (40, 45)


def common_view(dumps: list[dict[str, Any]], cell: int = 4
                ) -> tuple[tuple[int, int, int, int], list[np.ndarray], np.ndarray]:
    """The image region every dump shows, each screenshot of it on one grid (``cell`` image px a
    cell), and the grid cells under OHIF's overlay text in any of them.

    OHIF may fit the image differently in two page loads (panel opened before or after the image
    was fitted): each screenshot is mapped back to image pixels through its own viewport geometry.
    """
    boxes = [visible_box(d["viewports"][0]) for d in dumps]
    c0, r0 = (int(np.ceil(max(b[i] for b in boxes))) for i in (0, 1))
    c1, r1 = (int(np.floor(min(b[i] for b in boxes))) for i in (2, 3))
    c1, r1 = c0 + (c1 - c0) // cell * cell, r0 + (r1 - r0) // cell * cell
    grids = []
    for dump in dumps:
        (viewport,) = dump["viewports"]
        (x0, y0), column_step = viewport["image_to_page"]["origin"], viewport["image_to_page"]["column_step"][0]
        row_step = viewport["image_to_page"]["row_step"][1]
        rect = {"x": x0 + c0 * column_step, "y": y0 + r0 * row_step,
                "width": (c1 - c0) * column_step, "height": (r1 - r0) * row_step}
        crop = Image.fromarray(viewport_pixels(dump["screenshot"], rect))
        size = ((c1 - c0) // cell, (r1 - r0) // cell)
        grids.append(np.asarray(crop.resize(size, Image.Resampling.BOX)).astype(float))
    under_text = np.zeros(grids[0].shape[:2], dtype=bool)
    for dump in dumps:
        (viewport,) = dump["viewports"]
        canvas, y0 = viewport["canvas_rect"], viewport["image_to_page"]["origin"][1]
        page_y = y0 + (r0 + (np.arange(under_text.shape[0]) + 0.5) * cell) * viewport["image_to_page"]["row_step"][1]
        top, bottom = OVERLAY_TEXT_BANDS_PX
        under_text |= ((page_y < canvas["y"] + top) | (page_y > canvas["y"] + canvas["height"] - bottom))[:, None]
    return (c0, r0, c1, r1), grids, under_text


def shrink(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1])) > 127


def assert_clean(dump: dict[str, Any]) -> None:
    assert dump["harness_errors"] == [], dump["harness_errors"]
    assert dump["ready"], f"OHIF not ready ({dump['not_ready_because']}); page text: {dump['body_text']!r}"
    assert dump["page_errors"] == [], dump["page_errors"]
    assert dump["console_errors"] == [], dump["console_errors"]
    assert dump["request_failures"] == [], dump["request_failures"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_seg_overlays_each_lung_on_the_patients_side(viewer_pacs, node, drive, case, tmp_path: Path) -> None:
    name, _, _, mirrored, _ = case
    ds, path = build_case(case, tmp_path)
    results = route_and_wait(viewer_pacs, path, ds.StudyInstanceUID)
    seg = hd.seg.segread(io.BytesIO(results["seg"][1]))
    node_masks = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1, 2])[0] > 0
    node_left, node_right = node_masks[..., 0], node_masks[..., 1]

    plain = drive(ohif_url(viewer_pacs.base_url, ds.StudyInstanceUID, ds.SeriesInstanceUID), tmp_path,
                  name=f"{name}-image", wait_for="image", panel="segmentation")  # the same layout
    shown = drive(ohif_url(viewer_pacs.base_url, ds.StudyInstanceUID), tmp_path, name=f"{name}-seg",
                  open_series=results["seg"][0], wait_for="seg", panel="segmentation")
    print(f"\n{name}: OHIF with SEG {shown['screenshot']} (without: {plain['screenshot']})")
    assert_clean(plain)
    assert_clean(shown)

    # The labelmap OHIF holds is exactly the node's SEG, on the source image's grid.
    (segmentation,) = shown["segmentations"]
    assert (segmentation["labelmap"]["width"], segmentation["labelmap"]["height"]) == (ds.Columns, ds.Rows)
    segments = {s["label"]: s for s in segmentation["segments"] if s["pixel_count"]}
    assert set(segments) == {"Left lung", "Right lung"}, segmentation["segments"]
    for label, mask in (("Left lung", node_left), ("Right lung", node_right)):
        rows, columns = np.nonzero(mask)
        assert segments[label]["pixel_count"] == int(mask.sum())
        assert segments[label]["bbox"] == {"x_min": int(columns.min()), "x_max": int(columns.max()),
                                           "y_min": int(rows.min()), "y_max": int(rows.max())}

    # "Left lung" is the patient's left lung, known from how the image was built.
    true_left, true_right = truth_masks(mirrored, (ds.Rows, ds.Columns))
    for label, truth in (("Left lung", true_left), ("Right lung", true_right)):
        truth_x = float(np.nonzero(truth)[1].mean())
        assert abs(segments[label]["centroid"]["x"] - truth_x) < 0.05 * ds.Columns, (label, truth_x)
    (viewport,) = shown["viewports"]
    left_x, _ = page_xy(viewport, segments["Left lung"]["centroid"]["x"], segments["Left lung"]["centroid"]["y"])
    right_x, _ = page_xy(viewport, segments["Right lung"]["centroid"]["x"], segments["Right lung"]["centroid"]["y"])
    assert (left_x > right_x) == (not mirrored), "the left lung is drawn on the wrong side of the screen"

    # On screen: the overlay tints the inside of each lung towards its colour, and nothing far away.
    (c0, r0, c1, r1), (before, after), under_text = common_view([plain, shown])
    assert (c1 - c0) * (r1 - r0) > 0.6 * ds.Columns * ds.Rows, "most of the image is off screen"
    grid = before.shape[:2]
    # The radiograph is grey; the overlay adds colour. Grey-level differences (the image resampled
    # at another zoom) are not the overlay.
    chroma = lambda rgb: rgb.max(axis=-1) - rgb.min(axis=-1)  # noqa: E731
    changed = chroma(after) - chroma(before) > 25
    for label, whole in (("Left lung", node_left), ("Right lung", node_right)):
        mask = whole[r0:r1, c0:c1]
        inside = ndimage.binary_erosion(shrink(mask, grid), iterations=3)
        assert changed[inside].mean() > 0.9, f"{label}: only {changed[inside].mean():.0%} of it is drawn"
        colour = np.asarray(segments[label]["color"][:3], dtype=float)
        delta = (after - before)[inside].mean(axis=0)
        assert np.corrcoef(delta, colour - before[inside].mean(axis=0))[0, 1] > 0.9, (label, delta, colour)
    far = ~ndimage.binary_dilation(shrink((node_left | node_right)[r0:r1, c0:c1], grid), iterations=6) & ~under_text
    assert changed[far].mean() < 0.02, f"{changed[far].mean():.1%} of the image outside the lungs changed"


def test_sr_lists_both_lungs_and_the_tb_result(viewer_pacs, node, drive, tmp_path: Path) -> None:
    ds, path = build_case(("sr", "PA", ("L", "F"), False, (1024, 1024)), tmp_path)
    results = route_and_wait(viewer_pacs, path, ds.StudyInstanceUID)
    dump = drive(ohif_url(viewer_pacs.base_url, ds.StudyInstanceUID), tmp_path, name="sr",
                 open_series=results["sr"][0], wait_for="sr", panel="measurements", settle_ms=2500)
    print(f"\nOHIF with SR: {dump['screenshot']}")
    assert_clean(dump)
    labels = sorted(m["label"] for m in dump["measurements"])
    assert labels[:2] == ["Left lung", "Right lung"] and len(labels) == 3, dump["measurements"]
    assert labels[2].startswith("TB score ") and "(threshold " in labels[2], labels
    text = dump["panel"]["text"]
    for expected in ("Left lung", "Right lung", "mm²", "TB score", "threshold"):
        assert expected in text, text
    # OHIF recomputes each area from the outline polyline: it must agree with the SR's own Area.
    ours = sr_areas(dcmread(io.BytesIO(results["sr"][1])))
    for m in dump["measurements"]:
        if m["label"] in ours:
            assert m["points_count"] > 10, m
            shown_mm2 = float(m["display_text"]["primary"][0].split()[0])
            assert abs(shown_mm2 - ours[m["label"]]) < 0.05 * ours[m["label"]], (m, ours)


def sr_areas(sr: Any) -> dict[str, float]:
    """{lung name: Area NUM in mm²} from our SR (each outline group's Comment names its lung)."""
    areas, stack = {}, list(sr.ContentSequence)
    while stack:
        item = stack.pop()
        children = list(item.get("ContentSequence", []))
        stack.extend(children)
        names = [c.TextValue for c in children if c.ValueType == "TEXT" and c.TextValue in ("Left lung", "Right lung")]
        for child in children:
            if child.ValueType == "NUM" and child.ConceptNameCodeSequence[0].CodeMeaning == "Area" and names:
                areas[names[0]] = float(child.MeasuredValueSequence[0].NumericValue)
    return areas


def test_secondary_capture_shows_the_overlay_picture(viewer_pacs, node, drive, tmp_path: Path) -> None:
    ds, path = build_case(("sc", "PA", ("L", "F"), False, (1024, 1024)), tmp_path)
    results = route_and_wait(viewer_pacs, path, ds.StudyInstanceUID)
    sc = dcmread(io.BytesIO(results["sc"][1]))
    assert sc.SOPClassUID == SECONDARY_CAPTURE
    dump = drive(ohif_url(viewer_pacs.base_url, ds.StudyInstanceUID), tmp_path, name="sc",
                 open_series=results["sc"][0], wait_for="image")
    print(f"\nOHIF with the Secondary Capture: {dump['screenshot']}")
    assert_clean(dump)
    (viewport,) = dump["viewports"]
    assert sc.SOPInstanceUID in viewport["image_id"] and viewport["image_size"] == [sc.Columns, sc.Rows]
    shown = image_grid(dump, (sc.Rows // 4, sc.Columns // 4))
    picture = np.asarray(Image.fromarray(sc.pixel_array).resize((sc.Columns // 4, sc.Rows // 4))).astype(float)
    assert np.corrcoef(shown.ravel(), picture.ravel())[0, 1] > 0.95  # the picture itself, upright
    radiograph = shown[-(sc.Columns // 4):]  # below the caption band
    greenish = (radiograph[..., 1] - np.maximum(radiograph[..., 0], radiograph[..., 2])) > 25
    half = radiograph.shape[1] // 2
    assert greenish[:, half:].sum() > 20 * max(1, greenish[:, :half].sum())  # patient's left on the right


def test_nema_chest_cr_seg_loads(viewer_pacs, node, drive, tmp_path: Path) -> None:
    """The real NEMA chest CR (JPEG 2000, 1955 x 1841): its SEG, FRACTIONAL because 1-bit frames
    would have an odd length, loads from Orthanc 1.10 into OHIF with the node's exact pixels.

    Only OHIF's state is asserted here: OHIF 3.13.2 draws this CR itself black (its thumbnail
    too, with or without a SEG), so its screen shows nothing to compare; the odd size is checked on
    the screen with the 1955 x 1841 DX above.
    """
    source = nema_chest_cr_path()
    ds = dcmread(source)
    results = route_and_wait(viewer_pacs, source, ds.StudyInstanceUID)
    seg = hd.seg.segread(io.BytesIO(results["seg"][1]))
    assert seg.SegmentationType == "FRACTIONAL"
    masks = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1, 2])[0] > 0
    dump = drive(ohif_url(viewer_pacs.base_url, ds.StudyInstanceUID), tmp_path, name="nema-seg",
                 open_series=results["seg"][0], wait_for="seg", panel="segmentation", timeout_s=90)
    print(f"\nOHIF with the NEMA CR's SEG: {dump['screenshot']}")
    assert_clean(dump)
    (segmentation,) = dump["segmentations"]
    assert (segmentation["labelmap"]["width"], segmentation["labelmap"]["height"]) == (ds.Columns, ds.Rows)
    counts = {s["label"]: s["pixel_count"] for s in segmentation["segments"]}
    assert counts == {"Left lung": int(masks[..., 0].sum()), "Right lung": int(masks[..., 1].sum())}
