"""Retraining from archived studies, for real: radiographs through a served node into a DICOMweb PACS,
a radiologist's corrected SEG and verified report in that PACS, then ``cxrnode dataset export`` and
``cxrnode evaluate`` on what it wrote.

Orthanc (Debian ``orthanc`` with ``orthanc-dicomweb``) is the PACS; the node runs the real networks on
the CPU; the "radiologist-corrected" SEG is the node's own mask with the lower part of the left lung
cut away, re-encoded with highdicom as MANUAL by another manufacturer.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.dataset.export import to_export_grid
from tests.deid_scan import assert_no_identifiers, identifiers
from tests.dicom_factory import make_dx, montgomery_case, new_instance
from tests.servers import (
    REPO,
    Orthanc,
    orthanc_and_node,
    wait_until,
)

pytestmark = pytest.mark.e2e

RESULT_TIMEOUT_S = 240
CASES = ("MCUCXR_0017_0", "MCUCXR_0001_0", "MCUCXR_0002_0")


@pytest.fixture(scope="module")
def pacs_and_node(tmp_path_factory: pytest.TempPathFactory):
    with orthanc_and_node(tmp_path_factory.mktemp("dataset-e2e"), dicomweb=True) as pair:
        yield pair


def radiograph(case: str, n: int, **kwargs) -> Dataset:  # type: ignore[no-untyped-def]
    image, _ = montgomery_case(case)
    ds = new_instance(make_dx(image, size=(1024, 1024), **kwargs), patient_id=f"MRN-4471{n}")
    ds.PatientName = f"Nowak^Zofia{'abc'[n]}^Maria"
    ds.PatientBirthDate = f"1958030{n + 1}"
    ds.AccessionNumber = f"RAD2026{n}9173"
    ds.InstitutionName = "Hospital of Saint Wenceslas"
    ds.ReferringPhysicianName = "Lindqvist^Hedda"
    ds.PatientSex, ds.PatientAge = "F", "067Y"
    return ds


def results_of(orthanc: Orthanc, study_uid: str) -> tuple[bytes, bytes]:
    seg_series, sr_series = orthanc.wait_for_result_series(study_uid, RESULT_TIMEOUT_S)
    (seg,), (sr,) = orthanc.instance_files(seg_series[0]), orthanc.instance_files(sr_series[0])
    return seg, sr


def node_lungs(seg_bytes: bytes, sop_instance_uid: str) -> tuple[np.ndarray, np.ndarray]:
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    lungs = seg.get_pixels_by_source_instance([sop_instance_uid], segment_numbers=[1, 2])[0].astype(bool)
    return lungs[..., 0], lungs[..., 1]


def corrected_seg(source: Dataset, left: np.ndarray, right: np.ndarray) -> tuple[Dataset, np.ndarray]:
    """A radiologist's edit of the node's mask: the lower 40 % of the left lung cut away; MANUAL, another vendor."""
    rows = np.flatnonzero(left.any(axis=1))
    edited = left.copy()
    edited[rows[0] + int(0.6 * (rows[-1] - rows[0])):] = False
    segments = [hd.seg.SegmentDescription(number, label, codes.SCT.AnatomicalStructure, codes.SCT.Lung,
                                          hd.seg.SegmentAlgorithmTypeValues.MANUAL)
                for number, label in ((1, "Left lung (corrected)"), (2, "Right lung (corrected)"))]
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=np.stack([edited, right], axis=-1)[np.newaxis].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=[0.175, 0.175], slice_thickness=1.0),
        series_instance_uid=hd.UID(), series_number=77, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Reading Workstation Inc", manufacturer_model_name="LungEdit", software_versions="4.2",
        device_serial_number="RW-1", series_description="Lungs corrected by radiologist")
    return seg, edited | right


def report(source: Dataset, finding: Code, *, verified: bool) -> Dataset:
    root = hd.sr.ContainerContentItem(name=Code("18748-4", "LN", "Diagnostic imaging report"), template_id="2000")
    root.ContentSequence = [hd.sr.CodeContentItem(name=codes.DCM.Finding, value=finding,
                                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    return hd.sr.EnhancedSR(
        evidence=[source], content=root, series_instance_uid=hd.UID(), series_number=60, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Reporting Vendor", is_complete=True, is_verified=verified,
        verifying_observer_name="Reader^Radiology" if verified else None,
        verifying_organization="Radiology" if verified else None)


def upload(orthanc: Orthanc, ds: Dataset, folder: Path) -> str:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return orthanc.upload(path)


def test_export_from_archive_and_pacs_is_deidentified_and_evaluates(pacs_and_node, tmp_path: Path) -> None:
    orthanc, node = pacs_and_node
    sources = [radiograph(CASES[0], 0), radiograph(CASES[1], 1, photometric="MONOCHROME1"),
               radiograph(CASES[2], 2)]
    for ds in sources:  # the PACS holds the studies; its routing sends each film to the node
        instance = upload(orthanc, ds, tmp_path)
        answer = orthanc.post("/modalities/cxrnode/store", {"Resources": [instance], "Synchronous": True})
        assert answer["FailedInstancesCount"] == 0
    own = {ds.SOPInstanceUID: node_lungs(results_of(orthanc, ds.StudyInstanceUID)[0], ds.SOPInstanceUID)
           for ds in sources}

    def all_done() -> bool:
        listing = node.cli("jobs", "list", "--json")
        jobs = {j["sop_instance_uid"]: j["status"] for j in json.loads(listing.stdout)}
        return all(jobs.get(ds.SOPInstanceUID) == "done" for ds in sources)

    wait_until(all_done, RESULT_TIMEOUT_S, what="three jobs done")

    manual_case, report_case, csv_case = sources
    seg, corrected_union = corrected_seg(manual_case, *own[manual_case.SOPInstanceUID])
    upload(orthanc, seg, tmp_path)
    upload(orthanc, report(report_case, Code("56717001", "SCT", "Tuberculosis"), verified=True), tmp_path)
    # An unverified draft is not a radiologist's label: the manual case's TB label stays unknown.
    upload(orthanc, report(manual_case, Code("56717001", "SCT", "Tuberculosis"), verified=False), tmp_path)
    labels = tmp_path / "tb-labels.csv"
    labels.write_text(f"accession_number,tb_label\n{csv_case.AccessionNumber},0\n")

    out = tmp_path / "export"
    exported = node.cli("dataset", "export", "--pacs-url", f"{orthanc.base_url}/dicom-web", "--out", str(out),
                        "--tb-labels", str(labels), "--json")
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    print("export summary:", json.dumps({k: summary[k] for k in (
        "selected", "exported", "labels", "left_out_below_quality", "pseudo_quality", "tb_labels", "splits",
        "patients")}))
    assert summary["selected"] == 3 and summary["exported"] == 3 and summary["patients"] == 3
    assert summary["labels"] == {"manual": 1, "pseudo": 2, "none": 0}
    assert summary["left_out_below_quality"] == 0
    assert summary["tb_labels"] == {"csv": 1, "report": 1, "unknown": 1}
    assert sum(summary["splits"].values()) == 3 and summary["tb_csv_unmatched"] == 0

    reid = Path(summary["reid_map"])
    assert reid.parent == node.data_dir / "exports"
    with reid.open(newline="") as handle:
        sop_of = {row["case_id"]: row["sop_instance_uid"] for row in csv.DictReader(handle)}
    with (out / "index.csv").open(newline="") as handle:
        rows = {sop_of[row["case_id"]]: row for row in csv.DictReader(handle)}
    assert set(rows) == {ds.SOPInstanceUID for ds in sources}

    def mask_png(row: dict[str, str]) -> np.ndarray:
        return np.asarray(Image.open(out / row["mask_path"]))

    manual = rows[manual_case.SOPInstanceUID]
    assert manual["label_source"] == "manual" and manual["label_quality"] == ""
    assert np.array_equal(mask_png(manual), to_export_grid(corrected_union, mask=True))
    node_union = to_export_grid(np.logical_or(*own[manual_case.SOPInstanceUID]), mask=True)
    assert (mask_png(manual) != node_union).sum() > 2000  # the cut region: not the node's own mask
    assert (manual["tb_label"], manual["tb_label_source"]) == ("", "")
    for ds, tb in ((report_case, ("1", "report")), (csv_case, ("0", "csv"))):
        row = rows[ds.SOPInstanceUID]
        assert row["label_source"] == "pseudo" and float(row["label_quality"]) >= 0.5
        assert np.array_equal(mask_png(row), to_export_grid(np.logical_or(*own[ds.SOPInstanceUID]), mask=True))
        assert (row["tb_label"], row["tb_label_source"]) == tb

    values = [v for ds in sources for v in identifiers(ds)]
    assert assert_no_identifiers(out, values) == 3 + 3 + 3 + 2
    assert not [v for v in values if v.lower() in exported.stdout.lower()]

    evaluated = subprocess.run([sys.executable, "-m", "node", "evaluate", "--data", str(out), "--json",
                                "--device", "cpu"], capture_output=True, text=True, cwd=REPO, timeout=600,
                               check=False)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads(evaluated.stdout)
    print("evaluate on the export:", json.dumps({k: metrics[k] for k in (
        "n_cases", "n_masks", "n_labelled", "lung_dice_mean", "lung_dice_min", "tb_auc")}))
    assert (metrics["n_cases"], metrics["n_masks"], metrics["n_labelled"]) == (3, 3, 2)
    assert metrics["lung_dice_mean"] > 0.85
