"""``cxrnode dataset export`` against a real queue and archive: selection, pixels, labels, splits, de-identification.

The data folder is built as the node builds it: real DICOM radiographs (tests.dicom_factory, from the
Montgomery fixture) archived and queued with the repository API, and the node's own SEGs encoded by
:func:`node.results.build_segmentation` on the fixture's reference mask. The PACS side (corrected
SEGs and reports over DICOMweb) is exercised end to end in ``tests/e2e/test_dataset_export.py``.
"""

from __future__ import annotations

import csv
import io
import json
import stat
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models import data as model_data
from models.identity import ModelIdentity
from node import retention
from node.archive.folder import FolderArchive
from node.cli.main import main as cli
from node.dataset import deid
from node.dataset.export import INDEX_COLUMNS, ExportOptions, export, to_export_grid
from node.dataset.labels import (
    TbLabelCsv,
    is_corrected_seg,
    pseudo_quality,
    report_label,
    seg_lung_union,
)
from node.errors import NodeError
from node.queue import repository as repo
from node.queue.db import Database
from node.queue.states import JobStatus
from node.queue.tables import utcnow
from node.results import ResultAlgorithms, build_segmentation
from node.settings import NodeSettings, RetentionSettings, Settings
from tests.deid_scan import assert_no_identifiers, identifiers
from tests.dicom_factory import (
    make_dx,
    montgomery_case,
    new_instance,
    reference_lung_masks,
)

IMAGE_PNG, MASK_PNG = montgomery_case()  # the repository's own fixture (tests/data)
ALGORITHMS = ResultAlgorithms.from_model_identities(ModelIdentity("cxrnode-lung-unet", "0.1.0", "a" * 64),
                                                    ModelIdentity("cxrnode-tb", "0.1.0", "b" * 64))
OWNER = "test:1:w"
SIZE = (320, 320)

#: Identifying header values every test image carries; none may appear in anything an export writes.
PATIENT = {"PatientName": "Kowalczyk^Agnieszka", "PatientID": "PID-73519", "PatientBirthDate": "19610423",
           "AccessionNumber": "ACC8842197", "InstitutionName": "St Elsewhere Hospital",
           "PatientSex": "F", "PatientAge": "063Y", "ReferringPhysicianName": "Grey^Meredith"}


def radiograph(patient_id: str = "PID-73519", *, size: tuple[int, int] = SIZE, **kwargs) -> Dataset:  # type: ignore[no-untyped-def]
    ds = new_instance(make_dx(IMAGE_PNG, size=size, **kwargs))
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.PatientID = patient_id
    ds.AccessionNumber = f"ACC{abs(hash(ds.SOPInstanceUID)) % 10**9:09d}"
    return ds


def fixture_lungs(ds: Dataset, *, mirrored: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(patient's left, patient's right) of the fixture's reference mask on ``ds``'s stored grid."""
    mask = np.asarray(Image.open(MASK_PNG).convert("L"))
    if mirrored:
        mask = mask[:, ::-1]
    return reference_lung_masks(mask, (int(ds.Rows), int(ds.Columns)), patient_left_on_image_right=not mirrored)


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class NodeData:
    """A data folder with its queue and archive, filled through the repository API as the node fills it."""

    settings: Settings
    db: Database
    archive: FolderArchive
    sources: dict[int, Dataset] = field(default_factory=dict)

    def receive(self, ds: Dataset, *, calling: str = "MODALITY", received_at: datetime | None = None) -> int:
        path = self.archive.received_key(ds.StudyInstanceUID, ds.SOPInstanceUID)
        data = part10(ds)
        self.archive.put(path, data)
        job_id = repo.enqueue(self.db, repo.ReceivedInstance(
            ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
            str(ds.file_meta.TransferSyntaxUID), str(path), len(data), calling)).job_id
        if received_at is not None:
            with self.db.session() as session:
                session.get(repo.Job, job_id).instance.received_at = received_at
        self.sources[job_id] = ds
        return job_id

    def analyse(self, job_id: int, left: np.ndarray, right: np.ndarray, *, tb_score: float = 0.97) -> None:
        """What the worker and sender do: the node's SEG archived and recorded, delivered: done."""
        assert repo.claim(self.db, JobStatus.QUEUED, JobStatus.PROCESSING, OWNER, 600) == job_id
        seg = build_segmentation(self.sources[job_id], left, right, ALGORITHMS.segmenter)
        path = self.archive.result_key(job_id, "seg")
        self.archive.put(path, part10(seg))
        repo.mark_encoded(self.db, job_id, OWNER, tb_score,
                          [repo.ArchivedResult("seg", seg.SOPClassUID, seg.SOPInstanceUID, str(path))], ["pacs"])
        assert repo.claim(self.db, JobStatus.ENCODED, JobStatus.SENDING, OWNER, 600) == job_id
        repo.record_delivery(self.db, job_id, "pacs", None)
        assert repo.finish_sending(self.db, job_id, OWNER, max_attempts=3, delay_s=1) == JobStatus.DONE

    def done(self, ds: Dataset, *, lungs: tuple[np.ndarray, np.ndarray] | None = None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        tb_score = kwargs.pop("tb_score", 0.97)
        job_id = self.receive(ds, **kwargs)
        self.analyse(job_id, *(lungs if lungs is not None else fixture_lungs(ds)), tb_score=tb_score)
        return job_id

    def discarded(self, ds: Dataset, **kwargs) -> int:  # type: ignore[no-untyped-def]
        job_id = self.receive(ds, **kwargs)
        assert repo.claim(self.db, JobStatus.QUEUED, JobStatus.PROCESSING, OWNER, 600) == job_id
        repo.mark_discarded(self.db, job_id, OWNER, "ViewPosition LL is not analysed")
        return job_id

    def export(self, out: Path, **options) -> dict:  # type: ignore[no-untyped-def]
        return export(self.settings, self.db, ExportOptions(out=out, **options))


@pytest.fixture
def node(tmp_path: Path) -> NodeData:
    data = tmp_path / "var"
    settings = Settings(node=NodeSettings(data_dir=str(data)), retention=RetentionSettings(images_days=1))
    return NodeData(settings, Database(data), FolderArchive(data / "archive"))


def read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "index.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (512, 512)
        return np.asarray(image)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


# ----- layout, pixels, pseudo-labels -----

def test_the_export_is_the_index_layout_that_train_and_evaluate_read(node: NodeData, tmp_path: Path) -> None:
    first, second = radiograph("PID-1"), radiograph("PID-2", size=(400, 330))  # not square: resampled to 512
    node.done(first, tb_score=0.97)
    node.done(second, tb_score=0.03)
    out = tmp_path / "export"
    summary = node.export(out)

    assert summary["selected"] == 2 and summary["exported"] == 2
    assert summary["labels"] == {"manual": 0, "pseudo": 2, "none": 0}
    assert summary["tb_labels"] == {"csv": 0, "report": 0, "unknown": 2}
    rows = read_rows(out)
    assert list(rows[0]) == list(INDEX_COLUMNS)
    for row, ds in zip(rows, (first, second), strict=True):
        assert row["case_id"] == deid.case_id(deid.load_or_create_key(node.settings.data_path), ds.SOPInstanceUID)
        assert row["image_path"] == f"images/{row['case_id']}.png" and row["mask_path"] == f"masks/{row['case_id']}.png"
        assert row["source"] == "MODALITY" and row["split"] in ("train", "val", "test")
        assert row["label_source"] == "pseudo" and float(row["label_quality"]) >= 0.9
        # The node's own TB score (0.97 and 0.03) is never a TB label.
        assert row["tb_label"] == "" and row["tb_label_source"] == ""
        mask = png(out / row["mask_path"])
        assert set(np.unique(mask)) == {0, 255}
        # The mask is the SEG's two lungs merged, resampled to 512: the fixture's reference mask.
        reference = np.asarray(Image.open(MASK_PNG).convert("L")) > 127
        assert dice(mask > 0, reference) > 0.97
        image = png(out / row["image_path"])
        assert image.min() <= 5 and image.max() >= 250
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "headers", "images", "index.csv", "masks"]
    assert json.loads((out / "export.json").read_text())["exported"] == 2

    cases = model_data.read_index(out)
    assert [c.case_id for c in cases] == [r["case_id"] for r in rows]
    assert all(c.mask_path is not None and c.tb_label is None for c in cases)


def test_pixels_go_through_the_nodes_own_path_monochrome1_and_mirrored(node: NodeData, tmp_path: Path) -> None:
    """display_pixels (VOI window, MONOCHROME1 inverted) and the networks' standard view: a MONOCHROME1
    copy and a mirrored copy (Patient Orientation R\\F) export the same picture and mask as the plain one."""
    plain = radiograph("PID-1")
    inverted = radiograph("PID-2", photometric="MONOCHROME1")
    flipped_pixels = np.asarray(Image.open(IMAGE_PNG).convert("L").resize(SIZE[::-1], Image.Resampling.BILINEAR))[:, ::-1]
    mirrored = new_instance(make_dx(flipped_pixels, size=None, patient_orientation=("R", "F")))
    jobs = {"plain": node.done(plain), "inverted": node.done(inverted),
            "mirrored": node.done(mirrored, lungs=fixture_lungs(mirrored, mirrored=True))}
    out = tmp_path / "export"
    node.export(out)
    key = deid.load_or_create_key(node.settings.data_path)
    by_case = {r["case_id"]: r for r in read_rows(out)}
    exported = {name: by_case[deid.case_id(key, node.sources[job].SOPInstanceUID)] for name, job in jobs.items()}
    images = {name: png(out / row["image_path"]).astype(int) for name, row in exported.items()}
    masks = {name: png(out / row["mask_path"]) for name, row in exported.items()}

    assert np.abs(images["inverted"] - images["plain"]).max() <= 1
    stored = np.asarray(inverted.pixel_array, dtype=float)  # what a reader without the pixel path would see
    naive = to_export_grid((stored - stored.min()) / (stored.max() - stored.min()))
    assert np.corrcoef(naive.ravel(), images["plain"].ravel())[0, 1] < -0.9
    assert np.abs(images["mirrored"] - images["plain"]).mean() < 2
    assert np.corrcoef(images["mirrored"].ravel(), images["plain"].ravel())[0, 1] > 0.99
    assert dice(masks["mirrored"] > 0, masks["plain"] > 0) > 0.98
    assert np.array_equal(masks["inverted"], masks["plain"])


def test_pseudo_quality_scores_plausible_lungs_high_and_failures_low() -> None:
    reference = np.asarray(Image.open(MASK_PNG).convert("L")) > 127
    left, right = reference_lung_masks(reference.astype(np.uint8) * 255, (512, 512))
    assert pseudo_quality(left, right) == 1.0
    assert pseudo_quality(right, left) == 0.0  # each lung on the wrong side
    assert pseudo_quality(left, np.zeros_like(right)) == 0.0  # a lung missing
    shrunk = right.copy()
    rows = np.flatnonzero(shrunk.any(axis=1))
    shrunk[rows[0] + (rows[-1] - rows[0]) // 6:] = False  # only the apex of the right lung left
    assert pseudo_quality(left, shrunk) < 0.5
    speckled = left & (np.indices(left.shape).sum(axis=0) % 3 == 0)  # a lung broken into fragments
    assert pseudo_quality(speckled, right) < 0.5
    blob = np.zeros_like(left)
    blob[40:480, 30:490] = True  # the whole chest, mediastinum included
    assert pseudo_quality(blob & (np.arange(512) >= 256), blob & (np.arange(512) < 256)) < 0.5


def test_pseudo_labels_below_the_quality_floor_are_left_out(node: NodeData, tmp_path: Path) -> None:
    good, poor, poor_labelled = radiograph("PID-1"), radiograph("PID-2"), radiograph("PID-3")
    node.done(good)
    for ds in (poor, poor_labelled):
        left, right = fixture_lungs(ds)
        node.done(ds, lungs=(right, left))  # the node mixed up the sides: quality 0
    labels = tmp_path / "tb.csv"
    labels.write_text(f"study_instance_uid,tb_label\n{poor_labelled.StudyInstanceUID},1\n")

    summary = node.export(tmp_path / "floor", min_quality=0.5, tb_labels=TbLabelCsv.load(labels))
    assert summary["left_out_below_quality"] == 2 and summary["exported"] == 2
    assert summary["skipped"]["no_label"] == 1  # no mask and no TB label: nothing to learn from
    assert summary["labels"] == {"manual": 0, "pseudo": 1, "none": 1}
    assert summary["pseudo_quality"]["min"] == 0.0 and summary["pseudo_quality"]["max"] == 1.0
    rows = {r["tb_label"]: r for r in read_rows(tmp_path / "floor")}
    assert rows["1"]["mask_path"] == "" and rows["1"]["label_source"] == "" and rows["1"]["tb_label_source"] == "csv"
    assert rows[""]["label_source"] == "pseudo"
    assert sorted(p.name for p in (tmp_path / "floor" / "masks").iterdir()) == [f"{rows['']['case_id']}.png"]
    cases = model_data.read_index(tmp_path / "floor")  # a row without a mask reads as such
    assert sorted((c.mask_path is None, c.tb_label) for c in cases) == [(False, None), (True, 1)]

    everything = node.export(tmp_path / "no-floor", min_quality=0.0)
    assert everything["labels"]["pseudo"] == 3 and everything["left_out_below_quality"] == 0


# ----- selection -----

def test_selection_filters(node: NodeData, tmp_path: Path) -> None:
    now = utcnow()
    old = node.done(radiograph("PID-1"), received_at=now - timedelta(days=10), tb_score=0.9)
    recent = node.done(radiograph("PID-2"), calling="WARD_DX", received_at=now - timedelta(days=2), tb_score=0.2)
    newest = node.done(radiograph("PID-3"), received_at=now - timedelta(hours=1), tb_score=0.5)
    lateral = node.discarded(radiograph("PID-4"), received_at=now - timedelta(hours=2))
    queued = node.receive(radiograph("PID-5"))
    key = deid.load_or_create_key(node.settings.data_path)

    def exported(name: str, **options) -> set[int]:  # type: ignore[no-untyped-def]
        summary = node.export(tmp_path / name, min_quality=0.0, **options)
        ids = {r["case_id"] for r in read_rows(tmp_path / name)}
        jobs = {job for job, ds in node.sources.items() if deid.case_id(key, ds.SOPInstanceUID) in ids}
        assert summary["exported"] == len(jobs)
        return jobs

    assert exported("default") == {old, recent, newest}
    assert exported("since", since=now - timedelta(days=3)) == {recent, newest}
    assert exported("until", until=now - timedelta(days=1)) == {old, recent}
    assert exported("window", since=now - timedelta(days=3), until=now - timedelta(days=1)) == {recent}
    assert exported("ae", calling_ae_titles=("WARD_DX",)) == {recent}
    assert exported("band", tb_min=0.4, tb_max=0.95) == {old, newest}
    assert exported("limit", limit=2) == {recent, newest}  # the most recently received
    assert exported("accepted", states=("done", "discarded"), outcome="accepted") == {old, recent, newest}
    # A discarded lateral has no mask of the node's and no TB label here: selected, then skipped.
    summary = node.export(tmp_path / "discarded", states=("discarded",), outcome="discarded")
    assert summary["selected"] == 1 and summary["exported"] == 0 and summary["skipped"]["no_label"] == 1
    labels = tmp_path / "tb.csv"
    labels.write_text(f"accession_number,tb_label\n{node.sources[lateral].AccessionNumber},0\n")
    assert exported("discarded-labelled", states=("discarded",), outcome="discarded",
                    tb_labels=TbLabelCsv.load(labels)) == {lateral}
    assert queued not in exported("all-states", states=tuple(s.value for s in JobStatus))


def test_purged_jobs_are_skipped_and_counted(node: NodeData, tmp_path: Path) -> None:
    purged = node.done(radiograph("PID-1"))
    planned = retention.plan(node.settings, node.db, node.archive, now=utcnow() + timedelta(days=2))
    retention.execute(planned, node.db, node.archive)
    assert repo.get_job(node.db, purged).purged_at is not None
    kept = node.done(radiograph("PID-2"))
    summary = node.export(tmp_path / "export")
    assert summary["selected"] == 2 and summary["exported"] == 1 and summary["skipped"]["purged"] == 1
    key = deid.load_or_create_key(node.settings.data_path)
    assert [r["case_id"] for r in read_rows(tmp_path / "export")] == [
        deid.case_id(key, node.sources[kept].SOPInstanceUID)]


# ----- splits and pseudonyms -----

def test_splits_are_reproducible_by_patient_and_never_split_a_patient(node: NodeData, tmp_path: Path) -> None:
    patients = [f"PID-{n}" for n in range(8)]
    for patient in patients:
        for _ in range(2):
            node.done(radiograph(patient))
    first = node.export(tmp_path / "first", split_fractions=(0.5, 0.25, 0.25))
    node.export(tmp_path / "second", split_fractions=(0.5, 0.25, 0.25))
    assert first["patients"] == 8 and first["exported"] == 16
    rows_first, rows_second = read_rows(tmp_path / "first"), read_rows(tmp_path / "second")
    assert rows_first == rows_second  # same key, same archive: same case ids, same splits

    key = deid.load_or_create_key(node.settings.data_path)
    patient_of = {deid.case_id(key, ds.SOPInstanceUID): ds.PatientID for ds in node.sources.values()}
    splits_of: dict[str, set[str]] = {}
    for row in rows_first:
        splits_of.setdefault(patient_of[row["case_id"]], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of.values()), splits_of
    assert sum(first["splits"].values()) == 16 and first["splits"] == {
        name: 2 * sum(1 for s in splits_of.values() if name in s) for name in ("train", "val", "test")}

    # The split is a function of the key and the patient only, and follows the fractions.
    drawn = [deid.split_of(key, f"patient:\\P{n}", (0.8, 0.1, 0.1)) for n in range(3000)]
    shares = {name: drawn.count(name) / len(drawn) for name in ("train", "val", "test")}
    assert abs(shares["train"] - 0.8) < 0.03 and abs(shares["val"] - 0.1) < 0.02 and abs(shares["test"] - 0.1) < 0.02
    assert {deid.split_of(key, f"patient:\\P{n}", (1.0, 0.0, 0.0)) for n in range(200)} == {"train"}
    other_key = bytes(32)
    assert [deid.split_of(other_key, f"patient:\\P{n}", (0.8, 0.1, 0.1)) for n in range(300)] != drawn[:300]
    assert deid.case_id(other_key, "1.2.3") != deid.case_id(key, "1.2.3")

    key_file = node.settings.data_path / deid.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_split_fractions_are_validated() -> None:
    from node.cli.dataset import parse_fractions

    assert parse_fractions("80/10/10") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_fractions("0.7,0.3,0") == pytest.approx((0.7, 0.3, 0.0))
    for bad in ("80/20", "a/b/c", "0/50/50", "-1/1/1"):
        with pytest.raises(NodeError, match="--split-fractions"):
            parse_fractions(bad)


# ----- TB labels -----

def test_tb_labels_from_a_csv_by_study_or_accession(node: NodeData, tmp_path: Path) -> None:
    by_study, by_accession, unlisted = radiograph("PID-1"), radiograph("PID-2"), radiograph("PID-3")
    for ds in (by_study, by_accession, unlisted):
        node.done(ds, tb_score=0.99)
    labels = tmp_path / "tb.csv"
    labels.write_text("study_instance_uid,accession_number,tb_label\n"
                      f"{by_study.StudyInstanceUID},,1\n,{by_accession.AccessionNumber},0\n1.2.3.4.5,,1\n")
    summary = node.export(tmp_path / "export", tb_labels=TbLabelCsv.load(labels))
    assert summary["tb_labels"] == {"csv": 2, "report": 0, "unknown": 1}
    assert summary["tb_csv_rows"] == 3 and summary["tb_csv_unmatched"] == 1
    key = deid.load_or_create_key(node.settings.data_path)
    rows = {r["case_id"]: r for r in read_rows(tmp_path / "export")}
    got = {name: (rows[deid.case_id(key, ds.SOPInstanceUID)]["tb_label"],
                  rows[deid.case_id(key, ds.SOPInstanceUID)]["tb_label_source"])
           for name, ds in (("study", by_study), ("accession", by_accession), ("unlisted", unlisted))}
    assert got == {"study": ("1", "csv"), "accession": ("0", "csv"), "unlisted": ("", "")}

    for text, message in [("study_instance_uid,tb_label\n1.2.3,2\n", "line 2: tb_label must be 0 or 1"),
                          ("study_instance_uid,tb_label\n1.2.3,1\n1.2.3,0\n", "line 3: .* another tb_label"),
                          ("accession_number,tb_label\n,1\n", "line 2: gives neither"),
                          ("uid,label\n1.2.3,1\n", "needs a tb_label column")]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(NodeError, match=message) as error:
            TbLabelCsv.load(bad)
        assert "1.2.3" not in str(error.value)  # messages name lines, never the values


def verified_report(source: Dataset, finding: Code | None, *, verified: bool = True) -> Dataset:
    root = hd.sr.ContainerContentItem(name=Code("18748-4", "LN", "Diagnostic imaging report"),
                                      template_id="2000")
    items = []
    if finding is not None:
        items.append(hd.sr.CodeContentItem(name=codes.DCM.Finding, value=finding,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    items.append(hd.sr.TextContentItem(name=codes.DCM.Finding, value="Chest film reviewed.",
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    root.ContentSequence = items
    return hd.sr.EnhancedSR(
        evidence=[source], content=root, series_instance_uid=hd.UID(), series_number=50,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Reporting Vendor", is_complete=True,
        is_verified=verified, verifying_observer_name="Reader^Radiology" if verified else None,
        verifying_organization="Radiology" if verified else None)


def test_verified_report_findings_give_tb_labels() -> None:
    source = radiograph()
    assert report_label(verified_report(source, Code("56717001", "SCT", "Tuberculosis"))) == 1
    assert report_label(verified_report(source, Code("154283005", "SCT", "Pulmonary tuberculosis"))) == 1
    assert report_label(verified_report(source, Code("17621005", "SCT", "Normal"))) == 0
    assert report_label(verified_report(source, Code("233604007", "SCT", "Pneumonia"))) is None
    assert report_label(verified_report(source, None)) is None  # free text only: unknown


# ----- corrected SEGs (the PACS lookup itself is in tests/e2e) -----

def test_a_radiologists_seg_is_corrected_and_the_nodes_own_is_not() -> None:
    source = radiograph()
    left, right = fixture_lungs(source)
    own = build_segmentation(source, left, right, ALGORITHMS.segmenter)
    assert not is_corrected_seg(own)
    edited = left.copy()
    edited[: source.Rows // 2] = False  # the radiologist cut the upper half of the left lung
    manual = hd.seg.Segmentation(
        source_images=[source], pixel_array=np.stack([edited, right], axis=-1)[np.newaxis].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(number, label, codes.SCT.AnatomicalStructure, codes.SCT.Lung,
                                      hd.seg.SegmentAlgorithmTypeValues.MANUAL)
            for number, label in ((1, "Left lung"), (2, "Right lung"))],
        series_instance_uid=hd.UID(), series_number=70, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Reading Workstation", manufacturer_model_name="Editor", software_versions="1",
        device_serial_number="7")
    assert is_corrected_seg(manual)
    union = seg_lung_union(hd.seg.Segmentation.from_dataset(manual), source.SOPInstanceUID)
    assert np.array_equal(union, edited | right)
    assert seg_lung_union(hd.seg.Segmentation.from_dataset(manual), "1.2.3.4") is None  # not its image
    own.Manufacturer = "Other Vendor"  # an AUTOMATIC SEG by someone else is not this node's: it counts too
    assert is_corrected_seg(own)


# ----- de-identification -----

def test_nothing_written_identifies_a_patient_and_the_reid_map_stays_in_the_data_folder(
        node: NodeData, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sources = [radiograph("PID-73519"), radiograph("PID-73520", photometric="MONOCHROME1")]
    for ds in sources:
        node.done(ds)
    labels = tmp_path / "tb.csv"
    labels.write_text(f"study_instance_uid,tb_label\n{sources[0].StudyInstanceUID},1\n")
    config = tmp_path / "cxrnode.toml"
    config.write_text(f'[node]\ndata_dir = "{node.settings.data_path}"\n')
    out = tmp_path / "export"
    code = cli(["dataset", "export", "--out", str(out), "--tb-labels", str(labels), "--json", "--config", str(config)])
    printed = capsys.readouterr().out
    summary = json.loads(printed)
    assert code == 0 and summary["exported"] == 2

    values = [v for ds in sources for v in identifiers(ds)]
    assert assert_no_identifiers(out, values) == 2 + 2 + 2 + 2  # images, masks, headers, index.csv + export.json
    assert not [v for v in values if v.lower() in printed.lower()]  # nor on the terminal

    header = json.loads(next((out / "headers").iterdir()).read_text())
    assert header["Modality"] == "DX" and header["ViewPosition"] == "PA" and header["PatientIdentityRemoved"] == "YES"
    assert header["ImagerPixelSpacing"] == [0.175, 0.175]
    assert "PatientSex" not in header and "PatientAge" not in header  # the basic profile empties / removes them
    assert set(header) <= set(deid.KEPT_ATTRIBUTES) | {"PatientIdentityRemoved", "DeidentificationMethod",
                                                       "DeidentificationMethodCodeSequence"}
    assert header["DeidentificationMethodCodeSequence"][0]["CodeValue"] == "113100"

    reid = Path(summary["reid_map"])
    assert reid.parent == node.settings.data_path / "exports" and not reid.is_relative_to(out)
    assert stat.S_IMODE(reid.stat().st_mode) == 0o600 and stat.S_IMODE(reid.parent.stat().st_mode) == 0o700
    with reid.open(newline="") as handle:
        mapping = {row["case_id"]: row["sop_instance_uid"] for row in csv.DictReader(handle)}
    assert sorted(mapping.values()) == sorted(ds.SOPInstanceUID for ds in sources)
    assert set(mapping) == {r["case_id"] for r in read_rows(out)}

    again = tmp_path / "no-map"
    assert cli(["dataset", "export", "--out", str(again), "--no-reid-map", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["reid_map"] is None
    assert len(list((node.settings.data_path / "exports").iterdir())) == 1


def test_the_profile_keeps_only_what_it_leaves_unchanged() -> None:
    ds = radiograph()
    kept = deid.kept_header(ds)
    assert {k: kept[k] for k in ("Modality", "BodyPartExamined", "Rows", "Columns")} == {
        "Modality": "DX", "BodyPartExamined": "CHEST", "Rows": SIZE[0], "Columns": SIZE[1]}
    assert "PatientSex" not in kept and "PatientAge" not in kept
    assert not deid.check_clean(json.dumps(kept), deid.identifiers_of(ds), "header")
    with pytest.raises(deid.IdentifierLeak, match="the index row of job 7") as error:
        deid.check_clean(f"x,{ds.AccessionNumber},y", deid.identifiers_of(ds), "the index row of job 7")
    assert ds.AccessionNumber not in str(error.value)
    assert "Kowalczyk Agnieszka" in deid.identifiers_of(ds)


def test_an_export_goes_only_into_a_new_or_empty_folder(node: NodeData, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    node.done(radiograph())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    config = tmp_path / "cxrnode.toml"
    config.write_text(f'[node]\ndata_dir = "{node.settings.data_path}"\n')
    assert cli(["dataset", "export", "--out", str(busy), "--config", str(config)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["dataset", "export", "--out", str(empty), "--config", str(config)]) == 0
    human = capsys.readouterr().out
    assert "1 of 1 selected radiographs" in human and "pseudo 1" in human
    assert (empty / "index.csv").is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert cli(["dataset", "export", "--out", str(tmp_path / "x"), "--pacs-url", "ftp://pacs",
                "--config", str(config)]) == 2
    assert "--pacs-url" in capsys.readouterr().err
