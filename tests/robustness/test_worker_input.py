"""Unexpected input that the listener accepts: each is processed correctly or discarded with the
reason. The real networks run in-process (loaded once per session); the listener is real.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from node.cli.main import main as cxrnode
from node.dicom import Status
from node.queue.tables import Job
from tests.dicom_factory import dcmtk_compress, make_cr, make_dx, make_multiframe, montgomery_case
from tests.robustness.harness import LocalNode, PeakRss
from tests.validation import dciodvfy_errors

IMAGE, _ = montgomery_case()
SIZE = (512, 512)


def dx(**kwargs: object) -> Dataset:
    return make_dx(IMAGE, **({"size": SIZE} | kwargs))  # type: ignore[arg-type]


def received_and_processed(node: LocalNode, ds: Dataset | Path) -> Job:
    """Send, run the worker, check the node still answers; the object's job."""
    uid = str(ds.SOPInstanceUID if isinstance(ds, Dataset) else dcmread(ds, stop_before_pixels=True).SOPInstanceUID)
    assert node.send(ds) == Status.SUCCESS
    assert node.process() == 1
    assert node.echo()
    assert node.leftovers() == []
    return node.job(uid)


def lungs(node: LocalNode, job: Job) -> np.ndarray:
    """The union of both lung segments of a job's SEG, in source geometry (bool)."""
    seg = hd.seg.segread(node.archive.path(job.result("seg").path))
    frames = seg.get_pixels_by_source_instance([job.instance.sop_instance_uid],
                                               segment_numbers=[1, 2])[0]
    return frames.any(axis=-1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def assert_discarded(job: Job, *words: str) -> None:
    assert job.status == "discarded", (job.status, job.last_error)
    assert job.results == []
    assert all(w in (job.discard_reason or "") for w in words), job.discard_reason
    (event,) = [e for e in job.events if e.outcome == "discarded"]
    assert event.message == job.discard_reason


@pytest.fixture(scope="module")
def reference_lungs(tmp_path_factory: pytest.TempPathFactory, analyzer) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Lungs found on the plain 12-bit MONOCHROME2 native DX: what every encoding must give."""
    node = LocalNode.start(tmp_path_factory.mktemp("reference") / "var", analyzer)
    try:
        job = received_and_processed(node, dx())
        assert job.status == "done"
        return lungs(node, job)
    finally:
        node.stop()


# --- processed correctly -------------------------------------------------------------------

@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                                    JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, JPEG2000,
                                    RLELossless], ids=lambda s: s.name)
def test_compressed_transfer_syntax_is_processed(node: LocalNode, tmp_path: Path,
                                                 reference_lungs: np.ndarray, syntax: str) -> None:
    if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1):
        bits = 8 if syntax == JPEGBaseline8Bit else 12
        ds = dcmtk_compress(dx(bits_stored=bits), syntax, tmp_path)
    elif syntax == JPEG2000:
        ds = dx()
        ds.compress(JPEG2000, j2k_cr=[20], use_mct=False)
    else:
        ds = dx(transfer_syntax=syntax)
    job = received_and_processed(node, ds)
    assert job.instance.transfer_syntax_uid == syntax  # archived as sent
    assert job.status == "done", job.last_error
    assert dice(lungs(node, job), reference_lungs) >= 0.95


@pytest.mark.parametrize(("photometric", "bits"), [("MONOCHROME1", 12), ("MONOCHROME2", 8),
                                                   ("MONOCHROME2", 16), ("MONOCHROME1", 16)])
def test_photometric_and_bit_depth_are_processed(node: LocalNode, reference_lungs: np.ndarray,
                                                 photometric: str, bits: int) -> None:
    job = received_and_processed(node, dx(photometric=photometric, bits_stored=bits))
    assert job.status == "done", job.last_error
    assert dice(lungs(node, job), reference_lungs) >= 0.95


def test_4096_square_16_bit_is_processed_with_sane_memory(node: LocalNode) -> None:
    ds = make_dx(IMAGE, size=(4096, 4096), bits_stored=16)
    uid = str(ds.SOPInstanceUID)
    assert node.send(ds) == Status.SUCCESS
    del ds
    with PeakRss() as rss:
        assert node.process() == 1
    job = node.job(uid)
    assert job.status == "done", job.last_error
    assert lungs(node, job).shape == (4096, 4096)
    # 32 MiB of pixels: the worker's extra memory stays a small multiple of the image
    assert rss.growth < 1.5 * 2**30, f"worker grew by {rss.growth / 2**20:.0f} MiB"
    assert node.echo()


NO_SPACING_REASON = "Lung areas not reported: no usable Imager Pixel Spacing or Pixel Spacing in the source image"


def tb_comments(sr: hd.sr.Comprehensive3DSR) -> list[str]:
    """The TEXT Comments (DCM 121106) of the SR's TB group, in order."""
    (group,) = [g for g in sr.content.get_image_measurement_groups() if g.finding_type.value == "56717001"]
    return [str(item.TextValue) for item in group[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "121106"]


@pytest.mark.parametrize("case", ["cr", "dx", "dx-inverted"])
def test_no_pixel_spacing_gives_results_without_areas(node: LocalNode, case: str) -> None:
    if case == "cr":
        ds = make_cr(IMAGE, size=SIZE, pixel_spacing=None)
    else:  # a DX without Imager Pixel Spacing (Type 1 there, but such headers occur); inverted: implausible lungs
        pixels = np.asarray(Image.open(IMAGE).convert("L"))
        ds = make_dx(255 - pixels if case == "dx-inverted" else pixels, size=SIZE, pixel_spacing=None)
    job = received_and_processed(node, ds)
    assert job.status == "done", job.last_error
    data = node.archive.read(job.result("sr").path)
    assert dciodvfy_errors(data) == []
    sr = hd.sr.srread(node.archive.path(job.result("sr").path))
    for group in sr.content.get_planar_roi_measurement_groups():
        assert [m for m in group.get_measurements() if m.name.meaning == "Area"] == []
    # One Comment in the TB group (OHIF v3 shows only a group's first): the score, then why no areas.
    (comment,) = tb_comments(sr)
    assert comment.startswith(f"TB score {job.tb_score:.3f} (threshold "), comment
    assert f"): Abnormal. {NO_SPACING_REASON}" in comment or f"): Normal. {NO_SPACING_REASON}" in comment, comment
    if case == "dx-inverted":
        assert comment.endswith("check the lung outlines before relying on them or on the TB score"), comment
        assert f"{NO_SPACING_REASON}. Quality check: lung segmentation implausible" in comment, comment
    else:
        assert comment.endswith(NO_SPACING_REASON), comment


def test_random_pixels_of_the_right_length_are_processed(node: LocalNode) -> None:
    ds = dx()
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, SIZE, dtype=np.uint16).tobytes()
    job = received_and_processed(node, ds)
    # noise is a readable image: it is analysed (no lungs to find), and valid results are made
    assert job.status == "done", job.last_error
    assert job.tb_score is not None and 0.0 <= job.tb_score <= 1.0


# --- stored, then discarded with the reason ------------------------------------------------

def _short_pixels(ds: Dataset) -> None:
    ds.PixelData = bytes(ds.PixelData)[: len(ds.PixelData) // 3]


def _odd_pixels(ds: Dataset) -> None:
    ds.PixelData = bytes(ds.PixelData)[:-3] + b"\x00"  # odd length is padded: still short


def _garbage_jpeg2000(ds: Dataset) -> None:
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 40])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless


def _panicking_rle(ds: Dataset) -> None:
    """RLE whose second segment starts 100 bytes early: pylibjpeg-rle panics (a BaseException)."""
    rle = dx(bits_stored=16, transfer_syntax=RLELossless)
    frame = b"".join(next(generate_fragmented_frames(rle.PixelData)))
    (second,) = struct.unpack("<I", frame[8:12])
    ds.PixelData = encapsulate([frame[:8] + struct.pack("<I", second - 100) + frame[12:]])
    ds["PixelData"].VR = "OB"
    ds.BitsStored, ds.HighBit = 16, 15
    ds.file_meta.TransferSyntaxUID = RLELossless


def _huge_header(ds: Dataset) -> None:
    ds.Rows = ds.Columns = 60_000  # would be 6.7 GiB as float64: refused before decoding


def _no(keyword: str):  # type: ignore[no-untyped-def]
    def remove(ds: Dataset) -> None:
        del ds[keyword]
    return remove


@pytest.mark.parametrize(("mutate", "words"), [
    (_short_pixels, ["unreadable pixel data"]),
    (_odd_pixels, ["unreadable pixel data"]),
    (_garbage_jpeg2000, ["unreadable pixel data", "cannot be decoded"]),
    (_panicking_rle, ["unreadable pixel data", "PanicException"]),
    (_huge_header, ["Rows 60000 is larger than 8192"]),
    (_no("PixelData"), ["Pixel Data is missing"]),
    (_no("Rows"), ["Rows is missing"]),
    (_no("Columns"), ["Columns is missing"]),
], ids=["short-pixel-data", "odd-pixel-data", "garbage-jpeg2000", "panicking-rle", "huge-header",
        "no-pixel-data", "no-rows",
        "no-columns"])
def test_unreadable_pixels_are_discarded_with_the_reason(node: LocalNode, mutate, words) -> None:  # type: ignore[no-untyped-def]
    ds = dx()
    mutate(ds)
    assert_discarded(received_and_processed(node, ds), *words)


def test_multi_frame_is_discarded_with_the_reason(node: LocalNode) -> None:
    # a documented choice (node.imaging.display_pixels): never guess which frame to analyse
    job = received_and_processed(node, make_multiframe(dx(), frames=3))
    assert_discarded(job, "multi-frame objects are not supported (3 frames)")


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("view_position", "LL", "ViewPosition LL is not one of PA, AP"),
    ("view_position", "RL", "ViewPosition RL is not one of PA, AP"),
    ("body_part", "HAND", "BodyPartExamined HAND is not one of CHEST, THORAX, LUNG"),
])
def test_out_of_scope_view_or_body_part_is_discarded(node: LocalNode, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     field: str, value: str, reason: str) -> None:
    job = received_and_processed(node, dx(**{field: value}))
    assert_discarded(job, reason)
    assert node.archive.list(node.archive.results_prefix(job.id)) == []
    assert node.archive.exists(job.instance.path)  # stored: the object is kept
    # and the operator sees why, with the real CLI against the same data folder
    config = tmp_path / "cxrnode.toml"
    config.write_text(f'[node]\ndata_dir = "{node.settings.data_path}"\n')
    assert cxrnode(["jobs", "show", str(job.id), "--json", "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "discarded" and shown["discard_reason"] == reason
    assert ("select", "discarded") in [(s["step"], s["outcome"]) for s in shown["steps"]]


# --- header values the result encoders need ----------------------------------------------

@pytest.mark.parametrize(("charset", "status"), [
    ("", "done"),                          # empty: the default repertoire
    (["", "ISO 2022 IR 87"], "done"),      # "\ISO 2022 IR 87", common in Japan
    ("ISO_IR 999", "discarded"),           # not a defined term: discarded with the reason
])
def test_specific_character_set(node: LocalNode, charset: str | list[str], status: str) -> None:
    ds = dx()
    ds.SpecificCharacterSet = charset
    job = received_and_processed(node, ds)
    assert job.status == status, job.last_error
    if status == "discarded":
        assert_discarded(job, "Specific Character Set 'ISO_IR 999' is not a DICOM defined term")


def _two_patient_names(ds: Dataset) -> None:
    ds.PatientName = ["CXRNODE^TEST", "OTHER^NAME"]  # PN is VM 1


def _study_date_as_binary(ds: Dataset) -> None:
    ds["StudyDate"].VR = "UL"
    ds.StudyDate = 60296192


@pytest.mark.parametrize("mutate", [_two_patient_names, _study_date_as_binary],
                         ids=["two-patient-names", "study-date-as-binary"])
def test_malformed_type2_values_still_get_results(node: LocalNode, mutate) -> None:  # type: ignore[no-untyped-def]
    ds = dx()
    mutate(ds)
    assert node.send(ds) == Status.SUCCESS
    node.process()
    assert node.job(str(ds.SOPInstanceUID)).status == "done"
