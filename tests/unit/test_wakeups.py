"""Wake-ups between the stages (node.wakeups): with the poll set to an hour, a job still goes from
queued to encoded to sent, because the listener rings the worker and the worker rings the sender;
on PostgreSQL also when they are different processes (two or three ``Database`` objects with their
own wake-ups, as separate processes would have, on one real server), and after the server restarts.

The worker and sender are the real loops on a real queue (SQLite and PostgreSQL); the pipeline is
a stand-in (the networks play no part in when a job is taken up) and the destination is a
pynetdicom Storage SCP on loopback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from node.archive import open_archive
from node.queue import repository
from node.queue.db import Database
from node.queue.states import JobStatus
from node.sender.runner import Sender
from node.settings import Settings, load_settings
from node.wakeups import PostgresWakeups, Stage, Wakeups, wakeups_for
from node.worker.runner import InferenceWorker
from tests.dicom_factory import FIXTURE_DIR, make_dx
from tests.servers import PostgreSQL, free_port, queue_config, wait_until
from tests.unit.test_runner_faults import FakePipeline, queued_job

HOUR = 3600.0


def test_a_ring_before_the_wait_is_not_lost_and_is_used_once() -> None:
    bells = Wakeups()
    bells.ring(Stage.QUEUED)
    assert bells.wait(Stage.QUEUED, HOUR) is True  # rung while the waiter was busy: returns at once
    assert bells.wait(Stage.QUEUED, 0.01) is False  # cleared: the next wait is a poll again
    bells.ring(Stage.ENCODED)
    assert bells.wait(Stage.QUEUED, 0.01) is False  # one stage's bell does not wake the other


def test_ring_all_wakes_a_waiter_at_once() -> None:
    bells = Wakeups()
    woke = threading.Event()

    def waiter() -> None:
        bells.wait(Stage.ENCODED, HOUR)
        woke.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    bells.ring_all()
    assert woke.wait(30), "ring_all did not wake the waiter"


class RecordingPacs:
    """A Storage SCP that records the SOP Instance UIDs it stored."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stored: list[str] = []
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@pytest.fixture
def pacs() -> Iterator[RecordingPacs]:
    pacs = RecordingPacs()
    yield pacs
    pacs.server.shutdown()


@pytest.fixture
def hourly(tmp_path: Path, pacs: RecordingPacs, queue_url: str) -> Settings:
    """Settings whose worker and sender poll once an hour: only a bell can start a job in a test."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n' + queue_config(queue_url) +
        f"[worker]\npoll_interval_s = {HOUR}\n[send]\npoll_interval_s = {HOUR}\ntimeout_s = 10.0\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n')
    return load_settings(config, env={})


def settled(bells: Wakeups) -> Wakeups:
    """``bells`` quiet: on PostgreSQL listening, and the ring of every bell it gives on connecting
    (for what was rung before it listened) consumed."""
    if isinstance(bells, PostgresWakeups):
        assert bells.listening.wait(30), "the wake-up listener did not connect"
    for stage in Stage:
        bells.wait(stage, 0)
    return bells


@pytest.fixture
def process(hourly: Settings) -> Iterator[tuple[Database, Wakeups]]:
    """The queue and the bells of one node process, as ``node.service`` makes them."""
    db = Database.for_settings(hourly)
    bells = settled(wakeups_for(db))
    assert isinstance(bells, PostgresWakeups) == (db.dialect == "postgresql")
    yield db, bells
    bells.close()
    db.dispose()


class DxPipeline(FakePipeline):
    """The stand-in's outcome, with a real DICOM object as its SEG (so that it can be sent)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.data = (folder / "result.dcm")
        make_dx(FIXTURE_DIR / "MCUCXR_0017_0.png", size=(64, 64)).save_as(self.data, enforce_file_format=True)

    def run(self, path: Path):  # type: ignore[no-untyped-def]
        from pydicom import dcmread

        from node.worker.pipeline import EncodedObject, Outcome

        self.runs += 1
        ds = dcmread(self.data)
        return Outcome((EncodedObject("seg", str(ds.SOPClassUID), str(ds.SOPInstanceUID), self.data.read_bytes()),),
                       tb_score=0.25, summary="stand-in analysis")


@contextmanager
def loops_running(worker: InferenceWorker, sender: Sender) -> Iterator[None]:
    """The worker's and the sender's loops, each in a thread, until the block ends; then their stop
    flag is set and their bells rung, and both must end (not wait out their hour-long poll)."""
    threads = [threading.Thread(target=loop, daemon=True) for loop in (worker.run_forever, sender.run_forever)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(t.is_alive() for t in threads), 10, what="the loops started")
        yield
    finally:
        worker.stop.set()
        for loop in (worker, sender):
            assert loop.wakeups is not None
            loop.wakeups.ring_all()
        for thread in threads:
            thread.join(30)
    assert not any(t.is_alive() for t in threads), "ring_all did not end the hour-long waits"


def test_with_an_hourly_poll_the_bells_carry_a_job_from_queued_to_the_pacs(
        tmp_path: Path, hourly: Settings, pacs: RecordingPacs, process: tuple[Database, Wakeups]) -> None:
    (db, bells), archive, stop = process, open_archive(hourly), threading.Event()
    pipeline = DxPipeline(tmp_path)
    worker = InferenceWorker(hourly, db, archive, pipeline, stop, bells)  # type: ignore[arg-type]
    with loops_running(worker, Sender(hourly, db, stop, bells)):
        job_id = queued_job(db, archive)
        bells.ring(Stage.QUEUED)  # what the listener does after committing the job
        wait_until(lambda: repository.get_job(db, job_id).status == JobStatus.DONE, 60,
                   what="the job done without a poll")
        assert pacs.stored == [str(repository.get_job(db, job_id).result("seg").sop_instance_uid)]
        assert pipeline.runs == 1


def test_without_a_bell_the_job_waits_for_the_poll(tmp_path: Path, hourly: Settings, pacs: RecordingPacs,
                                                   process: tuple[Database, Wakeups]) -> None:
    """The control for the test above: no ring, an hourly poll, and the job stays queued."""
    (db, bells), archive, stop = process, open_archive(hourly), threading.Event()
    pipeline = DxPipeline(tmp_path)
    worker = InferenceWorker(hourly, db, archive, pipeline, stop, bells)  # type: ignore[arg-type]
    turns: list[bool] = []
    take_turn = worker.run_once
    worker.run_once = lambda: turns.append(take_turn()) or turns[-1]  # type: ignore[method-assign]
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        wait_until(lambda: turns == [False], 30, what="the worker's first turn (nothing queued)")
        job_id = queued_job(db, archive)
        stop.wait(2.0)
        assert repository.get_job(db, job_id).status == JobStatus.QUEUED
        assert pipeline.runs == 0 and turns == [False]
    finally:
        stop.set()
        bells.ring_all()
        thread.join(30)


def test_the_listener_rings_the_worker_for_a_new_image_only_and_turns_nagle_off(
        tmp_path: Path, hourly: Settings, process: tuple[Database, Wakeups]) -> None:
    """A C-STORE rings ``queued`` once its job is committed; a duplicate (not queued again) does not.
    Accepted connections have TCP_NODELAY set (node.dicom.no_delay)."""
    import dataclasses
    import socket

    from node.scp import server as scp_server

    settings = dataclasses.replace(hourly, node=dataclasses.replace(hourly.node, host="127.0.0.1", port=free_port(),
                                                                    min_free_disk_mb=1))
    (db, bells), archive = process, open_archive(settings)
    ae, server = scp_server.start(settings, db, archive, bells)
    dx = make_dx(FIXTURE_DIR / "MCUCXR_0017_0.png", size=(64, 64))
    try:
        scu = AE(ae_title="TESTSCU")
        scu.add_requested_context(dx.SOPClassUID, dx.file_meta.TransferSyntaxUID)
        assoc = scu.associate("127.0.0.1", settings.node.port, ae_title=settings.node.ae_title)
        assert assoc.is_established
        try:
            (accepted,) = ae.active_associations
            assert accepted.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert assoc.send_c_store(dx).Status == 0x0000
            assert bells.wait(Stage.QUEUED, 60) is True
            assert repository.queue_status(db).counts.get("queued") == 1
            assert assoc.send_c_store(dx).Status == 0x0000  # the same SOP Instance UID again
            assert bells.wait(Stage.QUEUED, 1.0) is False
        finally:
            assoc.release()
    finally:
        ae.shutdown()


# ----- across processes: PostgreSQL's LISTEN/NOTIFY -----

def open_process(tmp_path: Path, url: str) -> tuple[Database, PostgresWakeups]:
    """What one more node process on the queue at ``url`` has: its own engine and its own listener."""
    db = Database(tmp_path, url)
    bells = settled(wakeups_for(db))
    assert isinstance(bells, PostgresWakeups)
    return db, bells


@pytest.fixture
def two_processes(tmp_path: Path, postgresql_url: str) -> Iterator[list[tuple[Database, PostgresWakeups]]]:
    processes = [open_process(tmp_path / name, postgresql_url) for name in ("a", "b")]
    yield processes
    for db, bells in processes:
        bells.close()
        db.dispose()


def waiting(bells: Wakeups, stage: Stage) -> tuple[threading.Thread, list[bool]]:
    """A thread waiting an hour (the poll) on ``stage``; its answer lands in the list."""
    answer: list[bool] = []
    thread = threading.Thread(target=lambda: answer.append(bells.wait(stage, HOUR)), daemon=True)
    thread.start()
    return thread, answer


def test_a_ring_in_one_process_wakes_a_wait_in_another(two_processes) -> None:  # type: ignore[no-untyped-def]
    (_, a), (_, b) = two_processes
    thread, answer = waiting(b, Stage.QUEUED)
    started = time.monotonic()
    a.ring(Stage.QUEUED)
    thread.join(30)
    assert answer == [True], "the other process's hour-long wait was not woken"
    assert time.monotonic() - started < 5
    assert b.wait(Stage.ENCODED, 0.5) is False  # only the rung stage's bell
    assert a.wait(Stage.QUEUED, 0) is True  # the ringer's own bell, set at once
    assert a.wait(Stage.QUEUED, 1.0) is False  # its own notification does not ring it a second time


def test_the_control_nothing_rung_nothing_wakes(two_processes) -> None:  # type: ignore[no-untyped-def]
    """The control for the test above: no ring, and the other process's wait goes on."""
    (_, a), (_, b) = two_processes
    thread, answer = waiting(b, Stage.QUEUED)
    a.ring(Stage.ENCODED)  # another stage's bell
    thread.join(3.0)
    assert thread.is_alive() and answer == []
    b.ring_all()  # ends the wait: ring_all is this process's alone
    thread.join(30)
    assert answer == [True]
    assert a.wait(Stage.QUEUED, 0.5) is False


@pytest.mark.parametrize("queue_url", ["postgresql"], indirect=True)
def test_on_postgresql_the_bells_carry_a_job_through_three_processes(
        tmp_path: Path, hourly: Settings, pacs: RecordingPacs) -> None:
    """Listener, worker and sender each in a process of its own (own engine, own listener), polling
    hourly: the job still reaches the PACS at once, woken by NOTIFY from process to process."""
    assert hourly.queue.url, "this test is for PostgreSQL"
    (listener_db, listener), (worker_db, worker_bells), (sender_db, sender_bells) = (
        open_process(tmp_path / name, hourly.queue.url) for name in ("listener", "worker", "sender"))
    stop, pipeline = threading.Event(), DxPipeline(tmp_path)
    worker = InferenceWorker(hourly, worker_db, open_archive(hourly), pipeline, stop,  # type: ignore[arg-type]
                             worker_bells)
    try:
        with loops_running(worker, Sender(hourly, sender_db, stop, sender_bells)):
            time.sleep(0.5)  # both took their first turn and wait an hour
            job_id = queued_job(listener_db, worker.archive)
            listener.ring(Stage.QUEUED)
            wait_until(lambda: repository.get_job(listener_db, job_id).status == JobStatus.DONE, 60,
                       what="the job done without a poll")
            assert pacs.stored == [str(repository.get_job(listener_db, job_id).result("seg").sop_instance_uid)]
            assert pipeline.runs == 1
    finally:
        for db, bells in ((listener_db, listener), (worker_db, worker_bells), (sender_db, sender_bells)):
            bells.close()
            db.dispose()


def test_the_listener_survives_a_server_restart(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The server restarts under two listening processes: each reconnects on its own (the node
    goes on, polling meanwhile) and rings its bells once; notifications flow again."""
    server = PostgreSQL().start()
    try:
        server.execute("CREATE DATABASE queue")
        (a_db, a), (b_db, b) = (open_process(tmp_path / name, server.url("queue")) for name in ("a", "b"))
        try:
            server.restart()
            wait_until(lambda: not (a.listening.is_set() and b.listening.is_set()), 30, 0.05,
                       what="the listeners noticed the restart")
            wait_until(lambda: a.listening.is_set() and b.listening.is_set(), 60, 0.05,
                       what="the listeners reconnected")
            assert b.wait(Stage.QUEUED, 0) is True  # rung on reconnecting: what was missed is looked for
            settled(a), settled(b)
            thread, answer = waiting(b, Stage.ENCODED)
            a.ring(Stage.ENCODED)
            thread.join(30)
            assert answer == [True]
            assert "wake-ups: not listening to PostgreSQL" in caplog.text
        finally:
            for db, bells in ((a_db, a), (b_db, b)):
                bells.close()
                db.dispose()
    finally:
        server.stop()
