"""DIMSE event handlers: thin. Archive the bytes, queue the job, answer with a status.

A C-STORE is answered Success only after the object is durable in the archive (a folder's file
fsync'd and renamed, an object store's PUT returned) and its job row is committed. Every failure maps to a DIMSE status and is logged with the SOP Instance
UID only, never a patient identifier.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha256

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import events
from sqlalchemy.exc import SQLAlchemyError

from node.archive import Archive, UnsafeUID, check_uid, key_name
from node.dicom import ANALYSED_SOP_CLASSES, Status
from node.queue import repository
from node.queue.db import Database
from node.wakeups import Stage, Wakeups

log = logging.getLogger(__name__)


class KeyedLocks:
    """One lock per key (a SOP Instance UID), created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs, bound when the server starts."""

    db: Database
    archive: Archive
    min_free_bytes: int
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    #: rung once a job is queued: this process's inference worker starts it at once
    wakeups: Wakeups | None = None


def _peer(event: events.Event) -> str:
    assoc = event.assoc
    return f"{assoc.requestor.ae_title}@{assoc.requestor.address}:{assoc.requestor.port}"


def handle_echo(event: events.Event) -> int:
    log.info("C-ECHO from %s", _peer(event))
    return Status.SUCCESS


def handle_store(event: events.Event, ctx: StoreContext) -> int:
    """EVT_C_STORE: archive, enqueue, then answer.

    Statuses:

    * 0x0000 Success: the bytes as received are fsync'd in the archive and the job committed
      (or the instance was already here, see below);
    * 0xA700 Out of Resources: free disk below the minimum, or the archive or the queue
      database cannot be written (nothing is acknowledged, the sender retries);
    * 0xA900 Data Set Does Not Match SOP Class: Study / Series / SOP Instance UID missing or
      not a valid UID (e.g. ``../``: nothing is written, no path is built from it), or the
      dataset's SOP Instance UID differs from the request's;
    * 0xC210 Cannot Understand: the dataset cannot be decoded.

    Pixel Data and the rest of the header are not checked here: an object that is stored but
    cannot be analysed is discarded by the worker with the reason (it would only be resent).

    Duplicates (a SOP Instance UID already received) are answered Success and are *not*
    processed again: results are derived deterministically from the SOP Instance UID, so a
    second analysis could only replace the first results with objects of the same UIDs.
    Nothing is lost either: the received bytes are compared (SHA-256) with the archived
    object. Identical bytes only add a ``receive duplicate`` event to the existing job.
    Different bytes are archived next to the first as ``<sop>.v<N>.dcm`` (N = 2, 3, ...; bytes
    identical to an existing version reuse it) and the job gets a ``receive
    duplicate-different`` event naming the version file. Stores of one SOP Instance UID are
    serialised, so two concurrent senders of the same UID cannot overwrite each other.

    The queue is read once (:func:`node.queue.repository.known_instance`) and written once per
    C-STORE; a duplicate's earlier file is hashed only when its size matches.
    """
    request_uid = str(event.request.AffectedSOPInstanceUID)
    free = ctx.archive.free_bytes()
    if free is not None and free < ctx.min_free_bytes:
        log.error("C-STORE %s refused: free disk below the configured minimum", request_uid[:64])
        return Status.OUT_OF_RESOURCES
    checked = _check_uids(event, request_uid)
    if isinstance(checked, int):
        return checked
    study_uid, series_uid = checked
    try:
        with ctx.locks.hold(request_uid):
            known = repository.known_instance(ctx.db, request_uid)
            reason = _not_kept_reason(event, known)
            if reason is not None:
                result = repository.record_discarded(ctx.db, _received(event, study_uid, series_uid, "", 0), reason)
                log.info("C-STORE %s from %s: acknowledged, not kept (job %d): %s", request_uid,
                         event.assoc.requestor.ae_title, result.job_id, reason)
                return Status.SUCCESS
            if known.job_id is not None:
                return _store_duplicate(event, ctx, known)
            return _store_new(event, ctx, study_uid, series_uid)
    except (OSError, SQLAlchemyError) as exc:
        log.error("C-STORE %s: cannot archive or queue: %s", request_uid, type(exc).__name__)
        return Status.OUT_OF_RESOURCES


def _not_kept_reason(event: events.Event, known: repository.KnownInstance) -> str | None:
    """Why an object is acknowledged but its bytes are not kept, or None to archive and queue it.

    Two kinds are dropped at once: objects of SOP classes no chest radiograph comes in (CT, SR,
    presentation states, other SEGs, ...: a PACS rule that routes a whole study must not fail,
    but the node has no reason to hold their patient data), and this node's own results routed
    back to it (loop safety). Both are recorded as discarded jobs with the reason.
    """
    sop_class = UID(str(event.request.AffectedSOPClassUID))
    if known.own_result:
        return f"{sop_class.name} made by this node (its own result routed back): dropped, never analysed or re-sent"
    if sop_class not in ANALYSED_SOP_CLASSES:
        return f"{sop_class.name} is not an image class a chest radiograph comes in: bytes not kept"
    return None


def _check_uids(event: events.Event, request_uid: str) -> tuple[str, str] | int:
    """(Study, Series Instance UID) of a decodable dataset with valid UIDs, else the status."""
    try:
        ds = event.dataset
    except Exception as exc:  # noqa: BLE001 - any decode failure is the sender's data
        log.warning("C-STORE %s refused: cannot decode: %s", request_uid[:64], type(exc).__name__)
        return Status.CANNOT_UNDERSTAND
    try:
        check_uid(request_uid)
        study_uid = check_uid(_uid(ds, "StudyInstanceUID"))
        series_uid = check_uid(_uid(ds, "SeriesInstanceUID"))
        if _uid(ds, "SOPInstanceUID") != request_uid:
            raise _NotMatching("SOPInstanceUID differs from the request's Affected SOP Instance UID")
    except (UnsafeUID, _NotMatching) as exc:
        log.warning("C-STORE %s refused: %s", request_uid[:64], exc)
        return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    except Exception as exc:  # noqa: BLE001 - an element that cannot be decoded
        log.warning("C-STORE %s refused: cannot decode: %s", request_uid[:64], type(exc).__name__)
        return Status.CANNOT_UNDERSTAND
    return study_uid, series_uid


class _NotMatching(ValueError):
    """A required UID attribute is absent, empty, multi-valued or not the request's."""


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        raise _NotMatching(f"{keyword} is missing")
    if not isinstance(value, str):
        raise _NotMatching(f"{keyword} is not a single value")
    return str(value)


def _store_new(event: events.Event, ctx: StoreContext, study_uid: str, series_uid: str) -> int:
    sop_instance_uid = str(event.request.AffectedSOPInstanceUID)
    key = ctx.archive.received_key(study_uid, sop_instance_uid)
    size = ctx.archive.put(key, event.encoded_dataset())
    result = repository.enqueue(ctx.db, _received(event, study_uid, series_uid, key, size))
    if ctx.wakeups is not None and not result.duplicate:
        ctx.wakeups.ring(Stage.QUEUED)
    log.info("C-STORE %s from %s: archived, job %d queued", sop_instance_uid,
             event.assoc.requestor.ae_title, result.job_id)
    return Status.SUCCESS


def _store_duplicate(event: events.Event, ctx: StoreContext, known: repository.KnownInstance) -> int:
    """A SOP Instance UID received before: keep differing bytes as a version, never reprocess."""
    assert known.job_id is not None
    sop_instance_uid = str(event.request.AffectedSOPInstanceUID)
    calling = event.assoc.requestor.ae_title
    data = event.encoded_dataset()
    # ``path`` is empty when the first one's bytes were not kept (a class the node drops)
    version = ctx.archive.keep_version(known.path, data, known.size_bytes) if known.path else None
    different = None if version is None else (
        f"different content (sha256 {sha256(data).hexdigest()[:16]}) from {calling} archived as "
        f"{key_name(version)}; not processed again")
    repository.record_duplicate(ctx.db, known.job_id, calling, different)
    if version is None:
        log.info("C-STORE %s: identical duplicate of job %d, acknowledged", sop_instance_uid, known.job_id)
    else:
        log.warning("C-STORE %s: duplicate with different content kept as %s (job %d)",
                    sop_instance_uid, key_name(version), known.job_id)
    return Status.SUCCESS


def _received(event: events.Event, study_uid: str, series_uid: str, path: str,
              size: int) -> repository.ReceivedInstance:
    return repository.ReceivedInstance(
        sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
        sop_class_uid=str(event.request.AffectedSOPClassUID),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        path=path,
        size_bytes=size,
        calling_ae_title=event.assoc.requestor.ae_title,
    )
