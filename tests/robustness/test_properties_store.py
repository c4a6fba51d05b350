"""Property: the C-STORE handler answers every damaged dataset with a documented status and
loses nothing valid; the worker gives every stored mutant a defined outcome (hypothesis).

The handler runs in the real in-process listener and the mutants are sent by a real pynetdicom
SCU as raw bytes (pynetdicom's chunked send: the damaged dataset bytes travel unchanged) on one
association that is reused across examples. That costs a few milliseconds per example, cheap
enough that no fake event object is needed.

Properties, for every mutant sent under a fresh SOP Instance UID:

* the status is Success, 0xA900 (UIDs) or 0xC210 (undecodable), never 0xC211 (a crash in the
  handler) and never no answer;
* Success means archived and queued exactly once: one new instance and job, whose file ends
  with exactly the bytes sent; anything else means nothing new in the queue or the archive;
* an unchanged mutant (a control) is always Success;
* after all examples: C-ECHO answers, the tmp folder is empty, nothing is outside the archive.

The worker property sends fewer mutants (each runs the real networks) and checks that every
stored one ends ``done`` or ``discarded`` with a reason, never ``failed`` or stuck, malformed
Type 2 patient/study values included (the encoders repair them, see node/results/source.py).
"""

from __future__ import annotations

import faulthandler
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.association import Association

from node.dicom import ANALYSED_SOP_CLASSES as ACCEPTED_SOP_CLASSES, VERIFICATION, Status
from node.queue import repository
from tests.dicom_factory import part10_bytes
from tests.robustness.harness import CALLING_AE, LocalNode, store
from tests.robustness.mutations import KEYWORDS, Mutant, fresh_uid, mutants

pytestmark = pytest.mark.filterwarnings("ignore")

HANG_S = 60
DOCUMENTED = {Status.SUCCESS, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, Status.CANNOT_UNDERSTAND}
SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEGLSLossless,
            JPEG2000Lossless)
PROPERTY = settings(derandomize=True, database=None, deadline=5000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Sender:
    """One association with a context per (SOP class, transfer syntax), re-opened if lost."""

    def __init__(self, node: LocalNode) -> None:
        self.node = node
        self.assoc: Association | None = None

    def send(self, path: Path) -> int:
        if self.assoc is None or not self.assoc.is_established:
            ae = AE(ae_title=CALLING_AE)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            for sop_class in ACCEPTED_SOP_CLASSES:
                for syntax in SYNTAXES:
                    ae.add_requested_context(sop_class, [syntax])
            ae.add_requested_context(VERIFICATION)
            self.assoc = ae.associate("127.0.0.1", self.node.port, ae_title="CXRNODE")
            assert self.assoc.is_established
        return store(self.assoc, path)

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


@pytest.fixture
def sender(listener: LocalNode) -> Iterator[Sender]:
    sender = Sender(listener)
    yield sender
    sender.close()


def check_store(node: LocalNode, sender: Sender, workdir: Path, mutant: Mutant,
                statuses: Counter[int] | None = None) -> str | None:
    """Send one mutant under a fresh UID and check the handler's answer; its UID if stored."""
    uid = fresh_uid()
    meta, data = mutant.encode(uid)
    path = workdir / "mutant.dcm"
    path.write_bytes(part10_bytes(meta, data))
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        status = sender.send(path)
    finally:
        faulthandler.cancel_dump_traceback_later()
    event(f"C-STORE status 0x{status:04X}")
    if statuses is not None:
        statuses[status] += 1
    assert status in DOCUMENTED, f"status 0x{status:04X}"
    if mutant.is_unchanged:
        assert status == Status.SUCCESS
    if status != Status.SUCCESS:
        assert repository.known_instance(node.db, uid).job_id is None
        return None  # and no file: the archive's file count is checked after all examples
    (job,) = repository.list_jobs(node.db, limit=1)
    assert job.instance.sop_instance_uid == uid and job.status == "queued"
    assert [e.outcome for e in repository.get_job(node.db, job.id).events] == ["ok"]
    assert node.archive.read(job.instance.path).endswith(data)
    return uid


def test_store_handler_answers_every_mutant(listener: LocalNode, sender: Sender,
                                            tmp_path: Path) -> None:
    stored: list[str] = []
    statuses: Counter[int] = Counter()

    @settings(PROPERTY, max_examples=300)
    @given(mutant=mutants())
    def run(mutant: Mutant) -> None:
        uid = check_store(listener, sender, tmp_path, mutant, statuses)
        if uid is not None:
            stored.append(uid)

    run()
    sender.close()
    assert listener.echo()
    assert listener.leftovers() == []
    assert len(repository.list_jobs(listener.db, limit=10_000)) == len(stored) == len(set(stored))
    assert len(listener.received_files()) == len(stored)
    # the strategy reaches every branch of the handler
    assert set(statuses) == DOCUMENTED, {f"0x{k:04X}": v for k, v in statuses.items()}
    outside = [p for p in tmp_path.rglob("*") if p.is_file()
               and listener.archive.root not in p.parents and p.name != "mutant.dcm"
               and p.name != "queue.sqlite3" and not p.name.startswith("queue.sqlite3-")]
    assert outside == []


def test_worker_gives_every_stored_mutant_a_defined_outcome(node: LocalNode,
                                                            tmp_path: Path) -> None:
    sender = Sender(node)
    outcomes: dict[str, int] = {}

    @settings(PROPERTY, max_examples=60, deadline=20_000)
    @given(mutant=mutants(keywords=KEYWORDS))
    def run(mutant: Mutant) -> None:
        uid = check_store(node, sender, tmp_path, mutant)
        if uid is None:
            return
        faulthandler.dump_traceback_later(HANG_S, exit=True)
        try:
            assert node.process() == 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        job = node.job(uid)
        assert job.status in ("done", "discarded"), (job.status, job.last_error)
        if job.status == "discarded":
            assert job.discard_reason
        else:
            assert [r.kind for r in job.results] == ["seg", "sr"]
            assert all(node.archive.exists(r.path) for r in job.results)
        if mutant.is_unchanged:
            assert job.status == "done"
        outcomes[job.status] = outcomes.get(job.status, 0) + 1
        event(f"job {job.status}")

    try:
        run()
    finally:
        sender.close()
    assert node.echo()
    assert outcomes.get("done") and outcomes.get("discarded"), outcomes
