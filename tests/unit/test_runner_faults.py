"""Faults inside the worker's and the sender's turns are recorded on the job and the loops go on;
only a node that cannot work stops, with a non-zero exit code (node/loop.py, node/service.py).

The worker and sender are the real ones against a real queue (each test runs on the SQLite file
and on a PostgreSQL database: ``queue_url`` in tests/conftest.py) and archive; the pipeline is
a stand-in that returns fixed bytes (the networks are not what is tested here). Faults come from
``CXRNODE_FAULT_RAISE`` (node/faults.py), as in the served tests of tests/e2e/test_faults.py.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from node import faults
from node.archive import Archive, open_archive
from node.loop import GiveUp, backoff_s, run_loop
from node.queue import repository
from node.queue.db import Database
from node.queue.states import JobStatus
from node.queue.tables import Job, utcnow
from node.sender.runner import Sender
from node.service import EX_OK, EX_SOFTWARE, EX_TEMPFAIL, Service
from node.settings import Settings, load_settings
from node.worker.pipeline import EncodedObject, Outcome
from node.worker.runner import InferenceWorker
from tests.servers import free_port, queue_config

SEG_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"


class FakePipeline:
    """Returns a SEG and an SR of a few bytes; ``during_run`` lets a test act mid-analysis."""

    def __init__(self) -> None:
        self.runs = 0
        self.during_run = lambda: None

    def run(self, path: Path) -> Outcome:
        self.runs += 1
        self.during_run()
        return Outcome((EncodedObject("seg", SEG_CLASS, f"1.2.9.{self.runs}.1", b"seg bytes"),
                        EncodedObject("sr", SR_CLASS, f"1.2.9.{self.runs}.2", b"sr bytes")),
                       tb_score=0.25, summary="stand-in analysis")


@pytest.fixture
def settings(tmp_path: Path, queue_url: str) -> Settings:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n' + queue_config(queue_url) +
        "[worker]\nretry_delay_s = 0.0\nmax_attempts = 3\nlease_s = 0.6\npoll_interval_s = 0.01\n"
        "give_up_after_s = 0.3\n"
        "[send]\nbackoff_s = [0.0]\nmax_attempts = 3\ntimeout_s = 2.0\npoll_interval_s = 0.01\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {free_port()}\n')
    return load_settings(config, env={})


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    db = Database.for_settings(settings)
    yield db
    db.dispose()


@pytest.fixture
def archive(settings: Settings) -> Archive:
    return open_archive(settings)


@pytest.fixture
def pipeline() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def worker(settings: Settings, db: Database, archive: Archive, pipeline: FakePipeline) -> InferenceWorker:
    return InferenceWorker(settings, db, archive, pipeline, threading.Event())  # type: ignore[arg-type]


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def set_spec(spec: str) -> None:
        monkeypatch.setenv(faults.RAISE_ENV, spec)
    monkeypatch.delenv(faults.RAISE_ENV, raising=False)
    faults.reset()
    return set_spec


def queued_job(db: Database, archive: Archive, n: int = 1) -> int:
    """A queued job whose source is a few archived bytes (the stand-in pipeline never reads them)."""
    key = archive.received_key("1.2.3", f"1.2.3.{n}")
    archive.put(key, b"stand-in source")
    return repository.enqueue(db, repository.ReceivedInstance(
        f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.3.9", "1.2.840.10008.1.2.1",
        key, 15, "SCU")).job_id


def steps(db: Database, job_id: int) -> list[tuple[str, str, str]]:
    return [(e.step, e.outcome, e.message) for e in repository.get_job(db, job_id).events]


def expire_lease(db: Database, job_id: int) -> None:
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            lease_expires_at=utcnow() - timedelta(seconds=1)))


# ----- the fault points themselves -----

def test_fault_points_are_inert_when_unset(inject) -> None:  # type: ignore[no-untyped-def]
    for point in faults.RAISE_POINTS:
        faults.fire(point)  # nothing raised


def test_fault_kinds_raise_what_the_real_fault_raises_as_often_as_asked(inject) -> None:  # type: ignore[no-untyped-def]
    inject("result-write=ENOSPC:2,db-claim=locked,lease=lost:1,scu=RuntimeError:*,db-record=fatal")
    for _ in range(2):
        with pytest.raises(OSError) as full:
            faults.fire("result-write")
        assert full.value.errno == errno.ENOSPC
    faults.fire("result-write")  # used up
    with pytest.raises(OperationalError, match="database is locked"):
        faults.fire("db-claim")
    faults.fire("db-claim")  # the count defaults to 1
    with pytest.raises(repository.LeaseLost):
        faults.fire("lease")
    for _ in range(5):
        with pytest.raises(RuntimeError, match="fault injected at 'scu'"):
            faults.fire("scu")
    with pytest.raises(faults.FatalFault):
        faults.fire("db-record")
    assert not issubclass(faults.FatalFault, Exception)


def test_a_bad_fault_spec_is_refused(inject) -> None:  # type: ignore[no-untyped-def]
    inject("nowhere=ENOSPC")
    with pytest.raises(ValueError, match="point=kind"):
        faults.fire("scu")
    inject("scu=NoSuchKind")
    with pytest.raises(ValueError, match="unknown fault kind"):
        faults.fire("scu")


# ----- the worker -----

def test_full_disk_while_writing_results_retries_the_job_then_it_is_encoded(worker, db, archive, inject) -> None:  # type: ignore[no-untyped-def]
    job_id = queued_job(db, archive)
    inject("result-write=ENOSPC:1")
    assert worker.run_once() is True  # the fault did not escape
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.QUEUED and job.lease_owner is None
    assert job.last_error == "writing the results: OSError: [Errno 28] No space left on device: " \
                             "\"fault injected at 'result-write'\""
    assert list(archive.tmp.iterdir()) == []  # the partial write was removed
    assert worker.run_once() is True
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.ENCODED and job.attempts == 2 and job.last_error is None
    assert archive.read(archive.result_key(job_id, "sr")) == b"sr bytes"
    assert ("infer", "retry") in [(s, o) for s, o, _ in steps(db, job_id)]


def test_a_disk_that_stays_full_fails_the_job_with_the_reason(worker, db, archive, inject) -> None:  # type: ignore[no-untyped-def]
    job_id = queued_job(db, archive)
    inject("result-write=ENOSPC:*")
    for _ in range(3):
        assert worker.run_once() is True
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.FAILED and job.fail_stage == "inference" and job.attempts == 3
    assert "writing the results: OSError: [Errno 28]" in job.last_error
    assert worker.run_once() is False  # nothing left; the worker is still fine


def test_database_locked_while_recording_results_retries_the_job(worker, db, archive, inject) -> None:  # type: ignore[no-untyped-def]
    job_id = queued_job(db, archive)
    inject("db-record=locked:1")
    assert worker.run_once() is True
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.QUEUED
    assert job.last_error == "recording the results: OperationalError: database is locked"
    assert worker.run_once() is True
    assert repository.get_job(db, job_id).status == JobStatus.ENCODED


def test_when_even_the_failure_cannot_be_recorded_the_lease_expires_and_the_job_returns(worker, db, archive, inject) -> None:  # type: ignore[no-untyped-def]
    job_id = queued_job(db, archive)
    inject("db-record=unavailable:2")  # mark_encoded, then fail_attempt
    with pytest.raises(OperationalError, match="unable to open database file"):
        worker.run_once()  # for the loop to back off (see test_the_loop_backs_off_...)
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.PROCESSING  # still leased: nothing could be written
    expire_lease(db, job_id)
    assert repository.reap_expired(db, max_attempts=3) == [job_id]
    assert worker.run_once() is True
    assert repository.get_job(db, job_id).status == JobStatus.ENCODED


def test_lease_lost_mid_job_records_nothing_and_the_reaper_returns_the_job(worker, db, archive, pipeline, inject) -> None:  # type: ignore[no-untyped-def]
    job_id = queued_job(db, archive)
    inject("lease=lost:1")
    pipeline.during_run = lambda: time.sleep(0.4)  # the lease (0.6 s) is renewed after 0.2 s
    assert worker.run_once() is True
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.PROCESSING and not job.results  # results not recorded
    assert ("infer", "lease-lost") in [(s, o) for s, o, _ in steps(db, job_id)]
    expire_lease(db, job_id)
    assert repository.reap_expired(db, max_attempts=3) == [job_id]
    pipeline.during_run = lambda: None
    assert worker.run_once() is True
    assert repository.get_job(db, job_id).status == JobStatus.ENCODED


def test_another_worker_taking_the_job_mid_analysis_does_not_stop_this_one(worker, db, archive, pipeline) -> None:  # type: ignore[no-untyped-def]
    job_id = queued_job(db, archive)
    other = queued_job(db, archive, 2)

    def taken_over() -> None:
        with db.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_owner="elsewhere:1:infer"))
    pipeline.during_run = taken_over
    assert worker.run_once() is True  # LeaseLost from mark_encoded did not escape
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.PROCESSING and job.lease_owner == "elsewhere:1:infer"
    assert ("infer", "lease-lost") in [(s, o) for s, o, _ in steps(db, job_id)]
    pipeline.during_run = lambda: None
    assert worker.run_once() is True
    assert repository.get_job(db, other).status == JobStatus.ENCODED


def test_database_locked_at_the_claim_is_left_to_the_loop(worker, db, archive, inject) -> None:  # type: ignore[no-untyped-def]
    job_id = queued_job(db, archive)
    inject("db-claim=locked:1")
    with pytest.raises(OperationalError):
        worker.run_once()
    assert repository.get_job(db, job_id).status == JobStatus.QUEUED  # untouched
    assert worker.run_once() is True
    assert repository.get_job(db, job_id).status == JobStatus.ENCODED


def test_the_worker_loop_survives_a_locked_database_and_runs_the_next_job(worker, db, archive, inject) -> None:  # type: ignore[no-untyped-def]
    first, second = queued_job(db, archive, 1), queued_job(db, archive, 2)
    inject("db-claim=locked:2,result-write=EIO:1")
    thread = threading.Thread(target=worker.run_forever)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and {repository.get_job(db, j).status for j in (first, second)} \
                != {JobStatus.ENCODED}:
            time.sleep(0.05)
    finally:
        worker.stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert [repository.get_job(db, j).status for j in (first, second)] == ["encoded", "encoded"]
    assert "writing the results: OSError: [Errno 5]" in str(steps(db, first))


# ----- the sender -----

@pytest.fixture
def sender(settings: Settings, db: Database) -> Sender:
    return Sender(settings, db, threading.Event())


def encoded_job(db: Database, worker: InferenceWorker) -> int:
    job_id = queued_job(db, worker.archive)
    assert worker.run_once() is True
    assert repository.get_job(db, job_id).status == JobStatus.ENCODED
    return job_id


def test_an_unexpected_exception_in_the_scu_is_retried_not_fatal(worker, sender, db, inject) -> None:  # type: ignore[no-untyped-def]
    job_id = encoded_job(db, worker)
    inject("scu=RuntimeError:1")
    assert sender.run_once() is True
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.ENCODED  # retried (before: failed at once)
    (delivery,) = job.deliveries
    assert delivery.attempts == 1 and delivery.last_error == "RuntimeError: fault injected at 'scu'"
    # the stand-in's bytes are no DICOM: an error the sender did not expect either, retried
    # until send.max_attempts (3) like any other, then the job fails with the reason
    assert sender.run_once() and sender.run_once()
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.FAILED and job.fail_stage == "send"
    assert job.deliveries[0].attempts == 3 and job.last_error.startswith("pacs: InvalidDicomError")


def test_database_locked_while_finishing_a_send_round_is_recorded_and_retried(worker, sender, db, inject) -> None:  # type: ignore[no-untyped-def]
    job_id = encoded_job(db, worker)
    inject("db-record=locked:1")
    assert sender.run_once() is True
    job = repository.get_job(db, job_id)
    assert job.status == JobStatus.ENCODED and job.deliveries[0].attempts == 1  # not counted twice
    assert ("send", "error", "send round failed: OperationalError: database is locked") in steps(db, job_id)


def test_sender_raises_only_when_even_recording_fails(worker, sender, db, inject) -> None:  # type: ignore[no-untyped-def]
    job_id = encoded_job(db, worker)
    inject("db-claim=unavailable:1")
    with pytest.raises(OperationalError):
        sender.run_once()
    assert repository.get_job(db, job_id).status == JobStatus.ENCODED


# ----- the loop and the service -----

def test_the_loop_backs_off_exponentially_within_bounds() -> None:
    assert [backoff_s(n, 1.0, 300.0) for n in (1, 2, 3, 5, 6, 50)] == [1, 2, 4, 16, 30, 30]
    assert backoff_s(9, 0.2, 2.0) == 0.5  # a quarter of the give-up time
    assert backoff_s(3, 1.0, 0.1) == 1.0  # never below the poll interval


def test_the_loop_goes_on_after_failures_and_gives_up_only_after_the_time(caplog) -> None:  # type: ignore[no-untyped-def]
    stop, turns = threading.Event(), []

    def flaky() -> bool:
        turns.append(time.monotonic())
        if len(turns) <= 4:
            raise OperationalError("claim", None, Exception("database is locked"))
        stop.set()
        return True
    run_loop("test", flaky, stop, poll_s=0.01, give_up_after_s=60)
    assert len(turns) == 5  # four failures, then working again
    assert "working again after 4 failed turn(s)" in caplog.text

    def broken() -> bool:
        raise OperationalError("claim", None, Exception("unable to open database file"))
    started = time.monotonic()
    with pytest.raises(GiveUp, match=r"every turn failed for 0\.\d s .*unable to open database file"):
        run_loop("test", broken, threading.Event(), poll_s=0.01, give_up_after_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2


@pytest.fixture
def service(settings: Settings):  # type: ignore[no-untyped-def]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    service = Service(settings, listen=False, work=False)
    yield service
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def run_with_thread(service: Service, body) -> int:  # type: ignore[no-untyped-def]
    service.threads.append(threading.Thread(target=service._guarded("worker", body), name="worker",
                                            daemon=True))
    service.threads[-1].start()
    return service.run()


def test_service_exits_75_when_a_loop_gives_up(service, caplog) -> None:  # type: ignore[no-untyped-def]
    def claim() -> bool:
        raise OperationalError("claim", None, Exception("unable to open database file"))

    def unreachable() -> None:
        run_loop("worker", claim, service.stop, poll_s=0.01, give_up_after_s=0.2)
    with caplog.at_level(logging.INFO):
        assert run_with_thread(service, unreachable) == EX_TEMPFAIL == 75
    assert "the node cannot work: worker: every turn failed" in caplog.text
    assert "cxrnode exits with code 75" in caplog.text


def test_service_exits_70_when_a_thread_dies(service, caplog) -> None:  # type: ignore[no-untyped-def]
    def dies() -> None:
        raise faults.FatalFault("native crash")
    assert run_with_thread(service, dies) == EX_SOFTWARE == 70
    assert "worker thread died: FatalFault: native crash" in caplog.text


def test_service_exits_0_on_a_warm_stop(service) -> None:  # type: ignore[no-untyped-def]
    threading.Timer(0.3, service._on_signal, args=(signal.SIGTERM, None)).start()
    assert run_with_thread(service, lambda: service.stop.wait(30)) == EX_OK == 0
