"""Alembic migrations: a new queue matches the tables, and a queue written by 0.1.0 upgrades losing nothing."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from node.queue import migrate
from node.queue import repository as repo
from node.queue.db import DATABASE_FILE, Database
from node.queue.states import JobStatus
from node.queue.tables import Base

V010_QUEUE = Path(__file__).resolve().parents[1] / "data" / "queues" / "v0.1.0.sqlite3"
REPO = Path(__file__).resolve().parents[2]
#: Jobs in the 0.1.0 fixture (tests/data/queues/make_v010_queue.py): id -> state.
V010_STATES = {1: "processing", 2: "encoded", 3: "sending", 4: "done", 5: "discarded", 6: "failed", 7: "failed",
               8: "queued"}


def rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(sql).fetchall()


def old_queue(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    target = tmp_path / DATABASE_FILE
    shutil.copy(V010_QUEUE, target)
    return target


def test_a_new_queue_is_at_head_and_matches_the_tables(tmp_path: Path) -> None:
    db = Database(tmp_path)
    assert migrate.current_revision(db.engine) == migrate.head_revision()
    with db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_the_v010_queue_upgrades_with_every_job_event_and_delivery(tmp_path: Path) -> None:
    path = old_queue(tmp_path)
    events_before = rows(path, "SELECT job_id, step, outcome, to_status FROM job_events ORDER BY id")
    deliveries_before = rows(path, "SELECT job_id, destination, attempts, delivered_at IS NOT NULL, last_error "
                                   "FROM deliveries ORDER BY id")
    results_before = rows(path, "SELECT id, seg_path, sr_path, seg_sop_instance_uid, sr_sop_instance_uid FROM jobs "
                                "WHERE seg_path IS NOT NULL ORDER BY id")
    assert {status for (status,) in rows(path, "SELECT status FROM jobs")} == set(JobStatus)

    db = Database(tmp_path)  # start-up upgrades
    assert migrate.current_revision(db.engine) == migrate.head_revision()
    with db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert dict(rows(path, "SELECT id, status FROM jobs")) == V010_STATES
    assert rows(path, "SELECT job_id, step, outcome, to_status FROM job_events ORDER BY id") == events_before
    assert rows(path, "SELECT job_id, destination, attempts, delivered_at IS NOT NULL, last_error "
                      "FROM deliveries ORDER BY id") == deliveries_before
    assert len(results_before) == 4  # encoded, sending, done, failed while sending
    for job_id, seg_path, sr_path, seg_uid, sr_uid in results_before:
        job = repo.get_job(db, job_id)
        assert (job.result("seg").path, job.result("seg").sop_instance_uid) == (seg_path, seg_uid)
        assert (job.result("sr").path, job.result("sr").sop_instance_uid) == (sr_path, sr_uid)
        assert job.result("seg").sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4"
        assert job.result("sc") is None
    assert [len(repo.get_job(db, i).results) for i in (1, 5, 7, 8)] == [0, 0, 0, 0]
    assert rows(path, "PRAGMA foreign_key_check") == []
    # 0004: every job is unpinned and unpurged; new jobs get the same defaults
    assert rows(path, "SELECT id, pinned, purged_at FROM jobs ORDER BY id") == [(i, 0, None) for i in V010_STATES]
    assert {c[1]: (c[2], c[3], c[4]) for c in rows(path, "PRAGMA table_info(jobs)")}["pinned"] == \
        ("BOOLEAN", 1, "0")  # NOT NULL, default false
    assert repo.set_pinned(db, 4, True) and repo.get_job(db, 4).pinned is True
    # 0005: no delivery has failed for good
    assert rows(path, "SELECT count(*) FROM deliveries WHERE failed_at IS NOT NULL") == [(0,)]
    # 0006: shadow mode's table exists, empty, and takes a row for an old job
    assert rows(path, "SELECT count(*) FROM shadow_results") == [(0,)]
    assert repo.record_shadow(db, 4, {"shadow_ref": "lung-unet@9", "champion_segmenter": "lung-unet@1.0.0",
                                      "champion_tb": "tb-scorer@1.0.0", "seconds": 0.0, "error": "x"}) == 1
    assert [r.job_id for r in repo.shadow_results(db)] == [4]

    # the upgraded queue keeps working: the queued job is claimed, the failed one retried as a resend
    assert repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "new:1:work", 60) == 8
    assert repo.retry(db, 6) == JobStatus.ENCODED
    assert repo.retry(db, 7) == JobStatus.QUEUED


def test_db_upgrade_command_reports_the_revisions(tmp_path: Path) -> None:
    old_queue(tmp_path / "var")
    config = tmp_path / "cxrnode.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')

    def upgrade() -> dict:
        done = subprocess.run([sys.executable, "-m", "node", "db", "upgrade", "--json", "--config", str(config)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert upgrade() == {"from_revision": "0001", "to_revision": migrate.head_revision(), "upgraded": True}
    assert upgrade() == {"from_revision": migrate.head_revision(), "to_revision": migrate.head_revision(),
                         "upgraded": False}


def test_a_failing_migration_leaves_the_old_queue_untouched(tmp_path: Path, monkeypatch) -> None:
    path = old_queue(tmp_path)
    before = rows(path, "SELECT * FROM jobs ORDER BY id")

    from alembic import command

    real_upgrade = command.upgrade

    def upgrade_then_fail(config, revision):  # type: ignore[no-untyped-def]
        real_upgrade(config, revision)
        raise RuntimeError("disk trouble in the middle of the upgrade")

    monkeypatch.setattr(command, "upgrade", upgrade_then_fail)
    with pytest.raises(RuntimeError, match="disk trouble"):
        Database(tmp_path)
    assert rows(path, "SELECT * FROM jobs ORDER BY id") == before
    assert "results" not in {name for (name,) in rows(path, "SELECT name FROM sqlite_master WHERE type='table'")}
