"""The retention purge against a real SQLite queue and real files: each rule, dry runs, crash safety.

Jobs are driven through the repository API as the node drives them (claim, encode, deliver,
discard, fail); the purge runs with a ``now`` in the future instead of waiting for days to pass.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from node import housekeeping, retention
from node.archive import key_name
from node.archive.folder import FolderArchive
from node.cli.main import main as cli
from node.errors import SettingsError
from node.queue import audit
from node.queue import repository as repo
from node.queue.db import Database
from node.queue.states import JobStatus
from node.queue.tables import Delivery, utcnow
from node.settings import NodeSettings, RetentionSettings, Settings, load_settings
from tests.servers import queue_config

REPO = Path(__file__).resolve().parents[2]
SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Node:
    """A data folder with its queue and archive, as the node keeps them."""

    settings: Settings
    db: Database
    archive: FolderArchive
    counter: int = 0

    def purge(self, *, days_later: float = 0.0, dry_run: bool = False) -> dict:
        planned = retention.plan(self.settings, self.db, self.archive,
                                 now=utcnow() + timedelta(days=days_later))
        return planned.report(dry_run=True) if dry_run else retention.execute(planned, self.db, self.archive)

    # --- jobs, driven as the node drives them ---
    def receive(self, *, size: int = 1000, keep: bool = True, sop_class: str = DX,
                study: str | None = None) -> int:
        self.counter += 1
        sop = f"1.2.826.0.1.9.{self.counter}"
        study = study or f"1.2.826.0.1.8.{self.counter}"
        path = ""
        if keep:
            target = self.archive.received_key(study, sop)
            self.archive.put(target, os.urandom(size))
            path = str(target)
        received = repo.ReceivedInstance(sop, sop_class, study, f"{study}.1", "1.2.840.10008.1.2.1", path,
                                         size if keep else 0, "MODALITY")
        if not keep:
            return repo.record_discarded(self.db, received, "CT Image Storage is not an image class ...").job_id
        return repo.enqueue(self.db, received).job_id

    def claim(self, job_id: int, ready: JobStatus, leased: JobStatus) -> None:
        assert repo.claim(self.db, ready, leased, "test:1:w", 600) == job_id

    def encode(self, job_id: int, destinations: tuple[str, ...] = ("pacs",)) -> None:
        self.claim(job_id, JobStatus.QUEUED, JobStatus.PROCESSING)
        results = []
        for kind, sop_class, size in (("seg", SEG, 300), ("sr", SR, 200)):
            path = self.archive.result_key(job_id, kind)
            self.archive.put(path, os.urandom(size))
            results.append(repo.ArchivedResult(kind, sop_class, f"1.2.826.0.1.7.{job_id}.{len(results)}", str(path)))
        repo.mark_encoded(self.db, job_id, "test:1:w", 0.25, results, list(destinations))

    def deliver(self, job_id: int) -> None:
        self.claim(job_id, JobStatus.ENCODED, JobStatus.SENDING)
        for destination in repo.pending_deliveries(self.db, job_id):
            repo.record_delivery(self.db, job_id, destination, None)
        assert repo.finish_sending(self.db, job_id, "test:1:w", max_attempts=3, delay_s=1) == JobStatus.DONE

    def done(self, **kwargs) -> int:  # type: ignore[no-untyped-def]
        job_id = self.receive(**kwargs)
        self.encode(job_id)
        self.deliver(job_id)
        return job_id

    def discarded(self) -> int:
        job_id = self.receive()
        self.claim(job_id, JobStatus.QUEUED, JobStatus.PROCESSING)
        repo.mark_discarded(self.db, job_id, "test:1:w", "ViewPosition LL is not analysed")
        return job_id

    def failed_send(self) -> int:
        job_id = self.receive()
        self.encode(job_id)
        self.claim(job_id, JobStatus.ENCODED, JobStatus.SENDING)
        repo.record_delivery(self.db, job_id, "pacs", "association rejected")
        assert repo.finish_sending(self.db, job_id, "test:1:w", max_attempts=1, delay_s=1) == JobStatus.FAILED
        return job_id

    def failed_inference(self) -> int:
        job_id = self.receive()
        self.claim(job_id, JobStatus.QUEUED, JobStatus.PROCESSING)
        assert repo.fail_attempt(self.db, job_id, "test:1:w", "boom", max_attempts=1,
                                 retry_delay_s=1) == JobStatus.FAILED
        return job_id

    # --- what is on disk and in the queue ---
    def files_of(self, job_id: int) -> list[Path]:
        job = repo.get_job(self.db, job_id)
        paths = [self.archive.path(job.instance.path)] if job.instance.path else []
        return paths + [self.archive.path(r.path) for r in job.results]

    def has_files(self, job_id: int) -> bool:
        files = self.files_of(job_id)
        return bool(files) and all(p.is_file() for p in files)

    def rows(self, sql: str) -> list[tuple]:
        with self.db.engine.connect() as connection:  # the queue's own engine: SQLite or PostgreSQL
            return [tuple(row) for row in connection.execute(text(sql)).all()]

    def job_exists(self, job_id: int) -> bool:
        return bool(self.rows(f"SELECT id FROM jobs WHERE id = {int(job_id)}"))


def make_node(tmp_path: Path, **retention_values) -> Node:  # type: ignore[no-untyped-def]
    data = tmp_path / "var"
    settings = Settings(node=NodeSettings(data_dir=str(data)), retention=RetentionSettings(**retention_values))
    return Node(settings, Database(data), FolderArchive(data / "archive"))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return make_node(tmp_path)  # the shipped defaults: 30 / 365 / 365 days, failed kept


def test_a_done_job_loses_its_files_after_images_days_and_keeps_its_history(node: Node) -> None:
    job_id = node.done(size=1234)
    files = node.files_of(job_id)
    assert node.purge(days_later=29)["jobs_purged"] == 0 and node.has_files(job_id)

    report = node.purge(days_later=31)
    assert report["jobs_purged"] == 1
    assert report["images"] == {"jobs": 1, "files": 1, "bytes": 1234}
    assert report["results"] == {"jobs": 1, "files": 2, "bytes": 500}
    assert report["history"]["jobs"] == 0 and report["audit"]["rows"] == 0
    assert not any(p.exists() for p in files)
    assert not (node.archive.root / "results" / str(job_id)).exists()
    assert not files[0].parent.exists()  # the emptied study folder went too
    job = repo.get_job(node.db, job_id)
    assert job.status == "done" and job.purged_at is not None and len(job.results) == 2
    (event,) = [e for e in job.events if e.step == "purge"]
    assert event.outcome == "ok" and event.message.startswith("source and results deleted")
    assert "1 image file(s), 1234 bytes" in event.message
    # Nothing left to do: a second purge finds nothing.
    assert node.purge(days_later=31)["jobs_purged"] == 0


def test_a_discarded_job_loses_its_source(node: Node) -> None:
    job_id = node.discarded()
    not_kept = node.receive(keep=False, sop_class=CT)
    report = node.purge(days_later=31)
    assert report["jobs_purged"] == 1 and report["images"] == {"jobs": 1, "files": 1, "bytes": 1000}
    assert report["results"]["files"] == 0
    assert not node.archive.path(repo.get_job(node.db, job_id).instance.path).exists()
    assert [e.message.split(" by ")[0] for e in repo.get_job(node.db, job_id).events if e.step == "purge"] == [
        "source deleted"]
    assert repo.get_job(node.db, not_kept).purged_at is None  # it never kept a file


def test_failed_and_pinned_jobs_are_kept_for_ever(node: Node) -> None:
    failed_send, failed_infer = node.failed_send(), node.failed_inference()
    pinned = node.done()
    assert repo.set_pinned(node.db, pinned, True) is True
    report = node.purge(days_later=1000)
    assert report["jobs_purged"] == 0 and report["history"]["jobs"] == 0
    for job_id in (failed_send, failed_infer, pinned):
        assert node.has_files(job_id) and node.job_exists(job_id)
    # failed jobs can still be retried: their files are there
    assert repo.retry(node.db, failed_send) == JobStatus.ENCODED


def test_unpinned_jobs_age_again_and_pins_are_events(node: Node) -> None:
    job_id = node.done()
    assert repo.set_pinned(node.db, job_id, True) is True
    assert repo.set_pinned(node.db, job_id, True) is False
    assert node.purge(days_later=31)["jobs_purged"] == 0
    assert repo.set_pinned(node.db, job_id, False) is True
    assert node.purge(days_later=31)["jobs_purged"] == 1
    steps = [(e.step, e.outcome) for e in repo.get_job(node.db, job_id).events if e.step in ("pin", "unpin", "purge")]
    assert steps == [("pin", "ok"), ("pin", "unchanged"), ("unpin", "ok"), ("purge", "ok")]


def test_keep_failed_false_purges_failed_jobs_but_never_undelivered_results(tmp_path: Path) -> None:
    node = make_node(tmp_path, keep_failed=False)
    failed_infer, failed_send = node.failed_inference(), node.failed_send()
    report = node.purge(days_later=400)
    assert report["jobs_purged"] == 1 and report["history"]["jobs"] == 1
    assert not node.job_exists(failed_infer)  # files, then rows: past both retentions
    assert node.has_files(failed_send) and node.job_exists(failed_send)  # its results never arrived


def test_unfinished_jobs_are_never_touched(node: Node) -> None:
    sending = node.receive()
    node.encode(sending)
    node.claim(sending, JobStatus.ENCODED, JobStatus.SENDING)
    encoded = node.receive()
    node.encode(encoded)
    processing = node.receive()
    node.claim(processing, JobStatus.QUEUED, JobStatus.PROCESSING)
    queued = node.receive()
    report = node.purge(days_later=10_000)
    assert report["jobs_purged"] == report["history"]["jobs"] == 0
    assert report["images"]["files"] == report["results"]["files"] == 0
    for job_id, state in ((sending, "sending"), (encoded, "encoded"), (processing, "processing"), (queued, "queued")):
        assert repo.get_job(node.db, job_id).status == state
        assert node.has_files(job_id) and repo.get_job(node.db, job_id).purged_at is None


def test_a_done_job_with_an_undelivered_destination_is_never_touched(node: Node) -> None:
    job_id = node.done()
    with node.db.session() as session:  # e.g. a destination added to a job by an older version
        session.add(Delivery(job_id=job_id, destination="backup", attempts=3, last_error="refused"))
    report = node.purge(days_later=10_000)
    assert report["jobs_purged"] == 0 and report["history"]["jobs"] == 0
    assert node.has_files(job_id) and node.job_exists(job_id)


def test_history_goes_after_history_days_and_only_after_the_files(tmp_path: Path) -> None:
    node = make_node(tmp_path, images_days=30, history_days=10)  # history shorter than files: waits for them
    done, not_kept = node.done(), node.receive(keep=False, sop_class=CT)
    report = node.purge(days_later=20)
    assert report["history"]["jobs"] == 1 and not node.job_exists(not_kept)  # never kept a file
    assert node.job_exists(done) and node.has_files(done)  # its files are still kept: so are its rows
    report = node.purge(days_later=31)
    assert report["jobs_purged"] == 1 and report["history"]["jobs"] == 1  # files, then rows, in one run
    assert report["history"]["tables"] == {"jobs": 1, "instances": 1, "job_events": 7, "results": 2,
                                           "deliveries": 1, "shadow_results": 0}
    assert node.rows("SELECT COUNT(*) FROM jobs") == [(0,)]
    for table in ("instances", "job_events", "results", "deliveries"):
        assert node.rows(f"SELECT COUNT(*) FROM {table}") == [(0,)], table


def test_keeping_images_for_ever_keeps_their_history(tmp_path: Path) -> None:
    node = make_node(tmp_path, images_days=0, history_days=1)
    done = node.done()
    report = node.purge(days_later=10_000)
    assert report["jobs_purged"] == 0 and report["history"]["jobs"] == 0
    assert node.has_files(done) and node.job_exists(done)


def test_default_history_and_audit_retention(node: Node) -> None:
    done = node.done()
    peer = audit.Peer("127.0.0.1", 40000, "MODALITY", "CXRNODE")
    released = audit.record(node.db, peer, "accepted")
    audit.association_ended(node.db, released, "released", audit.Counts(c_store=1))
    audit.record(node.db, peer, "rejected", "calling AE title not allowed")
    still_open = audit.record(node.db, peer, "accepted")

    report = node.purge(days_later=364)
    assert report["history"]["jobs"] == 0 and report["audit"]["rows"] == 0 and node.job_exists(done)
    assert repo.get_job(node.db, done).purged_at is not None  # its files went after 30 days
    report = node.purge(days_later=366)
    assert report["history"]["jobs"] == 1 and not node.job_exists(done)
    assert report["audit"]["rows"] == 3  # released, rejected, and one never closed (counts as ended a day on)
    assert node.rows("SELECT COUNT(*) FROM associations") == [(0,)]
    assert still_open


def test_an_open_association_is_not_deleted_under_its_handler(tmp_path: Path) -> None:
    node = make_node(tmp_path, audit_days=0.00001)
    peer = audit.Peer("127.0.0.1", 40000, "MODALITY", "CXRNODE")
    closed = audit.record(node.db, peer, "rejected", "busy")
    still_open = audit.record(node.db, peer, "accepted")
    time.sleep(1.0)
    assert node.purge()["audit"]["rows"] == 1
    assert node.rows("SELECT id FROM associations") == [(still_open,)] and closed != still_open


def test_a_dry_run_deletes_nothing_and_reports_what_the_purge_then_deletes(tmp_path: Path) -> None:
    node = make_node(tmp_path, history_days=30)
    done = [node.done(size=2000 + i) for i in range(3)]
    discarded = node.discarded()
    not_kept = node.receive(keep=False, sop_class=CT)
    failed = node.failed_send()
    audit.record(node.db, audit.Peer("127.0.0.1", 1, "A", "B"), "rejected", "busy")
    leftover = node.archive.tmp / "tmpcrash.part"
    leftover.write_bytes(b"x" * 77)
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    before = {table: node.rows(f"SELECT COUNT(*) FROM {table}") for table in ("jobs", "job_events", "associations")}

    dry = node.purge(days_later=400, dry_run=True)
    assert all(node.has_files(j) for j in [*done, discarded, failed]) and leftover.exists()
    assert {table: node.rows(f"SELECT COUNT(*) FROM {table}") for table in before} == before
    assert dry["dry_run"] is True and dry["jobs_purged"] == 4
    assert dry["images"] == {"jobs": 4, "files": 4, "bytes": 2000 + 2001 + 2002 + 1000}
    assert dry["results"] == {"jobs": 3, "files": 6, "bytes": 1500}
    assert dry["history"]["jobs"] == 5 and dry["audit"]["rows"] == 1
    assert dry["tmp"] == {"files": 1, "bytes": 77}

    done_report = node.purge(days_later=400)
    assert done_report["dry_run"] is False
    assert {k: v for k, v in done_report.items() if k not in ("dry_run", "at", "cutoffs")} == \
        {k: v for k, v in dry.items() if k not in ("dry_run", "at", "cutoffs")}
    assert not leftover.exists() and not any(node.job_exists(j) for j in [*done, discarded, not_kept])
    assert node.has_files(failed) and node.job_exists(failed)


def test_leftover_part_files_are_removed_at_start_up(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    old = [node.archive.tmp / f"tmp{i}.part" for i in range(3)]
    for path in old:
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - 600, time.time() - 600))
    in_flight = node.archive.tmp / "tmpwriting.part"  # another process is writing it right now
    in_flight.write_bytes(b"partial")
    other = node.archive.tmp / "notes.txt"
    other.write_text("not ours to delete")
    with caplog.at_level(logging.INFO, logger="node.housekeeping"):
        assert housekeeping.clean_tmp(node.settings, node.archive) == 3
    assert not any(p.exists() for p in old) and in_flight.exists() and other.exists()
    assert "removed 3 leftover temporary file(s)" in caplog.text


def test_a_crash_between_claim_and_deletion_is_finished_by_the_next_purge(node: Node) -> None:
    job_id = node.discarded()
    source = node.archive.path(repo.get_job(node.db, job_id).instance.path)
    cutoff = utcnow() + timedelta(days=1)
    # The purge claimed the job, then the process died before deleting anything.
    assert repo.claim_files_purge(node.db, [job_id], cutoff, keep_failed=True) == [job_id]
    assert source.exists()
    with pytest.raises(repo.FilesPurged, match="deleted by the retention purge"):
        repo.retry(node.db, job_id)  # already refused: the files may be half gone
    report = node.purge(days_later=31)
    assert report["jobs_purged"] == 1 and report["images"]["files"] == 1 and not source.exists()
    assert [e.step for e in repo.get_job(node.db, job_id).events].count("purge") == 1


def test_a_crash_between_deletion_and_confirmation_is_confirmed_by_the_next_purge(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = node.done()
    files = node.files_of(job_id)

    def crash(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("power lost")

    monkeypatch.setattr(repo, "confirm_files_purged", crash)
    with pytest.raises(RuntimeError):
        node.purge(days_later=31)
    monkeypatch.undo()
    assert not any(p.exists() for p in files)
    assert repo.get_job(node.db, job_id).purged_at is not None  # claimed: shown as purged already
    assert node.purge(days_later=400, dry_run=True)["history"]["jobs"] == 1  # after its confirmation, below
    report = node.purge(days_later=31)
    assert report["jobs_purged"] == 1 and report["images"]["files"] == 0  # nothing left but the confirmation
    assert [e.step for e in repo.get_job(node.db, job_id).events].count("purge") == 1
    assert node.purge(days_later=31)["jobs_purged"] == 0
    assert node.purge(days_later=400)["history"]["jobs"] == 1 and not node.job_exists(job_id)


def test_a_copy_received_after_the_purge_is_purged_too(node: Node) -> None:
    job_id = node.done()
    node.purge(days_later=31)
    first = repo.get_job(node.db, job_id).instance.path
    # What the listener does with the same SOP Instance UID received again (node.scp.handlers).
    version = node.archive.keep_version(first, b"the same image, sent again")
    assert version is not None and version.endswith(".v2.dcm")
    repo.note(node.db, job_id, "receive", "duplicate-different", f"kept as {key_name(version)}")
    report = node.purge(days_later=31)
    assert report["jobs_purged"] == 1 and report["images"]["files"] == 1 and not node.archive.path(version).exists()


def test_nothing_outside_the_archive_is_deleted(node: Node, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"not in the archive")
    received = repo.ReceivedInstance("1.2.826.0.1.5.1", DX, "1.2.826.0.1.5", "1.2.826.0.1.5.2",
                                     "1.2.840.10008.1.2.1", str(outside), 18, "MODALITY")
    job_id = repo.enqueue(node.db, received).job_id
    node.claim(job_id, JobStatus.QUEUED, JobStatus.PROCESSING)
    repo.mark_discarded(node.db, job_id, "test:1:w", "lateral")
    report = node.purge(days_later=31)
    assert report["jobs_purged"] == 1 and report["images"]["files"] == 0 and outside.exists()


# --- settings ---

@pytest.mark.parametrize("key", ["images_days", "history_days", "audit_days", "purge_interval_s"])
def test_retention_settings_are_validated(tmp_path: Path, key: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[retention]\n{key} = -1\n")
    with pytest.raises(SettingsError, match=f"retention.{key}"):
        load_settings(config, env={})
    config.write_text(f"[retention]\n{key} = 0.5\n")
    assert getattr(load_settings(config, env={}).retention, key) == 0.5
    assert load_settings(None, env={"CXRNODE_RETENTION_KEEP_FAILED": "false"}).retention.keep_failed is False
    assert RetentionSettings() == RetentionSettings(images_days=30, history_days=365, audit_days=365,
                                                    purge_interval_s=3600, keep_failed=True)


def test_the_scheduler_runs_the_purge_only_in_serve(node: Node) -> None:
    scheduler = housekeeping.start_scheduler(node.settings, node.db, node.archive)
    try:
        job = scheduler.get_job("purge")
        assert job is not None and job.trigger.interval == timedelta(hours=1)
        assert job.next_run_time - datetime.now(job.next_run_time.tzinfo) <= timedelta(minutes=10)
    finally:
        scheduler.shutdown(wait=False)
    scheduler = housekeeping.start_scheduler(node.settings, node.db, node.archive, purge_archive=False)
    try:
        assert scheduler.get_job("purge") is None
    finally:
        scheduler.shutdown(wait=False)


def test_the_scheduled_purge_logs_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = make_node(tmp_path, images_days=0.00001)
    node.done(size=5000)
    time.sleep(1.0)
    with caplog.at_level(logging.INFO, logger="node.housekeeping"):
        report = housekeeping.purge(node.settings, node.db, node.archive)
    assert report is not None and report["images"]["files"] == 1
    (line,) = [r.getMessage() for r in caplog.records if "retention purge" in r.getMessage()]
    assert line.startswith("retention purge: images 1 job(s) 1 file(s) 0.0 MB; results 1 job(s) 2 file(s)")


# --- the commands ---

def write_config(tmp_path: Path, node: Node, **retention_values) -> Path:  # type: ignore[no-untyped-def]
    config = tmp_path / "cxrnode.toml"
    lines = ["[node]", f'data_dir = "{node.settings.data_path}"', queue_config(node.settings.queue.url), "[retention]"]
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in retention_values.items()]
    config.write_text("\n".join(lines) + "\n")
    return config


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_purged_jobs_give_clear_messages(tmp_path: Path, node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    done, discarded = node.done(), node.discarded()
    time.sleep(1.0)
    config = str(write_config(tmp_path, node, images_days=0.00001))

    code, out, _ = run_cli(capsys, "archive", "purge", "--json", "--config", config)
    assert code == 0 and json.loads(out)["jobs_purged"] == 2

    code, out, err = run_cli(capsys, "jobs", "show", str(done), "--config", config)
    assert code == 0 and "files: job" in out and "deleted by the retention purge" in out and "purge" in out
    shown = json.loads(run_cli(capsys, "jobs", "show", str(done), "--json", "--config", config)[1])
    assert shown["files_purged_at"] and "deleted by the retention purge" in shown["files"]
    assert [s["step"] for s in shown["steps"]][-1] == "purge"

    code, out, err = run_cli(capsys, "jobs", "show", str(done), "--preview", str(tmp_path / "p.png"),
                             "--config", config)
    assert code == 2 and "deleted by the retention purge" in err and "no preview" in err and "Traceback" not in err
    assert not (tmp_path / "p.png").exists()

    code, out, err = run_cli(capsys, "jobs", "retry", str(discarded), "--config", config)
    assert code == 2 and "deleted by the retention purge" in err and "nothing is left" in err
    assert repo.get_job(node.db, discarded).status == "discarded"


def test_pin_and_unpin_commands(tmp_path: Path, node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = node.done()
    config = str(write_config(tmp_path, node))
    code, out, _ = run_cli(capsys, "jobs", "pin", str(job_id), "--config", config)
    assert code == 0 and "pinned" in out
    assert json.loads(run_cli(capsys, "jobs", "show", str(job_id), "--json", "--config", config)[1])["pinned"] is True
    code, out, _ = run_cli(capsys, "jobs", "unpin", str(job_id), "--json", "--config", config)
    assert code == 0 and json.loads(out) == {"id": job_id, "pinned": False, "changed": True, "files_purged_at": None}
    code, _, err = run_cli(capsys, "jobs", "pin", "999", "--config", config)
    assert code == 2 and "no job 999" in err


def test_status_shows_the_disk_and_the_headroom(tmp_path: Path, node: Node,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(tmp_path, node))
    status = json.loads(run_cli(capsys, "status", "--json", "--config", config)[1])
    assert set(status) >= {"counts", "oldest_waiting_at", "oldest_waiting_age_s", "last_error", "last_error_job_id"}
    disk = status["disk"]
    assert disk["total_bytes"] >= disk["free_bytes"] > 0 and disk["used_bytes"] > 0
    assert disk["headroom_days"] is None and disk["intake_bytes_per_day"] == 0
    assert "headroom until C-STOREs are refused: unknown" in run_cli(capsys, "status", "--config", config)[1]

    for _ in range(2):
        node.done(size=50_000)
    disk = json.loads(run_cli(capsys, "status", "--json", "--config", config)[1])["disk"]
    assert disk["archive_bytes"] == 2 * (50_000 + 500)
    assert disk["intake_bytes_per_day"] == 100_000  # a node younger than a day counts a whole day
    usable = disk["free_bytes"] - disk["min_free_bytes"]
    assert disk["headroom_days"] == pytest.approx(usable / 100_000, rel=0.01)


# --- the figures of a dry run on a node with a few hundred jobs (printed for the record) ---

def test_dry_run_figures_on_a_few_hundred_jobs(tmp_path: Path) -> None:
    """300 jobs received over 400 days (one every 32 hours, each in its own association): 240 done,
    30 discarded (bytes kept), 15 CT slices discarded (bytes not kept), 10 failed, 5 pinned; sources
    of the done and pinned ones 200 kB to 800 kB, of the others 1 kB."""
    node = make_node(tmp_path)
    kinds = ["done"] * 240 + ["discarded"] * 30 + ["ct"] * 15 + ["failed"] * 10 + ["pinned"] * 5
    kinds = [kinds[(i * 7) % 300] for i in range(300)]  # spread the kinds over time (7 is prime to 300)
    assert sorted(kinds) == sorted(["done"] * 240 + ["discarded"] * 30 + ["ct"] * 15 + ["failed"] * 10 + ["pinned"] * 5)
    ids = []
    for i, kind in enumerate(kinds):
        size = 200_000 + (i * 2003) % 600_000
        if kind in ("done", "pinned"):
            job_id = node.done(size=size)
            if kind == "pinned":
                repo.set_pinned(node.db, job_id, True)
        elif kind == "discarded":
            job_id = node.discarded()
        elif kind == "ct":
            job_id = node.receive(keep=False, sop_class=CT)
        else:
            job_id = node.failed_send()
        ids.append(job_id)
    peer = audit.Peer("127.0.0.1", 40000, "MODALITY", "CXRNODE")
    associations = [audit.record(node.db, peer, "rejected", "busy") for _ in ids]  # one per image
    # Age them: job i (and its association) ended (300 - i) * 32 hours ago.
    now = utcnow()
    with node.db.session() as session:
        from node.queue.tables import AssociationRecord, Instance, Job
        for i, (job_id, association_id) in enumerate(zip(ids, associations, strict=True)):
            job = session.get(Job, job_id)
            ended = now - timedelta(hours=32 * (300 - i))
            job.finished_at = job.updated_at = ended
            session.get(Instance, job.instance_id).received_at = ended - timedelta(minutes=1)
            row = session.get(AssociationRecord, association_id)
            row.started_at, row.ended_at = ended - timedelta(minutes=2), ended - timedelta(minutes=1)
    config = write_config(tmp_path, node)
    command = [sys.executable, "-m", "node", "archive", "purge", "--dry-run", "--json", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    dry = json.loads(done.stdout)
    human = subprocess.run(command[:-3] + ["--config", str(config)], capture_output=True, text=True, cwd=REPO,
                           timeout=120)
    print("\n$ cxrnode archive purge --dry-run --json  (300 jobs over 400 days, shipped [retention])")
    print(json.dumps({k: dry[k] for k in ("jobs_purged", "images", "results", "history", "audit", "tmp")}))
    print(human.stdout)

    ended_hours_ago = {job_id: 32 * (300 - i) for i, job_id in enumerate(ids)}
    kind_of = dict(zip(ids, kinds, strict=True))
    past = [j for j in ids if ended_hours_ago[j] > 30 * 24 and kind_of[j] in ("done", "discarded")]
    old = [j for j in ids if ended_hours_ago[j] > 365 * 24 and kind_of[j] in ("done", "discarded", "ct")]
    assert dry["jobs_purged"] == len(past)
    assert dry["images"]["jobs"] == len(past) and dry["images"]["files"] == len(past)
    assert dry["results"]["jobs"] == dry["results"]["files"] / 2 == len([j for j in past if kind_of[j] == "done"])
    assert dry["history"]["jobs"] == len(old)
    assert dry["audit"]["rows"] == len([i for i in range(300) if 32 * (300 - i) - 1 / 60 > 365 * 24])
    # The dry run changed nothing; the purge then deletes exactly that.
    assert node.rows("SELECT COUNT(*) FROM job_events WHERE step = 'purge'") == [(0,)]
    report = retention.purge(node.settings, node.db, node.archive)
    assert {k: report[k] for k in ("jobs_purged", "images", "results", "history")} == \
        {k: dry[k] for k in ("jobs_purged", "images", "results", "history")}
    assert all(node.has_files(j) for j in ids if kind_of[j] in ("failed", "pinned"))
