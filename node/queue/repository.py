"""Every read and write of the queue goes through here: enqueue, claim, transitions, queries.

Each function opens its own short transaction. State changes go through :func:`_move`, which
checks the state machine (:mod:`node.queue.states`) and appends a :class:`JobEvent`, so the
event history is the audit trail of every job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from node.errors import NodeError
from node.logs import redact
from node.queue.db import Database
from node.queue.states import LEASED, FailStage, JobStatus, check_transition
from node.queue.tables import (AssociationRecord, Delivery, Instance, Job, JobEvent, ResultObject, ShadowResult,
                               utcnow)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP knows about an archived object when it enqueues it."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    calling_ae_title: str


@dataclass(frozen=True)
class EnqueueResult:
    job_id: int
    duplicate: bool


class JobNotFound(LookupError):
    """No job has that id."""


class LeaseLost(RuntimeError):
    """The job is no longer held by this worker (its lease expired and it was reclaimed)."""


def _event(session: Session, job: Job, step: str, outcome: str, message: str = "",
           *, from_status: str | None = None, to_status: str | None = None) -> None:
    session.add(JobEvent(job_id=job.id, step=step, outcome=outcome, message=redact(message),
                         from_status=from_status, to_status=to_status, at=utcnow()))


def _move(session: Session, job: Job, new: JobStatus, step: str, outcome: str,
          message: str = "") -> None:
    old = job.status
    check_transition(old, new)
    job.status = new
    job.updated_at = utcnow()
    if new not in LEASED:
        job.lease_owner = None
        job.lease_expires_at = None
    _event(session, job, step, outcome, message, from_status=old, to_status=new)


def _held(session: Session, job_id: int, owner: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    if job.status not in LEASED or job.lease_owner != owner:
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")
    return job


def _seen_before(session: Session, received: ReceivedInstance, what_now: str) -> EnqueueResult | None:
    """The existing job of a SOP Instance UID received before (with a ``receive duplicate`` event)."""
    existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == received.sop_instance_uid))
    if existing is None:
        return None
    _event(session, existing.job, "receive", "duplicate", f"received again from {received.calling_ae_title}; {what_now}")
    return EnqueueResult(existing.job.id, duplicate=True)


def enqueue(db: Database, received: ReceivedInstance) -> EnqueueResult:
    """Record an archived instance and queue its job, in one transaction.

    A SOP Instance UID seen before is not queued again; the existing job gets an event.
    """
    with db.session() as session:
        if (seen := _seen_before(session, received, "not processed twice")) is not None:
            return seen
        instance = Instance(**received.__dict__, received_at=utcnow())
        job = Job(instance=instance, status=JobStatus.QUEUED, next_attempt_at=utcnow(),
                  created_at=utcnow(), updated_at=utcnow())
        session.add_all([instance, job])
        session.flush()
        _event(session, job, "receive", "ok", f"stored from {received.calling_ae_title}",
               to_status=JobStatus.QUEUED)
        return EnqueueResult(job.id, duplicate=False)


def record_discarded(db: Database, received: ReceivedInstance, reason: str) -> EnqueueResult:
    """Record an object acknowledged but neither kept nor analysed (``received.path`` empty): its
    instance row and a job already discarded with ``reason``, in one transaction.

    A SOP Instance UID seen before only adds an event to its existing job.
    """
    with db.session() as session:
        if (seen := _seen_before(session, received, "not kept")) is not None:
            return seen
        now = utcnow()
        instance = Instance(**received.__dict__, received_at=now)
        job = Job(instance=instance, status=JobStatus.DISCARDED, next_attempt_at=now, created_at=now,
                  updated_at=now, finished_at=now, discard_reason=redact(reason))
        session.add_all([instance, job])
        session.flush()
        _event(session, job, "receive", "ok", f"acknowledged from {received.calling_ae_title}; bytes not kept")
        _event(session, job, "select", "discarded", reason, to_status=JobStatus.DISCARDED)
        return EnqueueResult(job.id, duplicate=False)


@dataclass(frozen=True)
class KnownInstance:
    """What the queue holds for a SOP Instance UID when it arrives: one lookup per C-STORE."""

    #: one of the result objects this node made (routed back to it)
    own_result: bool
    #: the job of the instance received before under this UID; None: never received
    job_id: int | None = None
    #: that instance's archived file ('' when its bytes were not kept) and size
    path: str = ""
    size_bytes: int = 0


def known_instance(db: Database, sop_instance_uid: str) -> KnownInstance:
    """Whether ``sop_instance_uid`` is this node's own result, and its earlier reception if any."""
    with db.session() as session:
        own = session.scalar(
            select(ResultObject.id).where(ResultObject.sop_instance_uid == sop_instance_uid).limit(1)
        ) is not None
        row = session.execute(
            select(Job.id, Instance.path, Instance.size_bytes).join(Job.instance)
            .where(Instance.sop_instance_uid == sop_instance_uid)
        ).first()
    if row is None:
        return KnownInstance(own)
    return KnownInstance(own, row.id, row.path, row.size_bytes)


def record_duplicate(db: Database, job_id: int, calling_ae_title: str, different: str | None = None) -> None:
    """A SOP Instance UID received again: a ``receive duplicate`` event on its job and, when the bytes
    differ (``different`` says where they were kept), a ``receive duplicate-different`` one; one
    transaction."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        _event(session, job, "receive", "duplicate", f"received again from {calling_ae_title}; not processed twice")
        if different is not None:
            _event(session, job, "receive", "duplicate-different", different)


def claim(db: Database, ready: JobStatus, leased: JobStatus, owner: str,
          lease_s: float) -> int | None:
    """Atomically take the oldest due job in state ``ready`` and lease it; None if none is due."""
    check_transition(ready, leased)
    now = utcnow()
    with db.session() as session:
        candidate = (
            select(Job.id)
            .where(Job.status == ready, Job.next_attempt_at <= now)
            .order_by(Job.next_attempt_at, Job.id)
            .limit(1)
        )
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            candidate = candidate.with_for_update(skip_locked=True)
        stmt = (
            update(Job)
            .where(Job.id == candidate.scalar_subquery(), Job.status == ready)
            .values(status=leased, lease_owner=owner, updated_at=now,
                    lease_expires_at=now + timedelta(seconds=lease_s))
            .returning(Job.id)
        )
        job_id = session.execute(stmt).scalar()
        if job_id is None:
            return None
        job = session.get(Job, job_id)
        assert job is not None
        if leased == JobStatus.PROCESSING:
            job.attempts += 1
            job.started_at = job.started_at or now
        _event(session, job, "claim", "ok", f"claimed by {owner}", from_status=ready,
               to_status=leased)
        return job_id


def renew_lease(db: Database, job_id: int, owner: str, lease_s: float) -> None:
    """Extend the lease of a job this worker holds; raises LeaseLost if it is gone."""
    with db.session() as session:
        job = _held(session, job_id, owner)
        job.lease_expires_at = utcnow() + timedelta(seconds=lease_s)


def instance_of(db: Database, job_id: int) -> Instance:
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job.instance


def note(db: Database, job_id: int, step: str, outcome: str, message: str = "") -> None:
    """Record a step that does not change the state (e.g. ``infer ok 1.2 s``)."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        _event(session, job, step, outcome, message)


def mark_discarded(db: Database, job_id: int, owner: str, reason: str) -> None:
    with db.session() as session:
        job = _held(session, job_id, owner)
        job.discard_reason = redact(reason)
        job.finished_at = utcnow()
        _move(session, job, JobStatus.DISCARDED, "select", "discarded", reason)


@dataclass(frozen=True)
class ArchivedResult:
    """One encoded result object, written to the archive at ``path``."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str

    def __post_init__(self) -> None:
        if not (self.kind and self.sop_class_uid and self.sop_instance_uid and self.path):
            raise ValueError("an archived result needs its kind, SOP class, SOP instance UID and path")


def mark_encoded(db: Database, job_id: int, owner: str, tb_score: float, results: Sequence[ArchivedResult],
                 destinations: list[str]) -> None:
    """Results are in the archive: record them (one row per kind) and one pending delivery per destination."""
    kinds = [r.kind for r in results]
    if not results or len(set(kinds)) != len(kinds):
        raise ValueError(f"a job's results need at least one object and one per kind, got {kinds}")
    with db.session() as session:
        job = _held(session, job_id, owner)
        job.tb_score = tb_score
        existing = {r.kind: r for r in job.results}
        for result in results:
            row = existing.get(result.kind)
            if row is None:
                session.add(ResultObject(job_id=job.id, **result.__dict__))
            else:  # analysed again (an operator's retry): same kind, new content
                for key, value in result.__dict__.items():
                    setattr(row, key, value)
        job.encoded_at = utcnow()
        job.next_attempt_at = utcnow()
        job.last_error = None
        known = {d.destination for d in job.deliveries}
        for name in destinations:
            if name not in known:
                session.add(Delivery(job_id=job.id, destination=name))
        _move(session, job, JobStatus.ENCODED, "encode", "ok",
              f"{', '.join(k.upper() for k in kinds)} written; TB score {tb_score:.3f}")
        if not destinations:
            why = "no destination receives results of images from this caller"
            _move(session, job, JobStatus.SENDING, "send", "skipped", why)
            job.finished_at = utcnow()
            _move(session, job, JobStatus.DONE, "send", "skipped", why)


def fail_attempt(db: Database, job_id: int, owner: str, error: str, *, max_attempts: int,
                 retry_delay_s: float, give_up: bool = False) -> JobStatus:
    """An inference attempt failed: queue it again later, or fail it when attempts are used up
    (at once with ``give_up``: a deterministic error that a retry would repeat)."""
    error = redact(error)
    with db.session() as session:
        job = _held(session, job_id, owner)
        job.last_error = error
        if give_up or job.attempts >= max_attempts:
            job.fail_stage = FailStage.INFERENCE
            job.finished_at = utcnow()
            _move(session, job, JobStatus.FAILED, "infer", "failed",
                  f"attempt {job.attempts}/{max_attempts}: {error}")
        else:
            job.next_attempt_at = utcnow() + timedelta(seconds=retry_delay_s)
            _move(session, job, JobStatus.QUEUED, "infer", "retry",
                  f"attempt {job.attempts}/{max_attempts}: {error}")
        return JobStatus(job.status)


def pending_deliveries(db: Database, job_id: int) -> list[str]:
    """Destinations that do not yet have this job's results and have not refused them for good."""
    with db.session() as session:
        rows = session.scalars(
            select(Delivery.destination).where(Delivery.job_id == job_id,
                                               Delivery.delivered_at.is_(None),
                                               Delivery.failed_at.is_(None))
        )
        return list(rows)


def record_delivery(db: Database, job_id: int, destination: str, error: str | None, *,
                    permanent: bool = False) -> int:
    """Record one send attempt to ``destination``; returns its attempt count.

    A ``permanent`` error marks the delivery failed: that destination is not tried again (until
    an operator's retry), while the job's other destinations still are.
    """
    error = None if error is None else redact(error)
    with db.session() as session:
        delivery = session.scalar(
            select(Delivery).where(Delivery.job_id == job_id, Delivery.destination == destination)
        )
        if delivery is None:
            delivery = Delivery(job_id=job_id, destination=destination, attempts=0)
            session.add(delivery)
        delivery.attempts += 1
        job = session.get(Job, job_id)
        assert job is not None
        if error is None:
            delivery.delivered_at = utcnow()
            delivery.last_error = None
            _event(session, job, "send", "ok", f"stored at {destination}")
        else:
            delivery.last_error = error
            if permanent:
                delivery.failed_at = utcnow()
            _event(session, job, "send", "error",
                   f"{destination} attempt {delivery.attempts}: {error}"
                   + ("; permanent, not tried again" if permanent else ""))
        return delivery.attempts


def finish_sending(db: Database, job_id: int, owner: str, *, max_attempts: int,
                   delay_s: float, give_up: bool = False) -> JobStatus:
    """After a send round: done if every destination has the results; failed once each
    destination without them has refused them for good (``failed_at``) or used up its attempts
    (or at once with ``give_up``); else the job waits ``delay_s`` for the next round.
    """
    with db.session() as session:
        job = _held(session, job_id, owner)
        missing = [d for d in job.deliveries if d.delivered_at is None]
        pending = [d for d in missing if d.failed_at is None]
        if not missing:
            job.finished_at = utcnow()
            job.last_error = None
            _move(session, job, JobStatus.DONE, "send", "ok", "results at every destination")
        elif give_up or not pending or max(d.attempts for d in pending) >= max_attempts:
            job.fail_stage = FailStage.SEND
            job.last_error = "; ".join(f"{d.destination}: {d.last_error}" for d in missing)
            job.finished_at = utcnow()
            _move(session, job, JobStatus.FAILED, "send", "failed",
                  f"gave up after {max(d.attempts for d in missing)} attempt(s): {job.last_error}")
        else:
            job.last_error = "; ".join(f"{d.destination}: {d.last_error}" for d in pending)
            job.next_attempt_at = utcnow() + timedelta(seconds=delay_s)
            _move(session, job, JobStatus.ENCODED, "send", "retry",
                  f"next attempt in {delay_s:g} s")
        return JobStatus(job.status)


def reap_expired(db: Database, *, max_attempts: int) -> list[int]:
    """Return jobs whose lease expired to the queue (or fail them once attempts are used up)."""
    now = utcnow()
    reaped: list[int] = []
    with db.session() as session:
        jobs = session.scalars(
            select(Job).where(Job.status.in_([s.value for s in LEASED]),
                              Job.lease_expires_at < now)
        ).all()
        for job in jobs:
            owner = job.lease_owner
            job.next_attempt_at = now
            if job.status == JobStatus.SENDING:
                _move(session, job, JobStatus.ENCODED, "reap", "retry",
                      f"lease of {owner} expired")
            elif job.attempts >= max_attempts:
                job.fail_stage = FailStage.INFERENCE
                job.last_error = f"lease of {owner} expired on attempt {job.attempts}"
                job.finished_at = now
                _move(session, job, JobStatus.FAILED, "reap", "failed", job.last_error)
            else:
                _move(session, job, JobStatus.QUEUED, "reap", "retry", f"lease of {owner} expired")
            reaped.append(job.id)
    return reaped


def retry(db: Database, job_id: int) -> JobStatus:
    """Admin retry of a failed or discarded job: resend if results exist, else re-analyse."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.purged_at is not None:
            raise FilesPurged(f"{purged_message(job)}: nothing is left to analyse or send again")
        has_results = bool(job.results)
        target = JobStatus.ENCODED if job.status == JobStatus.FAILED and has_results \
            else JobStatus.QUEUED
        check_transition(job.status, target)
        job.attempts = 0
        job.next_attempt_at = utcnow()
        job.fail_stage = None
        job.discard_reason = None
        job.finished_at = None
        for delivery in job.deliveries:
            if delivery.delivered_at is None:
                delivery.attempts = 0
                delivery.failed_at = None
        _move(session, job, target, "retry", "ok", "retried by an operator")
        return target


def failed_job_ids(db: Database) -> list[int]:
    with db.session() as session:
        return list(session.scalars(select(Job.id).where(Job.status == JobStatus.FAILED,
                                                         Job.purged_at.is_(None))))


# ----- queries for the CLI -----

@dataclass(frozen=True)
class QueueStatus:
    counts: dict[str, int]
    oldest_waiting_at: datetime | None
    last_error: str | None
    last_error_job_id: int | None


def queue_status(db: Database) -> QueueStatus:
    with db.session() as session:
        counts = {s.value: 0 for s in JobStatus}
        for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status)):
            counts[status] = n
        waiting = [JobStatus.QUEUED, JobStatus.PROCESSING, JobStatus.ENCODED, JobStatus.SENDING]
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status.in_(waiting)))
        last = session.execute(
            select(Job.id, Job.last_error).where(Job.last_error.is_not(None))
            .order_by(Job.updated_at.desc()).limit(1)
        ).first()
        return QueueStatus(counts, oldest, last[1] if last else None, last[0] if last else None)


def list_jobs(db: Database, status: JobStatus | None = None, limit: int = 100) -> list[Job]:
    with db.session() as session:
        stmt = select(Job).options(selectinload(Job.instance), selectinload(Job.results)).order_by(Job.id.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(Job.status == status)
        return list(session.scalars(stmt))


def get_job(db: Database, job_id: int) -> Job:
    with db.session() as session:
        job = session.scalar(
            select(Job).where(Job.id == job_id).options(
                selectinload(Job.instance), selectinload(Job.events),
                selectinload(Job.deliveries), selectinload(Job.results))
        )
        if job is None:
            raise JobNotFound(job_id)
        return job


def release_orphans(db: Database, host: str, pid: int, alive: Callable[[int], bool]) -> list[int]:
    """Return leased jobs whose owner process of instance ``host`` is gone (e.g. after ``kill -9``).

    Owners are ``instance:pid:role`` (the instance: ``[node] instance_name``, default the host
    name). A lease held by this instance with a pid that is not alive, or with our own pid (a
    restarted container reuses pid 1), cannot be renewed by anyone: it goes back at once instead
    of waiting for the lease to expire. Other instances' leases are left to expire and be reaped
    (their pids mean nothing here).
    """
    released: list[int] = []
    with db.session() as session:
        jobs = session.scalars(select(Job).where(Job.status.in_([s.value for s in LEASED]))).all()
        for job in jobs:
            owner_host, _, rest = (job.lease_owner or "").partition(":")
            owner_pid = rest.partition(":")[0]
            if owner_host != host or not owner_pid.isdigit():
                continue
            if int(owner_pid) != pid and alive(int(owner_pid)):
                continue
            job.next_attempt_at = utcnow()
            target = JobStatus.ENCODED if job.status == JobStatus.SENDING else JobStatus.QUEUED
            _move(session, job, target, "recover", "retry",
                  f"owner {job.lease_owner} is gone (process ended)")
            released.append(job.id)
    return released


# ----- retention: pins and the purge's queries (node/retention.py plans and runs the purge) -----

class FilesPurged(NodeError):
    """The job's archived source and results were deleted by the retention purge."""


def purged_message(job: Job) -> str:
    """What to tell an operator about a job whose files the retention purge deleted."""
    when = job.purged_at.isoformat(timespec="seconds") if job.purged_at else "?"
    return (f"job {job.id}: its archived image and results were deleted by the retention purge on {when} "
            "(retention.images_days); its history is kept")


def set_pinned(db: Database, job_id: int, pinned: bool) -> bool:
    """Pin a job (the retention purge never touches it) or unpin it; an event records it.

    Returns True if that changed the job, False if it already was so.
    """
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        changed = bool(job.pinned) != pinned
        job.pinned = pinned
        what = ("pinned by an operator: never purged" if pinned
                else "unpinned by an operator: purged like any other job")
        _event(session, job, "pin" if pinned else "unpin", "ok" if changed else "unchanged", what)
        return changed


def _ended_at() -> ColumnElement[datetime]:
    """When a job ended (done, discarded, failed): the retention clocks start there."""
    return func.coalesce(Job.finished_at, Job.updated_at)


def _purgeable(keep_failed: bool) -> ColumnElement[bool]:
    """Jobs the purge may touch: ended, not pinned, and every destination has their results.

    queued, processing, encoded and sending are never touched, nor a job with an undelivered
    delivery (whatever its state), nor (``keep_failed``) a failed job.
    """
    states = [JobStatus.DONE.value, JobStatus.DISCARDED.value]
    if not keep_failed:
        states.append(JobStatus.FAILED.value)
    undelivered = exists().where(Delivery.job_id == Job.id, Delivery.delivered_at.is_(None)).correlate(Job)
    return and_(Job.status.in_(states), Job.pinned.is_(False), ~undelivered)


def _files_left() -> ColumnElement[bool]:
    """The job still has archived files for the purge to delete.

    * it kept some (a source or a result) and the purge has not claimed it (``purged_at`` empty);
    * the purge claimed it but did not confirm the deletion (no ``purge ok`` event since
      ``purged_at``): it stopped in between (a crash), so the next run deletes them again;
    * a copy of its source arrived after the purge (a duplicate of a purged instance is kept as
      ``<sop>.v<N>.dcm``, see :meth:`node.archive.Archive.keep_version`).
    """
    kept = or_(exists().where(Instance.id == Job.instance_id, Instance.path != "").correlate(Job),
               exists().where(ResultObject.job_id == Job.id).correlate(Job))
    confirmed = exists().where(JobEvent.job_id == Job.id, JobEvent.step == "purge", JobEvent.outcome == "ok",
                               JobEvent.at >= Job.purged_at).correlate(Job)
    copy_after_purge = exists().where(JobEvent.job_id == Job.id, JobEvent.step == "receive",
                                      JobEvent.outcome == "duplicate-different",
                                      JobEvent.at > Job.purged_at).correlate(Job)
    return or_(and_(Job.purged_at.is_(None), kept),
               and_(Job.purged_at.is_not(None), or_(~confirmed, copy_after_purge)))


@dataclass(frozen=True)
class PurgeCandidate:
    """A job whose archived files the purge deletes: where they are, as the queue knows them."""

    job_id: int
    status: str
    ended_at: datetime
    source_path: str  # "" when the bytes were not kept
    study_instance_uid: str
    sop_instance_uid: str
    result_paths: tuple[str, ...]


def files_to_purge(db: Database, ended_before: datetime, *, keep_failed: bool) -> list[PurgeCandidate]:
    """Jobs that ended before ``ended_before`` whose files may go (:func:`_purgeable`) and are
    still there (:func:`_files_left`), oldest first. Reads only."""
    where = (_purgeable(keep_failed), _ended_at() < ended_before, _files_left())
    with db.session() as session:
        paths: dict[int, list[str]] = {}
        for job_id, path in session.execute(
                select(ResultObject.job_id, ResultObject.path).join(Job, ResultObject.job_id == Job.id)
                .where(*where).order_by(ResultObject.id)):
            paths.setdefault(job_id, []).append(path)
        rows = session.execute(
            select(Job.id, Job.status, _ended_at(), Instance.path, Instance.study_instance_uid,
                   Instance.sop_instance_uid).join(Job.instance).where(*where).order_by(Job.id)).all()
        return [PurgeCandidate(job_id, status, ended, path, study, sop, tuple(paths.get(job_id, ())))
                for job_id, status, ended, path, study, sop in rows]


def claim_files_purge(db: Database, job_ids: Sequence[int], ended_before: datetime, *,
                      keep_failed: bool) -> list[int]:
    """Step 1 of deleting jobs' files: set ``purged_at`` on those of ``job_ids`` that may still go,
    checked in the same UPDATE (so a job retried or pinned meanwhile is left alone); returns them.

    From here on ``jobs show``, ``--preview`` and ``jobs retry`` treat the job as purged; its files
    are deleted next and :func:`confirm_files_purged` records that. A purge that stops between the
    two leaves the job claimed but unconfirmed, which :func:`_files_left` hands to the next run.
    """
    claimed: list[int] = []
    for chunk in _chunks(job_ids):
        with db.session() as session:
            claimed += session.scalars(
                update(Job).where(Job.id.in_(chunk), _purgeable(keep_failed), _ended_at() < ended_before,
                                  _files_left())
                .values(purged_at=utcnow()).returning(Job.id)
                .execution_options(synchronize_session=False)).all()
    return sorted(claimed)


def confirm_files_purged(db: Database, messages: dict[int, str]) -> None:
    """Step 2: these jobs' files are deleted; a ``purge ok`` event (with the message given for
    each job) records it, in one transaction. Their rows stay until ``retention.history_days``."""
    with db.session() as session:
        for job_id, message in messages.items():
            job = session.get(Job, job_id)
            if job is not None:
                _event(session, job, "purge", "ok", message)


def history_to_purge(db: Database, ended_before: datetime, *,
                     keep_failed: bool) -> list[tuple[int, bool]]:
    """Jobs that ended before ``ended_before`` whose rows the purge may delete, each with whether
    it still has archived files (its rows go only after those: the caller decides). Reads only."""
    with db.session() as session:
        rows = session.execute(
            select(Job.id, _files_left()).where(_purgeable(keep_failed), _ended_at() < ended_before)
            .order_by(Job.id))
        return [(job_id, bool(left)) for job_id, left in rows]


_CHUNK = 500  # ids per IN (...) list


def _chunks(ids: Sequence[int]) -> list[list[int]]:
    return [list(ids[i:i + _CHUNK]) for i in range(0, len(ids), _CHUNK)]


def history_rows(db: Database, job_ids: Sequence[int]) -> dict[str, int]:
    """How many rows of each table belong to these jobs (what deleting their history removes)."""
    counts = {"jobs": 0, "instances": 0, "job_events": 0, "results": 0, "deliveries": 0, "shadow_results": 0}
    with db.session() as session:
        for chunk in _chunks(job_ids):
            counts["jobs"] += session.scalar(select(func.count()).where(Job.id.in_(chunk))) or 0
            counts["instances"] += session.scalar(
                select(func.count(Instance.id)).join(Job, Job.instance_id == Instance.id)
                .where(Job.id.in_(chunk))) or 0
            for table, key in ((JobEvent, "job_events"), (ResultObject, "results"), (Delivery, "deliveries"),
                               (ShadowResult, "shadow_results")):
                counts[key] += session.scalar(select(func.count()).where(table.job_id.in_(chunk))) or 0
    return counts


def delete_history(db: Database, job_ids: Sequence[int], ended_before: datetime, *,
                   keep_failed: bool) -> dict[str, int]:
    """Delete these jobs with their instance, events, results rows, deliveries and shadow results, one transaction
    per chunk; each job is checked again (still purgeable, ended before ``ended_before``, no
    files left), so a job retried or pinned meanwhile is kept. Returns the rows deleted per table."""
    counts = {"jobs": 0, "instances": 0, "job_events": 0, "results": 0, "deliveries": 0, "shadow_results": 0}
    for chunk in _chunks(job_ids):
        with db.session() as session:
            # A no-op UPDATE picks the jobs: it takes the write lock, so nothing changes them
            # between this check and the deletes below.
            rows = session.execute(
                update(Job).where(Job.id.in_(chunk), _purgeable(keep_failed), _ended_at() < ended_before,
                                  ~_files_left())
                .values(updated_at=Job.updated_at).returning(Job.id, Job.instance_id)
                .execution_options(synchronize_session=False)).all()
            ids, instance_ids = [r[0] for r in rows], [r[1] for r in rows]
            if not ids:
                continue
            for table, key in ((JobEvent, "job_events"), (ResultObject, "results"), (Delivery, "deliveries"),
                               (ShadowResult, "shadow_results")):
                counts[key] += session.execute(
                    delete(table).where(table.job_id.in_(ids)).execution_options(synchronize_session=False)
                ).rowcount
            counts["jobs"] += session.execute(
                delete(Job).where(Job.id.in_(ids)).execution_options(synchronize_session=False)).rowcount
            counts["instances"] += session.execute(
                delete(Instance).where(Instance.id.in_(instance_ids))
                .execution_options(synchronize_session=False)).rowcount
    return counts


def _old_associations(before: datetime) -> ColumnElement[bool]:
    """Associations that ended before ``before``; one never closed (the node stopped while it was
    open) counts as ended a day after it started, so an open one is never deleted under its handler."""
    return or_(and_(AssociationRecord.ended_at.is_not(None), AssociationRecord.ended_at < before),
               and_(AssociationRecord.ended_at.is_(None), AssociationRecord.started_at < before - timedelta(days=1)))


def count_old_associations(db: Database, before: datetime) -> int:
    with db.session() as session:
        return session.scalar(select(func.count(AssociationRecord.id)).where(_old_associations(before))) or 0


def delete_old_associations(db: Database, before: datetime) -> int:
    """Delete the association rows (``cxrnode audit``) that ended before ``before``; returns how many."""
    with db.session() as session:
        return session.execute(delete(AssociationRecord).where(_old_associations(before))
                               .execution_options(synchronize_session=False)).rowcount


@dataclass(frozen=True)
class Intake:
    """Bytes archived from received instances since a time, and the oldest instance on record."""

    bytes_received: int
    instances: int
    first_received_at: datetime | None


def intake_since(db: Database, since: datetime) -> Intake:
    with db.session() as session:
        total, count = session.execute(
            select(func.coalesce(func.sum(Instance.size_bytes), 0), func.count(Instance.id))
            .where(Instance.received_at >= since)).one()
        first = session.scalar(select(func.min(Instance.received_at)))
        return Intake(int(total), int(count), first)


# ----- training-set export (node/dataset/export.py) -----

@dataclass(frozen=True)
class DatasetCandidate:
    """An archived job that a ``cxrnode dataset export`` selection matched, as the queue knows it."""

    job_id: int
    status: str
    tb_score: float | None
    received_at: datetime
    calling_ae_title: str
    sop_class_uid: str
    study_instance_uid: str
    sop_instance_uid: str
    source_path: str  # "" when the bytes were not kept
    seg_path: str | None  # the node's own SEG, if it made one
    purged_at: datetime | None


def dataset_candidates(db: Database, *, states: Sequence[str], since: datetime | None = None,
                       until: datetime | None = None, calling_ae_titles: Sequence[str] = (),
                       tb_min: float | None = None, tb_max: float | None = None, outcome: str | None = None,
                       limit: int | None = None) -> list[DatasetCandidate]:
    """Jobs in ``states`` whose instance was received in [``since``, ``until``), from one of
    ``calling_ae_titles`` (any when empty), with a TB score in [``tb_min``, ``tb_max``] (a bound
    excludes jobs without a score), and acceptance ``outcome`` ``accepted`` (not discarded) or
    ``discarded``; the ``limit`` most recently received, returned oldest first. Reads only."""
    if outcome not in (None, "accepted", "discarded"):
        raise ValueError(f"outcome must be accepted or discarded, got {outcome!r}")
    where: list[ColumnElement[bool]] = [Job.status.in_([JobStatus(s).value for s in states])]
    if since is not None:
        where.append(Instance.received_at >= since)
    if until is not None:
        where.append(Instance.received_at < until)
    if calling_ae_titles:
        where.append(Instance.calling_ae_title.in_([t.strip() for t in calling_ae_titles]))
    if tb_min is not None:
        where.append(Job.tb_score >= tb_min)
    if tb_max is not None:
        where.append(Job.tb_score <= tb_max)
    if outcome == "accepted":
        where.append(Job.status != JobStatus.DISCARDED.value)
    elif outcome == "discarded":
        where.append(Job.status == JobStatus.DISCARDED.value)
    with db.session() as session:
        stmt = (select(Job).join(Job.instance).where(*where)
                .options(selectinload(Job.instance), selectinload(Job.results))
                .order_by(Instance.received_at.desc(), Job.id.desc()))
        if limit is not None:
            stmt = stmt.limit(limit)
        jobs = list(session.scalars(stmt))
        found = [DatasetCandidate(
            job.id, job.status, job.tb_score, job.instance.received_at, job.instance.calling_ae_title,
            job.instance.sop_class_uid, job.instance.study_instance_uid, job.instance.sop_instance_uid,
            job.instance.path, seg.path if (seg := job.result("seg")) is not None else None, job.purged_at)
            for job in jobs]
    return found[::-1]


def record_shadow(db: Database, job_id: int, fields: dict[str, object]) -> int:
    """Record one shadow comparison (:class:`ShadowResult` columns) of ``job_id``; returns its id.
    Only a row: the job, its results and its state are not touched."""
    with db.session() as session:
        if session.get(Job, job_id) is None:
            raise JobNotFound(job_id)
        row = ShadowResult(job_id=job_id, at=utcnow(), **fields)
        session.add(row)
        session.flush()
        return row.id


def shadow_results(db: Database, since: datetime | None = None) -> list[ShadowResult]:
    """Shadow comparisons (recorded at or after ``since``), oldest first."""
    with db.session() as session:
        query = select(ShadowResult).order_by(ShadowResult.id)
        if since is not None:
            query = query.where(ShadowResult.at >= since)
        return list(session.scalars(query))
