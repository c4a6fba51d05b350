"""Alembic migrations: a new queue matches the tables, and a queue written by 0.1.0 upgrades losing
nothing, on SQLite and on PostgreSQL.

On SQLite the old queue is the file 0.1.0 wrote (tests/data/queues). On PostgreSQL, which 0.1.0 did
not support, it is built the way that release would have: Alembic's revision ``0001`` (the 0.1.0
schema) on an empty database, then every row of that same file copied in (jobs in every state,
their events, deliveries and SEG/SR columns, associations).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect, select, text
from sqlalchemy.pool import NullPool

from node.queue import migrate
from node.queue import repository as repo
from node.queue.db import DATABASE_FILE, Database, make_engine
from node.queue.states import JobStatus
from node.queue.tables import Base
from tests.servers import queue_config

pytestmark = pytest.mark.both_queues  # the `empty` and `old` fixtures pick the backend

V010_QUEUE = Path(__file__).resolve().parents[1] / "data" / "queues" / "v0.1.0.sqlite3"
REPO = Path(__file__).resolve().parents[2]
#: Jobs in the 0.1.0 fixture (tests/data/queues/make_v010_queue.py): id -> state.
V010_STATES = {1: "processing", 2: "encoded", 3: "sending", 4: "done", 5: "discarded", 6: "failed", 7: "failed",
               8: "queued"}


#: The tables of revision 0001, parents first.
V010_TABLES = ("instances", "associations", "jobs", "job_events", "deliveries")


@dataclass(frozen=True)
class Queue:
    """A queue under test: the SQLite file in ``data_dir`` (``url`` empty) or a PostgreSQL database."""

    data_dir: Path
    url: str = ""

    @property
    def path(self) -> Path:
        return self.data_dir / DATABASE_FILE


def rows(queue: Queue | Path, sql: str) -> list[tuple]:
    """The rows ``sql`` reads, on a connection of its own (not the node's engine)."""
    if isinstance(queue, Path) or not queue.url:
        with sqlite3.connect(queue if isinstance(queue, Path) else queue.path) as connection:
            return connection.execute(sql).fetchall()
    engine = create_engine(queue.url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def tables(queue: Queue) -> set[str]:
    engine = make_engine(queue.data_dir, url=queue.url, upgrade_schema=False)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def v010_on_postgresql(data_dir: Path, url: str) -> None:
    """The 0.1.0 queue on PostgreSQL: revision 0001, then the rows of the 0.1.0 file."""
    engine = make_engine(data_dir, url=url, upgrade_schema=False)
    source = create_engine(f"sqlite:///{old_queue(data_dir / 'source')}", poolclass=NullPool)
    try:
        assert migrate.upgrade(engine, "0001") == (None, "0001")
        schema = MetaData()
        schema.reflect(engine)
        with source.connect() as reading, engine.begin() as writing:
            for name in V010_TABLES:
                table = schema.tables[name]  # PostgreSQL's column types read the SQLite values
                copied = [dict(row._mapping) for row in reading.execute(select(table).order_by(table.c.id))]
                if copied:
                    writing.execute(table.insert(), copied)
                writing.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                                     f"(SELECT coalesce(max(id), 0) + 1 FROM {name}), false)"))
    finally:
        source.dispose()
        engine.dispose()


def old_queue(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    target = tmp_path / DATABASE_FILE
    shutil.copy(V010_QUEUE, target)
    return target


@pytest.fixture(params=["sqlite", "postgresql"])
def old(request: pytest.FixtureRequest, tmp_path: Path) -> Queue:
    """The queue 0.1.0 wrote, on each backend."""
    if request.param == "sqlite":
        old_queue(tmp_path)
        return Queue(tmp_path)
    url = str(request.getfixturevalue("empty_postgresql_url"))
    v010_on_postgresql(tmp_path, url)
    return Queue(tmp_path, url)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty(request: pytest.FixtureRequest, tmp_path: Path) -> Queue:
    """No queue yet: an empty data folder, or an empty PostgreSQL database."""
    if request.param == "sqlite":
        return Queue(tmp_path)
    return Queue(tmp_path, str(request.getfixturevalue("empty_postgresql_url")))


def test_a_new_queue_is_at_head_and_matches_the_tables(empty: Queue) -> None:
    db = Database(empty.data_dir, empty.url)
    assert migrate.current_revision(db.engine) == migrate.head_revision()
    with db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    db.dispose()


def test_0007_turns_host_paths_into_archive_keys(empty: Queue) -> None:
    """A queue of 0006 held the host paths of the files under ``<data_dir>/archive``; after 0007
    it holds keys relative to the archive, and a value under no archive folder is left alone."""
    db = Database(empty.data_dir, empty.url)
    paths = {1: "/var/lib/cxrnode/archive/received/1.2.3/1.2.3.1.dcm",  # data_dir absolute
             2: "var/archive/received/1.2.3/1.2.3.2.dcm",  # data_dir relative to the working directory
             3: "received/1.2.3/1.2.3.3.dcm",  # a key already
             4: "/mnt/elsewhere/4.dcm"}  # never written by the node
    for n, path in paths.items():
        repo.enqueue(db, repo.ReceivedInstance(f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.3.9",
                                               "1.2.840.10008.1.2.1", path, 10, "SCU"))
    assert repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "old:1:w", 60) == 1
    repo.mark_encoded(db, 1, "old:1:w", 0.5, [
        repo.ArchivedResult("seg", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.9.1", "/var/lib/cxrnode/archive/results/1/seg.dcm"),
        repo.ArchivedResult("sr", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.9.2", "/srv/x/archive/results/1/sr.dcm")], [])
    repo.record_discarded(db, repo.ReceivedInstance("1.2.3.5", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.9",
                                                    "1.2.840.10008.1.2.1", "", 0, "SCU"), "CT: not kept")
    with db.engine.begin() as connection:  # back to 0006's schema (0007 changes no table, 0008 adds an index)
        connection.execute(text("DROP INDEX ix_jobs_claim"))
        connection.execute(text("UPDATE alembic_version SET version_num = '0006'"))
    db.dispose()

    engine = Database(empty.data_dir, empty.url).engine  # opening the queue upgrades it
    assert migrate.current_revision(engine) == migrate.head_revision()
    with engine.connect() as connection:
        instances = dict(connection.execute(text("SELECT id, path FROM instances ORDER BY id")).all())
        results = connection.execute(text("SELECT kind, path FROM results ORDER BY kind")).all()
    assert instances == {1: "received/1.2.3/1.2.3.1.dcm", 2: "received/1.2.3/1.2.3.2.dcm",
                         3: "received/1.2.3/1.2.3.3.dcm", 4: "/mnt/elsewhere/4.dcm", 5: ""}
    assert [tuple(r) for r in results] == [("seg", "results/1/seg.dcm"), ("sr", "results/1/sr.dcm")]
    engine.dispose()


def test_the_v010_queue_upgrades_with_every_job_event_and_delivery(old: Queue) -> None:
    path = old
    assert rows(path, "SELECT count(*) FROM jobs") == [(len(V010_STATES),)]
    associations_before = rows(path, "SELECT * FROM associations ORDER BY id")
    instances_before = rows(path, "SELECT * FROM instances ORDER BY id")
    assert len(instances_before) == len(V010_STATES)  # (0.1.0 wrote no association rows in the fixture)
    events_before = rows(path, "SELECT job_id, step, outcome, to_status FROM job_events ORDER BY id")
    deliveries_before = rows(path, "SELECT job_id, destination, attempts, delivered_at IS NOT NULL, last_error "
                                   "FROM deliveries ORDER BY id")
    results_before = rows(path, "SELECT id, seg_path, sr_path, seg_sop_instance_uid, sr_sop_instance_uid FROM jobs "
                                "WHERE seg_path IS NOT NULL ORDER BY id")
    assert {status for (status,) in rows(path, "SELECT status FROM jobs")} == set(JobStatus)

    db = Database(old.data_dir, old.url)  # start-up upgrades
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
    assert rows(path, "SELECT * FROM associations ORDER BY id") == associations_before
    assert rows(path, "SELECT * FROM instances ORDER BY id") == instances_before  # 0007: its paths lie under no archive/ folder
    # 0004: every job is unpinned and unpurged; new jobs get the same defaults
    assert rows(path, "SELECT id, pinned, purged_at FROM jobs ORDER BY id") == [(i, 0, None) for i in V010_STATES]
    if old.url:  # PostgreSQL checks foreign keys itself, always
        assert rows(path, "SELECT data_type, is_nullable, column_default FROM information_schema.columns "
                          "WHERE table_name = 'jobs' AND column_name = 'pinned'") == [("boolean", "NO", "false")]
    else:
        assert rows(path, "PRAGMA foreign_key_check") == []
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
    # a new job after the copied ones: the ids go on from there
    new = repo.enqueue(db, repo.ReceivedInstance("1.2.3.99", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.3.9",
                                                 "1.2.840.10008.1.2.1", "/x/99.dcm", 10, "SCU"))
    assert new.job_id == len(V010_STATES) + 1
    db.dispose()


def test_db_upgrade_command_reports_the_revisions(tmp_path: Path, old: Queue) -> None:
    config = tmp_path / "cxrnode.toml"
    config.write_text(f'[node]\ndata_dir = "{old.data_dir}"\n' + queue_config(old.url))

    def cxrnode(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "node", *args, "--json", "--config", str(config)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert cxrnode("db", "upgrade") == {"from_revision": "0001", "to_revision": migrate.head_revision(),
                                        "upgraded": True}
    assert cxrnode("db", "upgrade") == {"from_revision": migrate.head_revision(),
                                        "to_revision": migrate.head_revision(), "upgraded": False}
    # the operator's commands read the same queue
    assert cxrnode("status")["counts"] == {state: list(V010_STATES.values()).count(state) for state in JobStatus}


def test_a_failing_migration_leaves_the_old_queue_untouched(old: Queue, monkeypatch) -> None:
    path = old
    before = rows(path, "SELECT * FROM jobs ORDER BY id")

    from alembic import command

    real_upgrade = command.upgrade

    def upgrade_then_fail(config, revision):  # type: ignore[no-untyped-def]
        real_upgrade(config, revision)
        raise RuntimeError("disk trouble in the middle of the upgrade")

    monkeypatch.setattr(command, "upgrade", upgrade_then_fail)
    with pytest.raises(RuntimeError, match="disk trouble"):
        Database(old.data_dir, old.url)
    assert rows(path, "SELECT * FROM jobs ORDER BY id") == before
    assert "results" not in tables(old)
    engine = make_engine(old.data_dir, url=old.url, upgrade_schema=False)
    # the 0.1.0 file was never stamped (its stamp was rolled back too); the PostgreSQL one was built at 0001
    assert migrate.current_revision(engine) == ("0001" if old.url else None)
    engine.dispose()


def test_processes_starting_together_on_postgresql_upgrade_one_after_the_other(
        tmp_path: Path, empty_postgresql_url: str) -> None:
    """Several node processes (hosts) opening one empty PostgreSQL queue at once: one creates the
    tables, the others wait for its advisory lock and find them there; none fails."""
    import threading

    opened: list[Database] = []
    failures: list[BaseException] = []

    def start(n: int) -> None:
        try:
            opened.append(Database(tmp_path / str(n), empty_postgresql_url))
        except BaseException as exc:  # noqa: BLE001 - the assertion below names it
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == [] and len(opened) == 4
    assert {migrate.current_revision(db.engine) for db in opened} == {migrate.head_revision()}
    for db in opened:
        db.dispose()
