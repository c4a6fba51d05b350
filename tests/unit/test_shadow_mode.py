"""Shadow mode: a challenger runs beside the champion on every job; its comparison is recorded in
``shadow_results`` and a ``shadow`` step, never encoded, archived as DICOM nor sent.

The real Pipeline, the real inference worker, queue and archive, and the real networks on the
CPU, on a 512 x 512 DX from the repository's own Montgomery case (as tests/unit/test_model_serving.py).
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pydicom
import pytest

from models.catalog import ModelRegistry, RegistryError
from node.archive import open_archive
from node.cli.main import main
from node.queue import repository
from node.queue.db import Database
from node.queue.states import JobStatus
from node.settings import load_settings
from node.worker.pipeline import Pipeline
from node.worker.runner import InferenceWorker
from tests.dicom_factory import make_dx
from tests.models.catalog_helpers import (
    clone_version,
    degraded_segmenter,
    later_version,
    shipped_ref,
)

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "data" / "MCUCXR_0017_0.png"
UNET, TB = shipped_ref("lung-unet"), shipped_ref("tb-scorer")
DEGRADED = "lung-unet@1.0.1-degraded"
COPY = "lung-unet@1.0.9-copy"


class Node:
    """A registry, a queue, an archive, the real Pipeline and an inference worker in ``tmp_path``."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = tmp_path / "cxrnode.toml"
        self.config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[worker]\ndevice = "cpu"\n')
        self.settings = load_settings(self.config, env={})
        self.tmp = tmp_path
        self.registry = ModelRegistry(self.settings.models_registry_path)
        self.db = Database(self.settings.data_path)
        self.archive = open_archive(self.settings)
        self.pipeline = Pipeline.load(self.settings)
        self.worker = InferenceWorker(self.settings, self.db, self.archive, self.pipeline, threading.Event())

    def radiograph(self, number: int) -> Path:
        """The same pixels as instance ``number`` (fixed UIDs: the same number, the same source)."""
        path = self.tmp / f"dx{number}.dcm"
        if not path.exists():
            root = "1.2.826.0.1.3680043.10.1077"
            make_dx(IMAGE, size=(512, 512), sop_instance_uid=f"{root}.1.{number}", study_instance_uid=f"{root}.2.{number}",
                    series_instance_uid=f"{root}.3.{number}").save_as(path, enforce_file_format=True)
        return path

    def job(self, number: int) -> int:
        """Enqueue instance ``number`` and let the worker process it; returns its job id."""
        path = self.radiograph(number)
        ds = pydicom.dcmread(path)
        key = self.archive.received_key(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        self.archive.put(key, path.read_bytes())  # as the listener archives it
        job_id = repository.enqueue(self.db, repository.ReceivedInstance(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=key,
            size_bytes=path.stat().st_size, calling_ae_title="MODALITY")).job_id
        assert self.worker.run_once() is True
        return job_id

    def rows(self, job_id: int) -> list:
        return [r for r in repository.shadow_results(self.db) if r.job_id == job_id]

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        capsys.readouterr()
        assert main([*args, "--config", str(self.config)]) == 0
        return capsys.readouterr().out


#: What differs between two encodings of the same results: times, and highdicom's random
#: Dimension Organization UID. Everything else (UIDs, pixels, scores, algorithms) must be equal.
VOLATILE = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime",
            "DimensionOrganizationUID"}


def content(data: bytes) -> dict:
    """An encoded SEG or SR as a JSON dict, its :data:`VOLATILE` values blanked."""
    ds = pydicom.dcmread(io.BytesIO(data))

    def blank(dataset: pydicom.Dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    blank(item)
            elif element.keyword in VOLATILE:
                element.value = None

    blank(ds)
    return ds.to_json_dict()


def archived(node: Node, job_id: int) -> dict[str, dict]:
    job = repository.get_job(node.db, job_id)
    return {r.kind: content(node.archive.read(r.path)) for r in job.results}


def test_a_degraded_shadow_is_recorded_and_never_changes_the_jobs_results(tmp_path: Path) -> None:
    node = Node(tmp_path)
    degraded_segmenter(tmp_path / "run")
    node.registry.register(tmp_path / "run", "lung-unet")
    plain = node.pipeline.run(node.radiograph(1))  # no shadow yet
    assert plain.shadow is None

    with pytest.raises(RegistryError, match="cannot be its own shadow"):
        node.registry.set_shadow(UNET, by="test")
    token = node.registry.state_token()
    node.registry.set_shadow(DEGRADED, by="test", why="watch it on live traffic")
    assert node.registry.state_token() != token and node.registry.shadow("segmenter").ref == DEGRADED
    assert node.registry.shadow("tb") is None and node.registry.champion_refs() == {"segmenter": UNET, "tb": TB}

    job_id = node.job(1)  # the same source instance as ``plain``
    job = repository.get_job(node.db, job_id)
    assert job.status == JobStatus.DONE and job.tb_score == plain.tb_score  # no destination: done at once
    assert archived(node, job_id) == {r.kind: content(r.data) for r in plain.results}  # the same SEG and SR
    assert [item.name for item in node.archive.list(node.archive.results_prefix(job_id))] == ["seg.dcm", "sr.dcm"]

    [row] = node.rows(job_id)
    assert (row.shadow_ref, row.shadow_segmenter, row.shadow_tb) == (DEGRADED, DEGRADED, TB)
    assert (row.champion_segmenter, row.champion_tb, row.error) == (UNET, TB, None)
    assert 0.5 < row.dice_lungs < 1.0 and 0.5 < row.dice_right < 1.0 and 0.5 < row.dice_left < 1.0
    assert row.champion_tb_score == pytest.approx(plain.tb_score)
    assert row.shadow_tb_score != row.champion_tb_score  # the TB scorer reads the shadow's (smaller) lungs
    threshold = node.pipeline.tb_threshold
    assert row.champion_threshold == row.shadow_threshold == pytest.approx(threshold)  # the same TB scorer
    assert row.champion_call is (row.champion_tb_score >= threshold)
    assert row.shadow_call is (row.shadow_tb_score >= threshold)
    assert row.agree is (row.champion_call == row.shadow_call) and row.seconds > 0
    [event] = [e for e in job.events if e.step == "shadow"]
    assert event.outcome == "ok" and f"lung Dice {row.dice_lungs:.4f}" in event.message
    assert DEGRADED in event.message and ("agree" in event.message or "DISAGREE" in event.message)
    assert [e.step for e in job.events][-1] == "shadow"  # after the job's own results were recorded


def test_an_identical_shadow_agrees_fully_stops_with_off_and_the_report_equals_the_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = Node(tmp_path)
    node.registry.register(clone_version("lung-unet", "1.0.9-copy", tmp_path / "copy"), "lung-unet")
    assert "segmenter: shadow lung-unet@1.0.9-copy (was none)" in node.cli(capsys, "models", "shadow", COPY,
                                                                             "--why", "same weights")
    listing = json.loads(node.cli(capsys, "models", "list", "--json"))
    assert {r["ref"]: (r["in_service"], r["shadow"]) for r in listing}[COPY] == (False, True)
    assert "~" in node.cli(capsys, "models", "list")
    assert node.cli(capsys, "models", "show", COPY).startswith(f"{COPY}  (in shadow)")

    first, second = node.job(1), node.job(2)
    rows = node.rows(first) + node.rows(second)
    assert len(rows) == 2
    for row in rows:
        assert (row.dice_lungs, row.dice_right, row.dice_left) == (1.0, 1.0, 1.0)
        assert row.shadow_tb_score == row.champion_tb_score and row.agree is True and row.error is None

    off = json.loads(node.cli(capsys, "models", "shadow", "--off", "--json"))
    assert off["shadows"] == {} and off["changed"][0]["action"] == "shadow-off"
    third = node.job(3)
    assert node.rows(third) == [] and node.pipeline.shadow_setup is None  # stopped at the next job
    assert repository.get_job(node.db, third).status == JobStatus.DONE
    history = [r["action"] for r in node.registry.history()]
    assert history[-2:] == ["shadow", "shadow-off"]

    report = json.loads(node.cli(capsys, "models", "shadow-report", "--since", "1h", "--json"))
    [group] = report["shadows"]
    assert group["shadow_ref"] == COPY and group["jobs_compared"] == 2 and group["errors"] == 0
    assert group["dice_mean"] == group["dice_min"] == 1.0 and group["agreement_rate"] == 1.0
    assert group["tb_score_mean_abs_diff"] == 0.0 and group["dice_lowest_jobs"] == [first, second]
    assert group["champion_normal_shadow_abnormal"] == group["champion_abnormal_shadow_normal"] == 0
    assert group["champions"] == [f"{UNET} + {TB}"] and group["pairs"] == [f"{COPY} + {TB}"]
    later = json.loads(node.cli(capsys, "models", "shadow-report", "--since", "2999-01-01T00:00:00", "--json"))
    assert later["shadows"] == []


def test_the_report_sums_up_disagreement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Figures of the report from rows as recorded: mean/min Dice, lowest jobs, |TB difference|, calls."""
    node = Node(tmp_path)
    ids = [node.job(n) for n in (1, 2, 3)]  # no shadow: three plain jobs to hang rows on
    base = {"champion_segmenter": UNET, "champion_tb": TB, "shadow_segmenter": DEGRADED, "shadow_tb": TB,
            "champion_threshold": 0.5, "shadow_threshold": 0.5, "seconds": 0.25, "error": None}
    made = [(0.90, 0.40, 0.60, False, True), (0.80, 0.70, 0.65, True, True), (0.95, 0.70, 0.20, True, False)]
    for job_id, (d, c, s, cc, sc) in zip(ids, made, strict=True):
        repository.record_shadow(node.db, job_id, base | {
            "shadow_ref": DEGRADED, "dice_lungs": d, "dice_right": d, "dice_left": d, "champion_tb_score": c,
            "shadow_tb_score": s, "champion_call": cc, "shadow_call": sc, "agree": cc == sc})
    repository.record_shadow(node.db, ids[0], {k: v for k, v in base.items() if k != "error"}
                             | {"shadow_ref": DEGRADED, "error": "RuntimeError: boom"})
    [group] = json.loads(node.cli(capsys, "models", "shadow-report", "--json"))["shadows"]
    assert group["jobs_compared"] == 3 and group["errors"] == 1 and group["last_error"] == "RuntimeError: boom"
    assert group["dice_mean"] == pytest.approx((0.90 + 0.80 + 0.95) / 3) and group["dice_min"] == 0.80
    assert group["dice_lowest_jobs"] == [ids[1], ids[0], ids[2]]
    assert group["tb_score_mean_abs_diff"] == pytest.approx((0.20 + 0.05 + 0.50) / 3)
    assert group["agreed"] == 1 and group["agreement_rate"] == pytest.approx(1 / 3)
    assert group["champion_normal_shadow_abnormal"] == 1 and group["champion_abnormal_shadow_normal"] == 1
    human = node.cli(capsys, "models", "shadow-report")
    assert "jobs compared 3, errors 1" in human and "calls agree 1/3 (33.3 %)" in human


def test_a_failing_shadow_is_recorded_with_its_error_and_the_job_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node(tmp_path)
    node.registry.register(clone_version("lung-unet", "1.0.9-copy", tmp_path / "copy"), "lung-unet")
    node.registry.set_shadow(COPY, by="test")
    first = node.job(1)
    assert node.rows(first)[0].error is None

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shadow network exploded")

    monkeypatch.setattr(node.pipeline._shadow, "analyze", boom)
    second = node.job(2)
    job = repository.get_job(node.db, second)
    assert job.status == JobStatus.DONE and {r.kind for r in job.results} == {"seg", "sr"}
    [row] = node.rows(second)
    assert row.error == "RuntimeError: shadow network exploded" and row.dice_lungs is None
    assert [(e.outcome, "exploded" in e.message) for e in job.events if e.step == "shadow"] == [("error", True)]
    monkeypatch.undo()

    # bad weights: the shadow cannot be loaded at the next job; each job records why, and completes
    broken = node.registry.register(clone_version("lung-resunet", later_version("lung-resunet"), tmp_path / "res"),
                                    "lung-resunet")
    node.registry.set_shadow(broken.ref, by="test")
    with broken.weights_path.open("r+b") as fh:  # damaged after set_shadow verified it
        fh.seek(4096)
        fh.write(b"\xff" * 8)
    third = node.job(3)
    assert repository.get_job(node.db, third).status == JobStatus.DONE
    [row] = node.rows(third)
    assert row.shadow_ref == broken.ref and "checksum mismatch" in row.error and row.agree is None
    assert shipped_ref("lung-unet") == UNET  # nothing shipped was touched


def test_promoting_the_shadow_ends_it(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.register(clone_version("lung-unet", "1.0.9-copy", tmp_path / "copy"), "lung-unet")
    reg.set_shadow(COPY, by="test")
    assert reg.set_shadow(COPY, by="test") == []  # already: nothing recorded
    reg.promote(COPY, by="test", why="it agreed", force=True)
    assert reg.shadow_refs() == {} and reg.champion("segmenter").ref == COPY
    with pytest.raises(RegistryError, match="not a tb"):
        reg.set_shadow(UNET, by="test", slot="tb")


def test_the_history_purge_deletes_a_jobs_shadow_rows_with_it(tmp_path: Path) -> None:
    from datetime import timedelta

    from node.queue.tables import utcnow

    node = Node(tmp_path)
    node.registry.register(clone_version("lung-unet", "1.0.9-copy", tmp_path / "copy"), "lung-unet")
    node.registry.set_shadow(COPY, by="test")
    job_id = node.job(1)
    assert len(node.rows(job_id)) == 1
    later = utcnow() + timedelta(days=1)
    assert repository.claim_files_purge(node.db, [job_id], later, keep_failed=False) == [job_id]
    repository.confirm_files_purged(node.db, {job_id: "test: files gone"})
    assert repository.history_rows(node.db, [job_id])["shadow_results"] == 1
    deleted = repository.delete_history(node.db, [job_id], later, keep_failed=False)  # foreign keys are on
    assert deleted["jobs"] == 1 and deleted["shadow_results"] == 1
    assert repository.shadow_results(node.db) == []
