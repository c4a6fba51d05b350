"""SQLAlchemy tables: received instances, jobs, their results, event history and per-destination deliveries.

The schema changes only through Alembic revisions (``node/queue/migrations``).

No patient identifiers are stored here: only UIDs, AE titles and technical facts.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, TypeDecorator,
                        UniqueConstraint, false)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Store naive UTC in the database, hand out aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:  # type: ignore[no-untyped-def]
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:  # type: ignore[no-untyped-def]
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """One received SOP instance, as archived (the bytes exactly as they arrived)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    #: archive key (``received/<study>/<sop>.dcm``, relative to ``[archive] url``, the same on every
    #: host; :mod:`node.archive`), "" when the bytes were not kept
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="instance", uselist=False)


class Job(Base):
    """The work on one instance: analyse it, encode SEG and SR, deliver them."""

    __tablename__ = "jobs"
    #: The claim's order (node.queue.repository.claim): the oldest due job of a state is read off
    #: the index, not found by sorting every waiting job (a backlog after an outage).
    __table_args__ = (Index("ix_jobs_claim", "status", "next_attempt_at", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    fail_stage: Mapped[str | None] = mapped_column(String(16))
    last_error: Mapped[str | None] = mapped_column(Text)
    discard_reason: Mapped[str | None] = mapped_column(Text)
    tb_score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    encoded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: An operator's "keep this one": the retention purge never touches a pinned job.
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: When the retention purge took the job's archived source and results: set before they are
    #: deleted, a ``purge ok`` event confirms it (node/retention.py). The rows are kept.
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    instance: Mapped[Instance] = relationship(back_populates="job")
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", order_by="Delivery.id")
    results: Mapped[list[ResultObject]] = relationship(back_populates="job", order_by="ResultObject.id")

    def result(self, kind: str) -> ResultObject | None:
        """This job's result of ``kind`` (``seg``, ``sr``, ``sc``), if it was made."""
        return next((r for r in self.results if r.kind == kind), None)


class ResultObject(Base):
    """One DICOM object a job produced (a SEG, an SR, a Secondary Capture, ...), as archived."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("job_id", "kind", name="uq_results_job_kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    #: archive key (``results/<job>/<kind>.dcm``; :mod:`node.archive`)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")


class JobEvent(Base):
    """One step in a job's life: a transition or a notable fact, with its time."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    step: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(32))  # 16 until revision 0009
    message: Mapped[str] = mapped_column(Text, default="")

    job: Mapped[Job] = relationship(back_populates="events")


class Delivery(Base):
    """The results of one job at one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Set when this destination refused the results for good (a permanent error): it is not
    #: tried again, while the job's other destinations are; ``cxrnode jobs retry`` clears it.
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="deliveries")


class AssociationRecord(Base):
    """One association (or refused connection) at the listener: who, how, and how it ended.

    ``result`` is ``accepted`` while the association is open (or if the node stopped before it
    ended), then ``released`` or ``aborted``; ``rejected`` with a ``reason`` when it was refused
    (calling AE title not allowed, TLS handshake failed, too many associations).
    """

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    called_ae_title: Mapped[str] = mapped_column(String(16), default="")
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    tls_peer: Mapped[str | None] = mapped_column(String(256))
    result: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    c_store: Mapped[int] = mapped_column(Integer, default=0)
    c_store_failed: Mapped[int] = mapped_column(Integer, default=0)
    c_echo: Mapped[int] = mapped_column(Integer, default=0)


class ShadowResult(Base):
    """A challenger run in shadow on one job (``cxrnode models shadow``): compared with the
    champion's analysis of the same pixels, recorded here and never encoded nor sent.

    ``shadow_ref`` names the shadowed model(s) (``a + b`` when both slots have a shadow);
    ``shadow_segmenter``/``shadow_tb`` the pair that ran (a slot without a shadow uses its
    champion). Dice is between the champion's and the shadow's lung masks; a call is
    ``score >= threshold`` at each pair's own threshold. ``error`` is set (and the comparison
    empty) when the shadow could not be loaded or failed.
    """

    __tablename__ = "shadow_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    shadow_ref: Mapped[str] = mapped_column(String(300))
    champion_segmenter: Mapped[str] = mapped_column(String(140))
    champion_tb: Mapped[str] = mapped_column(String(140))
    shadow_segmenter: Mapped[str | None] = mapped_column(String(140))
    shadow_tb: Mapped[str | None] = mapped_column(String(140))
    dice_lungs: Mapped[float | None] = mapped_column(Float)
    dice_right: Mapped[float | None] = mapped_column(Float)  # the patient's right lung
    dice_left: Mapped[float | None] = mapped_column(Float)
    champion_tb_score: Mapped[float | None] = mapped_column(Float)
    shadow_tb_score: Mapped[float | None] = mapped_column(Float)
    champion_threshold: Mapped[float | None] = mapped_column(Float)
    shadow_threshold: Mapped[float | None] = mapped_column(Float)
    champion_call: Mapped[bool | None] = mapped_column(Boolean)  # True = TB suspected
    shadow_call: Mapped[bool | None] = mapped_column(Boolean)
    agree: Mapped[bool | None] = mapped_column(Boolean)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
