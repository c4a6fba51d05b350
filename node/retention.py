"""The retention purge: what ``[retention]`` says may go, planned first, then deleted.

:func:`plan` lists, without changing anything (``cxrnode archive purge --dry-run``):

1. **files** (images: the received object and any ``<sop>.v<N>.dcm`` copies; results: the job's
   ``results/<job>/`` folder) of jobs that ended ``images_days`` ago. Only done and discarded jobs
   (and failed ones when ``keep_failed`` is false) whose every delivery is delivered, never a
   pinned one: queued, processing, encoded and sending jobs are never touched;
2. **history rows** (the job, its instance, events, results rows and deliveries) of such jobs that
   ended ``history_days`` ago, only once their files are gone (or were never kept);
3. **audit rows** (associations) that ended ``audit_days`` ago;
4. ``archive/tmp/*.part`` files left by a crash (older than :data:`TMP_GRACE_S`).

:func:`execute` deletes in that order. Files first, rows second, and each step crash-safe:

* a job's files: the job is *claimed* first (``purged_at`` set by one UPDATE that checks the rules
  again, so a job retried or pinned since the plan is skipped), then its files are deleted, then
  a ``purge ok`` event confirms it. From the claim on, ``jobs show`` says the files were purged and
  ``jobs retry`` / ``--preview`` refuse with that reason, so nothing trips over a missing file. A
  crash between claim and confirmation leaves a claimed, unconfirmed job: the next purge deletes
  its files again (deleting what is gone is a no-op) and confirms. No file is orphaned.
* history rows go only for jobs whose purge is confirmed (or that never kept a file), one
  transaction per chunk: a crash leaves whole jobs, never rows pointing at nothing.

The purge deletes only archive keys (``received/``, ``results/``, ``tmp/``), through the archive's
interface (:mod:`node.archive`): a folder or an object store alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from node.archive import Archive, Stored, UnsafeKey, UnsafeUID, check_key
from node.queue import repository
from node.queue.db import Database
from node.queue.tables import utcnow
from node.settings import RetentionSettings, Settings

log = logging.getLogger(__name__)

#: ``tmp/*.part`` files younger than this may belong to a write in progress (another process on
#: the same data folder) and are left alone; a crash's leftovers are older by the next purge.
TMP_GRACE_S = 60.0
#: Jobs whose files are claimed, deleted and confirmed together (one claim and one confirmation
#: transaction each).
BATCH = 200


@dataclass(frozen=True)
class JobFiles:
    """One job's archived objects that the purge deletes."""

    job_id: int
    status: str
    images: tuple[Stored, ...]
    results: tuple[Stored, ...]


@dataclass
class Tally:
    jobs: int = 0
    files: int = 0
    bytes: int = 0

    def add(self, entries: tuple[Stored, ...] | list[Stored]) -> None:
        if entries:
            self.jobs += 1
            self.files += len(entries)
            self.bytes += sum(e.size for e in entries)


@dataclass
class PurgePlan:
    """What a purge deletes; :meth:`report` is what ``cxrnode archive purge`` prints."""

    now: datetime
    retention: RetentionSettings
    images_before: datetime | None
    history_before: datetime | None
    audit_before: datetime | None
    jobs: list[JobFiles] = field(default_factory=list)
    history_job_ids: list[int] = field(default_factory=list)
    history_rows: dict[str, int] = field(default_factory=dict)
    audit_rows: int = 0
    tmp_files: list[Stored] = field(default_factory=list)

    def report(self, *, dry_run: bool) -> dict[str, Any]:
        images, results, tmp = Tally(), Tally(), Tally()
        for job in self.jobs:
            images.add(job.images)
            results.add(job.results)
        tmp.add(self.tmp_files)
        return _report(self, dry_run, images, results, len(self.jobs), self.history_rows,
                       len(self.history_job_ids), self.audit_rows, tmp)


def _report(plan: PurgePlan, dry_run: bool, images: Tally, results: Tally, jobs_purged: int,
            history_rows: dict[str, int], history_jobs: int, audit_rows: int, tmp: Tally) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat(timespec="seconds")

    return {
        "dry_run": dry_run,
        "at": iso(plan.now),
        "retention": {"images_days": plan.retention.images_days, "history_days": plan.retention.history_days,
                      "audit_days": plan.retention.audit_days, "keep_failed": plan.retention.keep_failed},
        "cutoffs": {"images": iso(plan.images_before), "history": iso(plan.history_before),
                    "audit": iso(plan.audit_before)},
        "jobs_purged": jobs_purged,
        "images": {"jobs": images.jobs, "files": images.files, "bytes": images.bytes},
        "results": {"jobs": results.jobs, "files": results.files, "bytes": results.bytes},
        "history": {"jobs": history_jobs, "rows": sum(history_rows.values()), "tables": dict(history_rows)},
        "audit": {"rows": audit_rows},
        "tmp": {"files": tmp.files, "bytes": tmp.bytes},
    }


def _cutoff(now: datetime, days: float) -> datetime | None:
    return None if days <= 0 else now - timedelta(days=days)


def _job_files(archive: Archive, candidate: repository.PurgeCandidate) -> JobFiles:
    """The objects of ``candidate`` in the archive now: the source where the queue says it is and
    where the layout puts it, its ``<sop>.v<N>.dcm`` versions, and everything under
    ``results/<job>/``. Only archive keys (``received/``, ``results/``): a stored value that is
    not one (damaged, or a host path the 0007 migration could not map) is left alone."""
    sources: list[str] = []
    for key in (candidate.source_path, _layout_key(candidate)):
        if key and _is_key(key, "received/") and key not in sources:
            sources.append(key)
    images: dict[str, Stored] = {}
    for source in sources:
        if (size := archive.size(source)) is not None:
            images.setdefault(source, Stored(source, size))
        for version in archive.versions(source):
            images.setdefault(version.key, version)
    results: dict[str, Stored] = {}
    for key in candidate.result_paths:
        if _is_key(key, "results/") and (size := archive.size(key)) is not None:
            results.setdefault(key, Stored(key, size))
    for item in archive.list(archive.results_prefix(candidate.job_id)):
        results.setdefault(item.key, item)
    return JobFiles(candidate.job_id, candidate.status, tuple(images.values()), tuple(results.values()))


def _layout_key(candidate: repository.PurgeCandidate) -> str:
    try:
        return Archive.received_key(candidate.study_instance_uid, candidate.sop_instance_uid)
    except UnsafeUID:
        return ""


def _is_key(value: str, top: str) -> bool:
    try:
        check_key(value)
    except UnsafeKey:
        return False
    return value.startswith(top)


def clean_tmp(archive: Archive, older_than_s: float = TMP_GRACE_S) -> tuple[int, int]:
    """Remove the ``tmp/*.part`` files a crash left (:meth:`node.archive.Archive.stale_tmp`: a folder
    archive's only; an object store has no partial objects); returns (files, bytes) removed."""
    files = size = 0
    for entry in archive.stale_tmp(older_than_s):
        archive.delete(entry.key)
        files, size = files + 1, size + entry.size
    return files, size


def plan(settings: Settings, db: Database, archive: Archive, now: datetime | None = None) -> PurgePlan:
    """What a purge would delete now. Reads the queue and the archive, changes nothing."""
    retention = settings.retention
    now = now or utcnow()
    result = PurgePlan(now, retention, _cutoff(now, retention.images_days),
                       _cutoff(now, retention.history_days), _cutoff(now, retention.audit_days))
    if result.images_before is not None:
        result.jobs = [_job_files(archive, candidate) for candidate in
                       repository.files_to_purge(db, result.images_before, keep_failed=retention.keep_failed)]
    if result.history_before is not None:
        purging = {job.job_id for job in result.jobs}
        result.history_job_ids = [job_id for job_id, files_left in repository.history_to_purge(
            db, result.history_before, keep_failed=retention.keep_failed) if not files_left or job_id in purging]
    result.history_rows = repository.history_rows(db, result.history_job_ids)
    if result.history_rows:  # jobs whose files and rows both go get their "purge ok" event first
        purging = {job.job_id for job in result.jobs}
        result.history_rows["job_events"] += len(purging.intersection(result.history_job_ids))
    if result.audit_before is not None:
        result.audit_rows = repository.count_old_associations(db, result.audit_before)
    result.tmp_files = archive.stale_tmp(TMP_GRACE_S)
    return result


def _delete_job_files(archive: Archive, job: JobFiles) -> tuple[list[Stored], list[Stored]]:
    """Delete one job's planned objects; returns those deleted (a folder archive also removes
    the emptied ``results/<job>`` and ``received/<study>`` folders)."""
    gone: tuple[list[Stored], list[Stored]] = ([], [])
    for entries, deleted in ((job.images, gone[0]), (job.results, gone[1])):
        for entry in entries:
            archive.delete(entry.key)
            deleted.append(entry)
    return gone


def _summary(entries: list[Stored], what: str) -> str:
    size = sum(e.size for e in entries)
    return f"{len(entries)} {what} file(s), {size} bytes"


def execute(plan_: PurgePlan, db: Database, archive: Archive) -> dict[str, Any]:
    """Delete what ``plan_`` lists, files first, then rows (see the module's docstring); returns
    the report of what was deleted (the same shape as the plan's)."""
    retention = plan_.retention
    images, results = Tally(), Tally()
    purged = 0
    for start in range(0, len(plan_.jobs), BATCH):
        batch = {job.job_id: job for job in plan_.jobs[start:start + BATCH]}
        assert plan_.images_before is not None
        claimed = repository.claim_files_purge(db, list(batch), plan_.images_before,
                                               keep_failed=retention.keep_failed)
        messages = {}
        for job_id in claimed:
            planned = batch[job_id]
            deleted_images, deleted_results = _delete_job_files(archive, planned)
            images.add(deleted_images)
            results.add(deleted_results)
            what = "source and results deleted" if planned.results or planned.status != "discarded" \
                else "source deleted"
            messages[job_id] = (f"{what} by the retention purge ({_summary(deleted_images, 'image')}, "
                                f"{_summary(deleted_results, 'result')}; ended more than "
                                f"{retention.images_days:g} day(s) before)")
        repository.confirm_files_purged(db, messages)
        purged += len(claimed)
    history_rows = {key: 0 for key in plan_.history_rows}
    if plan_.history_job_ids:
        assert plan_.history_before is not None
        history_rows = repository.delete_history(db, plan_.history_job_ids, plan_.history_before,
                                                 keep_failed=retention.keep_failed)
    audit_rows = 0
    if plan_.audit_before is not None:
        audit_rows = repository.delete_old_associations(db, plan_.audit_before)
    tmp = Tally()
    removed = []
    for entry in plan_.tmp_files:
        archive.delete(entry.key)
        removed.append(entry)
    tmp.add(removed)
    return _report(plan_, False, images, results, purged, history_rows, history_rows.get("jobs", 0),
                   audit_rows, tmp)


def purge(settings: Settings, db: Database, archive: Archive, *, dry_run: bool = False) -> dict[str, Any]:
    """Plan and (unless ``dry_run``) execute a purge; returns the report."""
    planned = plan(settings, db, archive)
    return planned.report(dry_run=True) if dry_run else execute(planned, db, archive)


def one_line(report: dict[str, Any]) -> str:
    """The purge's figures on one line (the scheduled purge's log line)."""
    def mb(n: int) -> str:
        return f"{n / 1e6:.1f} MB"

    images, results, history = report["images"], report["results"], report["history"]
    return (f"images {images['jobs']} job(s) {images['files']} file(s) {mb(images['bytes'])}; "
            f"results {results['jobs']} job(s) {results['files']} file(s) {mb(results['bytes'])}; "
            f"history {history['jobs']} job(s) {history['rows']} row(s); audit {report['audit']['rows']} row(s); "
            f"tmp {report['tmp']['files']} file(s)")
