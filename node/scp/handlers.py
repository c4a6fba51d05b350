"""DIMSE event handlers: thin. Archive the bytes, queue the job, answer with a status.

A C-STORE is answered Success only after the object is on disk (fsync'd and renamed) and its
job row is committed. Every failure maps to a DIMSE status and is logged with the SOP Instance
UID only, never a patient identifier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import events

from node.archive import Archive, UnsafeUID, check_uid
from node.dicom import Status
from node.queue import repository
from node.queue.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs, bound when the server starts."""

    db: Database
    archive: Archive
    min_free_bytes: int


def _peer(event: events.Event) -> str:
    assoc = event.assoc
    return f"{assoc.requestor.ae_title}@{assoc.requestor.address}:{assoc.requestor.port}"


def handle_echo(event: events.Event) -> int:
    log.info("C-ECHO from %s", _peer(event))
    return Status.SUCCESS


def handle_store(event: events.Event, ctx: StoreContext) -> int | Dataset:
    """EVT_C_STORE: archive, enqueue, then answer."""
    sop_instance_uid = str(event.request.AffectedSOPInstanceUID)
    calling = event.assoc.requestor.ae_title
    if ctx.archive.free_bytes() < ctx.min_free_bytes:
        log.error("C-STORE %s refused: free disk below the configured minimum", sop_instance_uid)
        return Status.OUT_OF_RESOURCES
    try:
        check_uid(sop_instance_uid)
        ds = event.dataset
        study_uid = check_uid(str(ds.StudyInstanceUID))
        series_uid = check_uid(str(ds.SeriesInstanceUID))
        if str(ds.SOPInstanceUID) != sop_instance_uid:
            raise ValueError("SOPInstanceUID differs from the request's Affected SOP Instance UID")
    except (UnsafeUID, AttributeError, KeyError, ValueError) as exc:
        log.warning("C-STORE %s refused: %s", sop_instance_uid[:64], exc)
        return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    except Exception as exc:  # noqa: BLE001 - any decode failure is the sender's data
        log.warning("C-STORE %s refused: cannot decode: %s", sop_instance_uid, exc)
        return Status.CANNOT_UNDERSTAND

    if repository.instance_exists(ctx.db, sop_instance_uid):
        result = repository.enqueue(ctx.db, _received(event, study_uid, series_uid, "", 0))
        log.info("C-STORE %s: duplicate of job %d, acknowledged", sop_instance_uid, result.job_id)
        return Status.SUCCESS
    try:
        path = ctx.archive.received_path(study_uid, sop_instance_uid)
        size = ctx.archive.write_atomic(path, event.encoded_dataset())
        result = repository.enqueue(ctx.db, _received(event, study_uid, series_uid, str(path), size))
    except OSError as exc:
        log.error("C-STORE %s: cannot archive: %s", sop_instance_uid, exc)
        return Status.OUT_OF_RESOURCES
    log.info("C-STORE %s from %s: archived, job %d queued", sop_instance_uid, calling,
             result.job_id)
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


def handle_accepted(event: events.Event) -> None:
    log.info("association accepted from %s", _peer(event))


def handle_rejected(event: events.Event) -> None:
    log.warning("association rejected from %s", _peer(event))


def handle_aborted(event: events.Event) -> None:
    log.warning("association aborted by %s", _peer(event))
