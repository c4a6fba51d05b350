"""The audit trail: every association at the listener and every job step, in the database.

Associations are written here (:class:`~node.queue.tables.AssociationRecord`); job steps are the
:class:`~node.queue.tables.JobEvent` rows that :mod:`node.queue.repository` appends on every
transition. :func:`trail` reads both, merged by time, for ``cxrnode audit``.

Nothing here holds a patient identifier: peer addresses, AE titles, counts and job steps only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from node.logs import redact
from node.queue.db import Database
from node.queue.tables import AssociationRecord, JobEvent, utcnow


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of an association, as the listener saw it."""

    address: str
    port: int
    calling_ae_title: str = ""
    called_ae_title: str = ""
    tls: bool = False
    tls_peer: str | None = None


@dataclass
class Counts:
    """DIMSE requests handled on one association."""

    c_store: int = 0
    c_store_failed: int = 0
    c_echo: int = 0


def record(db: Database, peer: Peer, result: str, reason: str = "") -> int:
    """Record an association (``accepted``: still open) or a refusal; returns its id."""
    now = utcnow()
    row = AssociationRecord(
        started_at=now, peer_address=peer.address[:64], peer_port=peer.port,
        calling_ae_title=peer.calling_ae_title[:16], called_ae_title=peer.called_ae_title[:16],
        tls=peer.tls, tls_peer=None if peer.tls_peer is None else peer.tls_peer[:256],
        result=result, reason=reason, ended_at=None if result == "accepted" else now)
    with db.session() as session:
        session.add(row)
        session.flush()
        return row.id


def association_ended(db: Database, association_id: int, result: str, counts: Counts,
                      reason: str = "") -> None:
    """Close the record of an accepted association: ``released`` or ``aborted``, with counts."""
    with db.session() as session:
        row = session.get(AssociationRecord, association_id)
        if row is None:
            return
        row.result, row.reason, row.ended_at = result, reason, utcnow()
        row.c_store, row.c_store_failed, row.c_echo = (counts.c_store, counts.c_store_failed,
                                                        counts.c_echo)


@dataclass(frozen=True)
class AuditEntry:
    """One line of the merged trail: an association or a job step."""

    at: datetime
    kind: str  # "association" or "job"
    subject: str  # "association 12" or "job 5"
    what: str  # the association's result, or "<step> <outcome>"
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def _association_entry(row: AssociationRecord) -> AuditEntry:
    peer = f"{row.calling_ae_title or '?'}@{row.peer_address}:{row.peer_port}"
    detail = f"{peer} -> {row.called_ae_title or '?'}" + (" TLS" if row.tls else "")
    if row.tls_peer:
        detail += f" ({row.tls_peer})"
    if row.result != "rejected":
        detail += f"; C-STORE {row.c_store}"
        detail += f" ({row.c_store_failed} failed)" if row.c_store_failed else ""
        detail += f", C-ECHO {row.c_echo}"
    if row.reason:
        detail += f"; {row.reason}"
    data = {
        "id": row.id, "started_at": _iso(row.started_at), "ended_at": _iso(row.ended_at),
        "peer_address": row.peer_address, "peer_port": row.peer_port,
        "calling_ae_title": row.calling_ae_title, "called_ae_title": row.called_ae_title,
        "tls": row.tls, "tls_peer": row.tls_peer, "result": row.result, "reason": row.reason,
        "c_store": row.c_store, "c_store_failed": row.c_store_failed, "c_echo": row.c_echo,
    }
    return AuditEntry(row.started_at, "association", f"association {row.id}", row.result,
                      detail, data)


def _job_entry(event: JobEvent) -> AuditEntry:
    """A job step; its message is redacted (error texts can quote header values)."""
    state = f"{event.from_status or ''}->{event.to_status}" if event.to_status else ""
    message = redact(event.message)
    detail = " ".join(part for part in (state, message) if part)
    data = {
        "job_id": event.job_id, "step": event.step, "outcome": event.outcome,
        "from": event.from_status, "to": event.to_status, "message": message,
    }
    return AuditEntry(event.at, "job", f"job {event.job_id}", f"{event.step} {event.outcome}",
                      detail, data)


def trail(db: Database, since: datetime | None = None, limit: int | None = None) -> list[AuditEntry]:
    """Associations and job steps since ``since`` (all if None), oldest first.

    ``limit`` keeps the most recent ``limit`` entries.
    """
    associations = select(AssociationRecord).order_by(AssociationRecord.started_at.desc(),
                                                      AssociationRecord.id.desc())
    events = select(JobEvent).order_by(JobEvent.at.desc(), JobEvent.id.desc())
    if since is not None:
        associations = associations.where(AssociationRecord.started_at >= since)
        events = events.where(JobEvent.at >= since)
    if limit is not None:
        associations, events = associations.limit(limit), events.limit(limit)
    with db.session() as session:
        entries = [_association_entry(r) for r in session.scalars(associations)]
        entries += [_job_entry(e) for e in session.scalars(events)]
    entries.sort(key=lambda e: (e.at, e.kind != "association"))
    return entries[-limit:] if limit is not None else entries
