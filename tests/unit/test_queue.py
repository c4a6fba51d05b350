"""Job states, claims, leases, retries: the queue against a real SQLite file and a real
PostgreSQL database (every test runs on both: the ``queue_url`` fixture of tests/conftest.py)."""

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from node.queue import repository as repo
from node.queue.db import Database
from node.queue.states import ALLOWED, InvalidTransition, JobStatus, check_transition
from node.queue.tables import Job


@pytest.fixture
def db(tmp_path: Path, queue_url: str) -> Iterator[Database]:
    db = Database(tmp_path, queue_url)
    yield db
    db.dispose()


def received(n: int = 1) -> repo.ReceivedInstance:
    return repo.ReceivedInstance(f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "1.2.3.9",
                                 "1.2.840.10008.1.2.1", f"/x/{n}.dcm", 10, "SCU")


RESULTS = [repo.ArchivedResult("seg", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.9.1", "/r/seg.dcm"),
           repo.ArchivedResult("sr", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.9.2", "/r/sr.dcm")]


def test_every_state_has_a_transition_entry() -> None:
    assert set(ALLOWED) == set(JobStatus)
    check_transition("queued", "processing")
    with pytest.raises(InvalidTransition):
        check_transition("done", "queued")
    with pytest.raises(InvalidTransition):
        check_transition("queued", "done")


def test_enqueue_is_idempotent_per_sop_instance_uid(db: Database) -> None:
    first = repo.enqueue(db, received())
    again = repo.enqueue(db, received())
    assert not first.duplicate and again.duplicate and again.job_id == first.job_id
    job = repo.get_job(db, first.job_id)
    assert [(e.step, e.outcome) for e in job.events] == [("receive", "ok"), ("receive", "duplicate")]


def test_a_duplicate_with_different_bytes_is_recorded_on_both_backends(db: Database) -> None:
    """``duplicate-different`` (19 characters) fits ``job_events.outcome`` (PostgreSQL enforces
    the length; before revision 0009 it refused the event and the C-STORE was answered 0xA700)."""
    job_id = repo.enqueue(db, received()).job_id
    repo.record_duplicate(db, job_id, "MODALITY", "different content archived as 1.2.3.1.v2.dcm")
    outcomes = [(e.step, e.outcome) for e in repo.get_job(db, job_id).events]
    assert outcomes == [("receive", "ok"), ("receive", "duplicate"), ("receive", "duplicate-different")]


def test_happy_path_records_every_step(db: Database) -> None:
    job_id = repo.enqueue(db, received()).job_id
    assert repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "w1", 60) == job_id
    assert repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "w2", 60) is None
    repo.mark_encoded(db, job_id, "w1", 0.5, RESULTS, ["pacs", "backup"])
    assert repo.claim(db, JobStatus.ENCODED, JobStatus.SENDING, "s1", 60) == job_id
    repo.record_delivery(db, job_id, "pacs", None)
    repo.record_delivery(db, job_id, "backup", None)
    assert repo.finish_sending(db, job_id, "s1", max_attempts=3, delay_s=1) == JobStatus.DONE
    job = repo.get_job(db, job_id)
    assert job.status == "done" and job.finished_at is not None and job.attempts == 1
    assert [e.to_status for e in job.events if e.to_status] == [
        "queued", "processing", "encoded", "sending", "done"]


def test_send_failures_back_off_then_fail_and_retry_resends(db: Database) -> None:
    job_id = repo.enqueue(db, received()).job_id
    repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "w", 60)
    repo.mark_encoded(db, job_id, "w", 0.5, RESULTS, ["pacs"])
    for attempt in (1, 2):
        assert repo.claim(db, JobStatus.ENCODED, JobStatus.SENDING, "s", 60) == job_id
        assert repo.record_delivery(db, job_id, "pacs", "refused") == attempt
        status = repo.finish_sending(db, job_id, "s", max_attempts=2, delay_s=0 if attempt == 1 else 99)
        assert status == (JobStatus.ENCODED if attempt == 1 else JobStatus.FAILED)
    job = repo.get_job(db, job_id)
    assert job.fail_stage == "send" and "refused" in job.last_error
    assert repo.failed_job_ids(db) == [job_id]
    assert repo.retry(db, job_id) == JobStatus.ENCODED  # results exist: send again, no re-analysis
    assert repo.claim(db, JobStatus.ENCODED, JobStatus.SENDING, "s", 60) == job_id


def test_backoff_delays_the_next_claim(db: Database) -> None:
    job_id = repo.enqueue(db, received()).job_id
    repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "w", 60)
    assert repo.fail_attempt(db, job_id, "w", "boom", max_attempts=3, retry_delay_s=3600) == JobStatus.QUEUED
    assert repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "w", 60) is None


def test_inference_attempts_run_out(db: Database) -> None:
    job_id = repo.enqueue(db, received()).job_id
    for _ in range(2):
        repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "w", 60)
        last = repo.fail_attempt(db, job_id, "w", "boom", max_attempts=2, retry_delay_s=0)
    assert last == JobStatus.FAILED
    assert repo.retry(db, job_id) == JobStatus.QUEUED  # no results yet: analyse again


def test_expired_lease_is_reaped_and_the_late_worker_cannot_record(db: Database) -> None:
    job_id = repo.enqueue(db, received()).job_id
    repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "dead", 60)
    with db.session() as session:
        job = session.get(Job, job_id)
        job.lease_expires_at = job.lease_expires_at - timedelta(seconds=120)
    assert repo.reap_expired(db, max_attempts=3) == [job_id]
    assert repo.get_job(db, job_id).status == "queued"
    with pytest.raises(repo.LeaseLost):
        repo.mark_encoded(db, job_id, "dead", 0.5, RESULTS, ["pacs"])
    assert repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "alive", 60) == job_id


def test_discarded_job_and_status_counts(db: Database) -> None:
    a = repo.enqueue(db, received(1)).job_id
    repo.enqueue(db, received(2))
    repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "w", 60)
    repo.mark_discarded(db, a, "w", "ViewPosition LL is not one of PA, AP")
    status = repo.queue_status(db)
    assert status.counts["discarded"] == 1 and status.counts["queued"] == 1
    assert status.oldest_waiting_at is not None
    assert repo.get_job(db, a).discard_reason.startswith("ViewPosition LL")


def test_jobs_of_a_dead_local_process_are_released_at_once(db: Database) -> None:
    dead = repo.enqueue(db, received(1)).job_id
    other_host = repo.enqueue(db, received(2)).job_id
    living = repo.enqueue(db, received(3)).job_id
    repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "here:111:infer", 600)
    repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "there:111:infer", 600)
    repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "here:222:infer", 600)
    released = repo.release_orphans(db, "here", pid=999, alive=lambda pid: pid == 222)
    assert released == [dead]
    assert repo.get_job(db, dead).status == "queued"
    assert repo.get_job(db, other_host).status == "processing"  # left to its lease
    assert repo.get_job(db, living).status == "processing"
    # A restarted container has the same pid as the dead process: its leases are orphans too.
    assert repo.release_orphans(db, "here", pid=222, alive=lambda pid: True) == [living]


def test_a_deterministic_failure_is_not_retried(db: Database) -> None:
    job_id = repo.enqueue(db, received()).job_id
    repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "w", 60)
    status = repo.fail_attempt(db, job_id, "w", "EncodingError: bad header", max_attempts=3,
                               retry_delay_s=0, give_up=True)
    assert status == JobStatus.FAILED
    job = repo.get_job(db, job_id)
    assert job.attempts == 1 and job.fail_stage == "inference"


def test_a_destination_that_refuses_for_good_does_not_stop_the_others(db: Database) -> None:
    """A permanent refusal at one destination fails that delivery only: the other, down for a
    while, is still retried; the job fails once nothing is left to try, naming the refusal."""
    job_id = repo.enqueue(db, received()).job_id
    repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, "w1", 60)
    repo.mark_encoded(db, job_id, "w1", 0.5, RESULTS, ["viewer", "pacs"])
    repo.claim(db, JobStatus.ENCODED, JobStatus.SENDING, "s1", 60)
    repo.record_delivery(db, job_id, "viewer", "viewer does not accept SEG", permanent=True)
    repo.record_delivery(db, job_id, "pacs", "association refused")
    assert repo.finish_sending(db, job_id, "s1", max_attempts=5, delay_s=0) == JobStatus.ENCODED
    assert repo.pending_deliveries(db, job_id) == ["pacs"]  # the refusing viewer is not tried again

    repo.claim(db, JobStatus.ENCODED, JobStatus.SENDING, "s1", 60)
    repo.record_delivery(db, job_id, "pacs", None)
    assert repo.finish_sending(db, job_id, "s1", max_attempts=5, delay_s=0) == JobStatus.FAILED
    job = repo.get_job(db, job_id)
    assert job.last_error == "viewer: viewer does not accept SEG"
    assert {d.destination: d.delivered_at is not None for d in job.deliveries} == {"viewer": False, "pacs": True}

    assert repo.retry(db, job_id) == JobStatus.ENCODED  # an operator's retry tries the viewer again
    assert repo.pending_deliveries(db, job_id) == ["viewer"]


def test_concurrent_claims_take_each_job_exactly_once(db: Database) -> None:
    """Four workers (threads with their own connections) claim as fast as they can: every job is
    taken once (on PostgreSQL the claim's row lock is skipped by the others, never waited for)."""
    import threading

    jobs = {repo.enqueue(db, received(n)).job_id for n in range(40)}
    taken: list[int] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        while (job_id := repo.claim(db, JobStatus.QUEUED, JobStatus.PROCESSING, owner, 60)) is not None:
            with lock:
                taken.append(job_id)

    threads = [threading.Thread(target=work, args=(f"host:{n}:infer",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(taken) == sorted(jobs)
    assert repo.queue_status(db).counts["processing"] == len(jobs)
    assert all(len([e for e in repo.get_job(db, j).events if e.step == "claim"]) == 1 for j in jobs)


def test_the_readiness_check_reads_and_takes_the_write_lock(tmp_path: Path, db: Database) -> None:
    """``/readyz``'s database check on either backend: fine on an idle queue, failing (within its
    timeout) while another connection holds the lock every write needs."""
    import time

    from sqlalchemy import text

    from node.http.health import check_database

    assert check_database(tmp_path, db=db).startswith("answers and takes the write lock")
    with db.engine.connect() as other:
        if db.dialect == "postgresql":
            other.execute(text("LOCK TABLE jobs IN SHARE MODE"))  # reads go on, writes wait
        else:
            other.exec_driver_sql("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(Exception, match="lock"):
            check_database(tmp_path, timeout_s=0.5, db=db)
        assert time.monotonic() - started < 5
        other.rollback()
    assert check_database(tmp_path, db=db).startswith("answers")


def test_a_node_names_its_queue_in_the_log_without_the_password(tmp_path: Path, queue_url: str, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    from node.service import Service
    from node.settings import load_settings
    from node.wakeups import PostgresWakeups

    caplog.set_level(logging.INFO, logger="node.service")
    settings = load_settings(None, env={"CXRNODE_NODE_DATA_DIR": str(tmp_path / "var"),
                                        "CXRNODE_QUEUE_URL": queue_url, "CXRNODE_HTTP_ENABLED": "false"})
    service = Service(settings, listen=False, work=False)
    try:
        assert isinstance(service.wakeups, PostgresWakeups) == bool(queue_url)
        if queue_url:
            password = queue_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
            assert "queue: PostgreSQL cxrnode@127.0.0.1:" in caplog.text and password not in caplog.text
        else:
            assert f"queue: SQLite {(tmp_path / 'var' / 'queue.sqlite3').resolve()}" in caplog.text
    finally:
        service.wakeups.close()
        service.db.dispose()
