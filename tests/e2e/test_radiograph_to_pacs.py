"""The product's spine, for real: a radiograph reaches cxrnode, its SEG and SR land in Orthanc.

Orthanc (Debian package) is the PACS, dcmtk's ``storescu`` and Orthanc's own C-STORE SCU are the
senders, the node runs the real networks on the CPU, and dciodvfy checks what comes back.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from node.dicom import SECONDARY_CAPTURE
from tests.dicom_factory import make_dx, make_secondary_capture_film, nema_chest_cr_path
from tests.servers import NodeProcess, Orthanc, dcmtk, free_port, wait_until
from tests.validation import dciodvfy_errors

pytestmark = pytest.mark.e2e

DATA = Path(__file__).resolve().parents[1] / "data"
RESULT_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def pacs_and_node(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc as the PACS (SEG + SR), a second Orthanc as a viewer that cannot show a SEG (SC only)."""
    work = tmp_path_factory.mktemp("e2e")
    node_port, http_port, dicom_port = free_port(), free_port(), free_port()
    orthanc = Orthanc(work / "orthanc", http_port, dicom_port, modalities={
        "cxrnode": {"AET": "CXRNODE", "Host": "127.0.0.1", "Port": node_port}})
    legacy = Orthanc(work / "legacy", free_port(), free_port(), aet="LEGACY")
    orthanc.start()
    legacy.start()
    node = NodeProcess(work / "node", node_port, destinations=[
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port},
        {"name": "legacy", "ae_title": "LEGACY", "host": "127.0.0.1", "port": legacy.dicom_port,
         "outputs": ["sc"]}])
    try:
        node.start()
        yield orthanc, node, legacy
    finally:
        if node.proc is not None:
            node.stop()
        orthanc.stop()
        legacy.stop()


def wait_for_results(orthanc: Orthanc, study_uid: str) -> tuple[bytes, bytes]:
    """The SEG and SR files filed in ``study_uid``, once both have arrived."""
    seg_series, sr_series = orthanc.wait_for_result_series(study_uid, RESULT_TIMEOUT_S)
    assert len(seg_series) == 1 and len(sr_series) == 1
    (seg,), (sr,) = orthanc.instance_files(seg_series[0]), orthanc.instance_files(sr_series[0])
    return seg, sr


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def job_for(node: NodeProcess, sop_instance_uid: str) -> dict:
    listing = node.cli("jobs", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    (job,) = [j for j in json.loads(listing.stdout) if j["sop_instance_uid"] == sop_instance_uid]
    return job


def test_nema_chest_cr_sent_with_storescu(pacs_and_node, tmp_path: Path) -> None:
    orthanc, node, _ = pacs_and_node
    source = nema_chest_cr_path()
    ds = dcmread(source)
    orthanc.upload(source)  # the PACS holds the study the results must file into

    sent = subprocess.run([dcmtk("storescu"), "-xw", "-aet", "DCMTKSCU", "-aec", node.ae_title,
                           "127.0.0.1", str(node.port), str(source)],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    seg_bytes, sr_bytes = wait_for_results(orthanc, ds.StudyInstanceUID)
    assert dciodvfy_errors(seg_bytes) == []
    assert dciodvfy_errors(sr_bytes) == []

    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    assert seg.StudyInstanceUID == ds.StudyInstanceUID
    assert seg.PatientID == ds.PatientID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Left lung", "Right lung"]
    lungs = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1, 2])[0]
    assert lungs.shape == (ds.Rows, ds.Columns, 2)
    fraction = lungs.any(axis=-1).mean()
    assert 0.08 < fraction < 0.5, f"lungs cover {fraction:.1%} of the image"

    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    assert sr.StudyInstanceUID == ds.StudyInstanceUID
    # The NEMA CR's Pixel Spacing is 0.000: the areas are left out, with the reason.
    assert b"Pixel Spacing" in sr_bytes

    job = job_for(node, ds.SOPInstanceUID)
    assert job["status"] == "done"
    shown = node.cli("jobs", "show", str(job["id"]), "--json")
    assert shown.returncode == 0, shown.stderr
    steps = [(s["step"], s["outcome"]) for s in json.loads(shown.stdout)["steps"]]
    for expected in [("receive", "ok"), ("claim", "ok"), ("infer", "ok"), ("encode", "ok"),
                     ("send", "ok")]:
        assert expected in steps, steps
    status = node.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["done"] >= 1


def test_dx_routed_by_orthanc_matches_reference_mask(pacs_and_node, tmp_path: Path) -> None:
    orthanc, node, _ = pacs_and_node
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(2048, 2048))
    path = tmp_path / "dx.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    instance_id = orthanc.upload(path)

    answer = orthanc.post("/modalities/cxrnode/store",
                          {"Resources": [instance_id], "Synchronous": True})
    assert answer["InstancesCount"] == 1 and answer["FailedInstancesCount"] == 0

    seg_bytes, sr_bytes = wait_for_results(orthanc, ds.StudyInstanceUID)
    assert dciodvfy_errors(seg_bytes) == []
    assert dciodvfy_errors(sr_bytes) == []

    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    lungs = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1, 2])[0].astype(bool)
    patient_left, patient_right = lungs[..., 0], lungs[..., 1]
    # Standard PA display (PatientOrientation L\F): the patient's left lung is on the image's right.
    columns = np.arange(ds.Columns)
    assert (patient_left.sum(axis=0) * columns).sum() / patient_left.sum() > ds.Columns / 2
    assert (patient_right.sum(axis=0) * columns).sum() / patient_right.sum() < ds.Columns / 2

    union = Image.fromarray((patient_left | patient_right).astype(np.uint8) * 255)
    predicted = np.asarray(union.resize((512, 512), Image.Resampling.BILINEAR)) > 127
    reference = np.asarray(Image.open(DATA / "MCUCXR_0017_0_mask.png").convert("L")) > 127
    assert dice(predicted, reference) >= 0.9

    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2  # one per lung (its SEG segment), each with its area
    for group in groups:
        (area,) = [m for m in group.get_measurements() if m.name.meaning == "Area"]
        assert 5_000 < area.value < 60_000  # mm², an adult lung on a 0.175 mm detector
    job = job_for(node, ds.SOPInstanceUID)
    assert job["status"] == "done"

    # The preview a person looks at: green (patient's left) on the image's right, blue on its left.
    picture_file = tmp_path / "preview.png"
    shown = node.cli("jobs", "show", str(job["id"]), "--preview", str(picture_file))
    assert shown.returncode == 0, shown.stderr
    print(f"preview: {picture_file}")
    picture = np.asarray(Image.open(picture_file).convert("RGB")).astype(int)
    band = picture.shape[0] - picture.shape[1]  # the caption above the (square) radiograph
    assert picture.shape[1] == 1024 and 0 < band < 200
    caption = (picture[:band, :, 0] > 200) & (picture[:band, :, 1] < 120)  # "NOT FOR DIAGNOSIS" in red
    assert caption.sum() > 100
    picture = picture[band:]
    red, green, blue = picture[..., 0], picture[..., 1], picture[..., 2]
    greenish = (green - np.maximum(red, blue)) > 25
    blueish = (blue - np.maximum(red, green)) > 25
    half = picture.shape[1] // 2
    assert greenish[:, half:].sum() > 20 * max(1, greenish[:, :half].sum())
    assert blueish[:, :half].sum() > 20 * max(1, blueish[:, half:].sum())
    small_left = np.asarray(Image.fromarray(patient_left).resize(picture.shape[1::-1])) > 0
    assert greenish[small_left].mean() > 0.9  # the fill lies on the SEG's pixels
    missing = node.cli("jobs", "show", "99999", "--preview", str(tmp_path / "none.png"))
    assert missing.returncode == 2 and "no job 99999" in missing.stderr


def test_each_destination_gets_only_its_outputs(pacs_and_node, tmp_path: Path) -> None:
    """The SEG-less viewer's PACS receives the Secondary Capture picture and nothing else; the PACS no SC."""
    orthanc, node, legacy = pacs_and_node
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024), sop_instance_uid="1.2.826.0.1.3680043.8.498.77")
    path = tmp_path / "dx.dcm"
    ds.save_as(path, enforce_file_format=True)
    sent = subprocess.run([dcmtk("storescu"), "-aet", "DCMTKSCU", "-aec", node.ae_title,
                           "127.0.0.1", str(node.port), str(path)], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    wait_for_results(orthanc, ds.StudyInstanceUID)
    (series,) = wait_until(lambda: legacy.find("Series", {"StudyInstanceUID": ds.StudyInstanceUID}) or None,
                           RESULT_TIMEOUT_S, what="the SC in the second PACS")
    (sc_bytes,) = legacy.instance_files(series)
    sc = dcmread(io.BytesIO(sc_bytes))
    assert sc.SOPClassUID == SECONDARY_CAPTURE and sc.PhotometricInterpretation == "RGB"
    assert dciodvfy_errors(sc_bytes) == []
    job = wait_until(lambda: (j := job_for(node, ds.SOPInstanceUID))["status"] == "done" and j,
                     RESULT_TIMEOUT_S, what="the job done")
    assert len(legacy.find("Instance", {"StudyInstanceUID": ds.StudyInstanceUID})) == 1  # the SC alone
    assert len(orthanc.find("Instance", {"StudyInstanceUID": ds.StudyInstanceUID})) == 2  # SEG + SR, no SC
    shown = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)
    assert sorted(r["kind"] for r in shown["results"]) == ["sc", "seg", "sr"]

    rgb = sc.pixel_array.astype(int)[-sc.Columns:]  # the radiograph below the caption band
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    greenish = (green - np.maximum(red, blue)) > 25
    half = rgb.shape[1] // 2
    assert greenish[:, half:].sum() > 20 * max(1, greenish[:, :half].sum())  # patient's left on the image's right


def test_chest_film_stored_as_secondary_capture_is_analysed(pacs_and_node, tmp_path: Path) -> None:
    orthanc, node, _ = pacs_and_node
    ds = make_secondary_capture_film(DATA / "MCUCXR_0017_0.png")
    ds.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    instance = orthanc.upload(tmp_path / "sc.dcm")
    answer = orthanc.post("/modalities/cxrnode/store", {"Resources": [instance], "Synchronous": True})
    assert answer["FailedInstancesCount"] == 0
    seg_bytes, sr_bytes = wait_for_results(orthanc, ds.StudyInstanceUID)
    assert dciodvfy_errors(seg_bytes) == []
    assert dciodvfy_errors(sr_bytes) == []
    assert b"Pixel Spacing" in sr_bytes  # no spacing: the areas are left out, with the reason


def test_results_routed_back_are_dropped_never_analysed_or_resent(pacs_and_node, tmp_path: Path) -> None:
    """Loop safety: a PACS rule without an origin filter sends the node's SEG and SR back to it."""
    orthanc, node, _ = pacs_and_node
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024))
    ds.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    source = orthanc.upload(tmp_path / "dx.dcm")
    orthanc.post("/modalities/cxrnode/store", {"Resources": [source], "Synchronous": True})
    seg_bytes, sr_bytes = wait_for_results(orthanc, ds.StudyInstanceUID)
    job_for_source = wait_until(lambda: (j := job_for(node, ds.SOPInstanceUID))["status"] == "done" and j,
                                RESULT_TIMEOUT_S, what="the job done")

    results = [i["ID"] for i in orthanc.get(f"/studies/{orthanc.find('Study', {'StudyInstanceUID': ds.StudyInstanceUID})[0]}/instances")
               if i["ID"] != source]
    assert len(results) == 2
    answer = orthanc.post("/modalities/cxrnode/store", {"Resources": results, "Synchronous": True})
    assert answer["InstancesCount"] == 2 and answer["FailedInstancesCount"] == 0

    own = [dcmread(io.BytesIO(b)).SOPInstanceUID for b in (seg_bytes, sr_bytes)]
    for uid in own:
        job = job_for(node, uid)
        assert job["status"] == "discarded" and "made by this node" in job["discard_reason"], job
    # Nothing was analysed or sent again: still one SEG and one SR, and the source's job unchanged.
    assert len(orthanc.find("Instance", {"StudyInstanceUID": ds.StudyInstanceUID})) == 3
    assert job_for(node, ds.SOPInstanceUID) == job_for_source
