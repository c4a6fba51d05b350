"""Operator commands: ``status``, ``jobs list|show|retry|pin|unpin``, ``echo``."""

from __future__ import annotations

import argparse
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.cli.render import age, emit, human_bytes, iso, table
from node.errors import NodeError
from node.queue import repository
from node.queue.db import DATABASE_FILE, Database
from node.queue.states import JobStatus
from node.queue.tables import Job
from node.settings import Settings, load_settings

if TYPE_CHECKING:
    from node.archive import Archive


def _db(args: argparse.Namespace) -> Database:
    settings = load_settings(args.config)
    if not settings.queue.url and not (settings.data_path / DATABASE_FILE).exists():
        raise NodeError(f"no queue database in {settings.data_path} (has the node run yet?)")
    return Database.for_settings(settings)


#: ``cxrnode status`` measures the intake (bytes received per day) over this many days.
INTAKE_WINDOW_DAYS = 7


def disk_status(settings: Settings, db: Database, archive: Archive | None = None,
                now: datetime | None = None) -> dict[str, Any]:
    """The data folder's file system (total, used, free), the archive's own size, the intake
    (bytes archived per day over the last :data:`INTAKE_WINDOW_DAYS` days, or since the first
    instance if that is more recent, at least a day) and the days until the free space reaches
    ``node.min_free_disk_mb`` (where C-STOREs are refused) at that intake; None when there is no
    intake (unknown). The archive is ``[archive] url``'s (an object store's size is listed from it)."""
    from node.archive import open_archive

    archive = archive if archive is not None else open_archive(settings)
    now = now or datetime.now(UTC)
    usage = shutil.disk_usage(settings.data_path)
    intake = repository.intake_since(db, now - timedelta(days=INTAKE_WINDOW_DAYS))
    window_days = float(INTAKE_WINDOW_DAYS)
    if intake.first_received_at is not None:
        window_days = min(window_days, max(1.0, (now - intake.first_received_at).total_seconds() / 86400))
    per_day = intake.bytes_received / window_days
    usable = max(0, usage.free - settings.node.min_free_disk_mb * 2**20)
    return {
        "data_dir": str(settings.data_path),
        "total_bytes": usage.total, "used_bytes": usage.used, "free_bytes": usage.free,
        "archive": archive.describe(),
        "archive_bytes": archive.total_bytes(),
        "min_free_bytes": settings.node.min_free_disk_mb * 2**20,
        "intake_window_days": round(window_days, 2),
        "intake_instances": intake.instances,
        "intake_bytes_per_day": round(per_day),
        "headroom_days": round(usable / per_day, 1) if per_day > 0 else None,
    }


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    db = _db(args)
    status = repository.queue_status(db)
    disk = disk_status(settings, db)
    data = {
        "counts": status.counts,
        "oldest_waiting_at": iso(status.oldest_waiting_at),
        "oldest_waiting_age_s": None if status.oldest_waiting_at is None else
        round((datetime.now(UTC) - status.oldest_waiting_at).total_seconds(), 1),
        "last_error": status.last_error,
        "last_error_job_id": status.last_error_job_id,
        "disk": disk,
    }
    human = table(["state", "jobs"], list(status.counts.items()))
    human += f"\n\noldest waiting job: {age(status.oldest_waiting_at)}"
    if status.last_error:
        human += f"\nlast error (job {status.last_error_job_id}): {status.last_error}"
    headroom = "unknown (no intake)" if disk["headroom_days"] is None else f"{disk['headroom_days']:g} days"
    human += (f"\ndisk ({disk['data_dir']}): {human_bytes(disk['total_bytes'])} total, {human_bytes(disk['used_bytes'])} used, "
              f"{human_bytes(disk['free_bytes'])} free; archive ({disk['archive']}) {human_bytes(disk['archive_bytes'])}"
              f"\nintake: {human_bytes(disk['intake_bytes_per_day'])}/day over {disk['intake_window_days']:g} day(s) "
              f"({disk['intake_instances']} instance(s)); headroom until C-STOREs are refused: {headroom}")
    emit(data, args.json, human)
    return 0


def _job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "sop_instance_uid": job.instance.sop_instance_uid,
        "study_instance_uid": job.instance.study_instance_uid,
        "calling_ae_title": job.instance.calling_ae_title,
        "attempts": job.attempts,
        "tb_score": job.tb_score,
        "received_at": iso(job.instance.received_at),
        "updated_at": iso(job.updated_at),
        "fail_stage": job.fail_stage,
        "last_error": job.last_error,
        "discard_reason": job.discard_reason,
        "pinned": bool(job.pinned),
        "files_purged_at": iso(job.purged_at),
    }


def cmd_jobs_list(args: argparse.Namespace) -> int:
    state = JobStatus(args.state) if args.state else None
    jobs = repository.list_jobs(_db(args), state, limit=args.limit)
    data = [_job_summary(j) for j in jobs]
    rows = [(j.id, j.status, j.attempts, "-" if j.tb_score is None else f"{j.tb_score:.3f}",
             age(j.instance.received_at), (j.last_error or j.discard_reason or "")[:60])
            for j in jobs]
    emit(data, args.json, table(["id", "state", "tries", "tb", "age", "note"], rows))
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    try:
        job = repository.get_job(_db(args), args.id)
    except repository.JobNotFound:
        raise NodeError(f"no job {args.id}") from None
    data = _job_summary(job) | {
        "results": [{"kind": r.kind, "sop_class_uid": r.sop_class_uid, "sop_instance_uid": r.sop_instance_uid}
                    for r in job.results],
        "started_at": iso(job.started_at), "encoded_at": iso(job.encoded_at),
        "finished_at": iso(job.finished_at),
        "deliveries": [{"destination": d.destination, "attempts": d.attempts,
                        "delivered_at": iso(d.delivered_at), "failed_at": iso(d.failed_at),
                        "last_error": d.last_error}
                       for d in job.deliveries],
        "steps": [{"at": iso(e.at), "step": e.step, "outcome": e.outcome,
                   "from": e.from_status, "to": e.to_status, "message": e.message}
                  for e in job.events],
    }
    if args.preview:
        from node.archive import open_archive

        data["preview"] = str(_write_preview(job, args.preview, open_archive(load_settings(args.config))))
    head = "\n".join(f"{k}: {'-' if v is None else v}" for k, v in _job_summary(job).items())
    if job.results:
        head += "\nresults: " + ", ".join(f"{r.kind.upper()} {r.sop_instance_uid}" for r in job.results)
    if job.purged_at is not None:
        data["files"] = repository.purged_message(job)
        head += f"\nfiles: {data['files']}"
    steps = table(["at", "step", "outcome", "state", "message"],
                  [(iso(e.at), e.step, e.outcome,
                    f"{e.from_status or ''}->{e.to_status}" if e.to_status else "", e.message)
                   for e in job.events])
    preview = f"\n\npreview: {data['preview']}" if args.preview else ""
    emit(data, args.json, f"{head}\n\n{steps}{preview}")
    return 0


def _write_preview(job: Job, target: str, archive: Archive) -> Path:
    from node.results.preview import result_preview

    if job.purged_at is not None:
        raise NodeError(f"{repository.purged_message(job)}: no preview can be drawn")
    seg, sr = job.result("seg"), job.result("sr")
    if seg is None or sr is None:
        raise NodeError(f"job {job.id} has no SEG and SR to show (state {job.status})")
    keys = [job.instance.path, seg.path, sr.path]
    missing = [key for key in keys if not archive.exists(key)]
    if missing:
        raise NodeError(f"job {job.id}: archived file missing: {missing[0]}")
    out = Path(target)
    if out.suffix.lower() != ".png":
        raise NodeError(f"--preview needs a .png file name, got {target!r}")
    try:
        with archive.local_files(keys) as files:
            picture = result_preview(*files)
    except ValueError as exc:
        raise NodeError(f"job {job.id}: cannot draw the preview: {exc}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    return out


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    db = _db(args)
    if args.all_failed:
        ids = repository.failed_job_ids(db)
    elif args.id is not None:
        ids = [args.id]
    else:
        raise NodeError("give a job id or --all-failed")
    done = {}
    for job_id in ids:
        try:
            done[job_id] = str(repository.retry(db, job_id))
        except repository.JobNotFound:
            raise NodeError(f"no job {job_id}") from None
        except repository.FilesPurged as exc:
            raise NodeError(str(exc)) from None
        except Exception as exc:  # InvalidTransition: e.g. a job that is done
            raise NodeError(f"job {job_id}: {exc}") from None
    emit({str(k): v for k, v in done.items()}, args.json,
         "\n".join(f"job {k}: back to {v}" for k, v in done.items()) or "no failed jobs")
    return 0


def cmd_jobs_pin(args: argparse.Namespace) -> int:
    pinned = args.jobs_command == "pin"
    db = _db(args)
    try:
        changed = repository.set_pinned(db, args.id, pinned)
        job = repository.get_job(db, args.id)
    except repository.JobNotFound:
        raise NodeError(f"no job {args.id}") from None
    what = "pinned: the retention purge never deletes it" if pinned else "unpinned: it ages like any other job"
    human = f"job {args.id} {what}" if changed else f"job {args.id} was already {'pinned' if pinned else 'not pinned'}"
    if pinned and job.purged_at is not None:
        human += f"\n({repository.purged_message(job)})"
    emit({"id": args.id, "pinned": pinned, "changed": changed, "files_purged_at": iso(job.purged_at)},
         args.json, human)
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from node.sender import scu

    settings = load_settings(args.config)
    dest = settings.destination(args.destination)
    status = scu.echo(dest, settings.node.ae_title)
    ok = status == 0
    emit({"destination": dest.name, "status": status, "ok": ok}, args.json,
         f"C-ECHO {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): "
         f"{'success' if ok else f'status 0x{status:04X}'}")
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", parents=[common], help="jobs per state, oldest waiting, last error, disk and headroom")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("echo", parents=[common], help="C-ECHO a configured destination")
    p.add_argument("destination", help="destination name or AE title")
    p.set_defaults(func=cmd_echo)
    jobs = sub.add_parser("jobs", help="list, inspect, retry and pin jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="ACTION")
    p = jobs.add_parser("list", parents=[common], help="recent jobs")
    p.add_argument("--state", choices=[s.value for s in JobStatus])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_jobs_list)
    p = jobs.add_parser("show", parents=[common], help="one job with every step")
    p.add_argument("id", type=int)
    p.add_argument("--preview", metavar="FILE.png",
                   help="also draw the radiograph with the node's lungs and TB score into FILE.png")
    p.set_defaults(func=cmd_jobs_show)
    p = jobs.add_parser("retry", parents=[common], help="send again / analyse again")
    p.add_argument("id", type=int, nargs="?")
    p.add_argument("--all-failed", action="store_true", help="every failed job")
    p.set_defaults(func=cmd_jobs_retry)
    p = jobs.add_parser("pin", parents=[common], help="keep a job's files and history: never purged")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_jobs_pin)
    p = jobs.add_parser("unpin", parents=[common], help="let the retention purge handle a pinned job again")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_jobs_pin)
