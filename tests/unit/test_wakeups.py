"""Wake-ups between the stages (node.wakeups): with the poll set to an hour, a job still goes from
queued to encoded to sent, because the listener rings the worker and the worker rings the sender.

The worker and sender are the real loops on a real SQLite queue; the pipeline is a stand-in (the
networks play no part in when a job is taken up) and the destination is a pynetdicom Storage SCP
on loopback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from node.archive import Archive
from node.queue import repository
from node.queue.db import Database
from node.queue.states import JobStatus
from node.sender.runner import Sender
from node.settings import Settings, load_settings
from node.wakeups import Stage, Wakeups
from node.worker.runner import InferenceWorker
from tests.dicom_factory import FIXTURE_DIR, make_dx
from tests.servers import free_port, wait_until
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
def hourly(tmp_path: Path, pacs: RecordingPacs) -> Settings:
    """Settings whose worker and sender poll once an hour: only a bell can start a job in a test."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n'
        f"[worker]\npoll_interval_s = {HOUR}\n[send]\npoll_interval_s = {HOUR}\ntimeout_s = 10.0\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n')
    return load_settings(config, env={})


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


def test_with_an_hourly_poll_the_bells_carry_a_job_from_queued_to_the_pacs(
        tmp_path: Path, hourly: Settings, pacs: RecordingPacs) -> None:
    db, archive, stop, bells = Database(hourly.data_path), Archive(hourly.data_path), threading.Event(), Wakeups()
    pipeline = DxPipeline(tmp_path)
    worker = InferenceWorker(hourly, db, archive, pipeline, stop, bells)  # type: ignore[arg-type]
    sender = Sender(hourly, db, stop, bells)
    threads = [threading.Thread(target=loop, daemon=True) for loop in (worker.run_forever, sender.run_forever)]
    for thread in threads:
        thread.start()
    try:
        # both loops have taken their first turn (nothing to do) and now wait an hour for a bell
        wait_until(lambda: all(t.is_alive() for t in threads), 10, what="the loops started")
        job_id = queued_job(db)
        bells.ring(Stage.QUEUED)  # what the listener does after committing the job
        wait_until(lambda: repository.get_job(db, job_id).status == JobStatus.DONE, 60,
                   what="the job done without a poll")
        assert pacs.stored == [str(repository.get_job(db, job_id).result("seg").sop_instance_uid)]
        assert pipeline.runs == 1
    finally:
        stop.set()
        bells.ring_all()
        for thread in threads:
            thread.join(30)
    assert not any(t.is_alive() for t in threads), "ring_all did not end the hour-long waits"


def test_without_a_bell_the_job_waits_for_the_poll(tmp_path: Path, hourly: Settings, pacs: RecordingPacs) -> None:
    """The control for the test above: no ring, an hourly poll, and the job stays queued."""
    db, archive, stop = Database(hourly.data_path), Archive(hourly.data_path), threading.Event()
    pipeline = DxPipeline(tmp_path)
    bells = Wakeups()
    worker = InferenceWorker(hourly, db, archive, pipeline, stop, bells)  # type: ignore[arg-type]
    turns: list[bool] = []
    take_turn = worker.run_once
    worker.run_once = lambda: turns.append(take_turn()) or turns[-1]  # type: ignore[method-assign]
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        wait_until(lambda: turns == [False], 30, what="the worker's first turn (nothing queued)")
        job_id = queued_job(db)
        stop.wait(2.0)
        assert repository.get_job(db, job_id).status == JobStatus.QUEUED
        assert pipeline.runs == 0 and turns == [False]
    finally:
        stop.set()
        bells.ring_all()
        thread.join(30)


def test_the_listener_rings_the_worker_for_a_new_image_only_and_turns_nagle_off(
        tmp_path: Path, hourly: Settings) -> None:
    """A C-STORE rings ``queued`` once its job is committed; a duplicate (not queued again) does not.
    Accepted connections have TCP_NODELAY set (node.dicom.no_delay)."""
    import dataclasses
    import socket

    from node.scp import server as scp_server

    settings = dataclasses.replace(hourly, node=dataclasses.replace(hourly.node, host="127.0.0.1", port=free_port(),
                                                                    min_free_disk_mb=1))
    db, archive, bells = Database(settings.data_path), Archive(settings.data_path), Wakeups()
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
