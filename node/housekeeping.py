"""Scheduled housekeeping inside ``serve`` and ``worker`` (apscheduler).

- ``reap``: jobs whose lease expired (their worker died or stalled) go back to the queue,
  or to ``failed`` once their attempts are used up.
- ``purge`` (``serve`` only): the retention purge (:mod:`node.retention`) every
  ``retention.purge_interval_s``, the first at most 10 minutes after start-up; one log line.

At start-up, ``recover`` also returns jobs held by processes of this instance (``[node]
instance_name``, default the host name) that are gone
(``kill -9``, power loss), without waiting for their leases to expire, and ``archive/tmp/*.part``
files left by a crash are removed.

Retries that are due need no job of their own: a job waiting for a retry is simply not
claimable until its ``next_attempt_at``.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from node import retention
from node.archive import Archive
from node.queue import repository
from node.queue.db import Database
from node.settings import Settings

log = logging.getLogger(__name__)


def reap(db: Database, max_attempts: int) -> list[int]:
    reaped = repository.reap_expired(db, max_attempts=max_attempts)
    if reaped:
        log.warning("returned %d job(s) with expired leases: %s", len(reaped), reaped)
    return reaped


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def recover(db: Database, instance: str | None = None) -> list[int]:
    """At start-up: take back the jobs of this instance's dead processes at once (``instance``:
    ``[node] instance_name``, default the host name). Other instances' leases expire and are reaped."""
    released = repository.release_orphans(db, instance or socket.gethostname(), os.getpid(), pid_alive)
    if released:
        log.warning("recovered %d job(s) left by a process that ended: %s", len(released), released)
    return released


#: The first scheduled purge runs this long after start-up at most (a node restarted more often
#: than ``retention.purge_interval_s`` still purges).
FIRST_PURGE_AFTER_S = 600.0


def clean_tmp(settings: Settings, archive: Archive) -> int:
    """At start-up: remove ``tmp/*.part`` files a crash left in a folder archive (see
    :func:`node.retention.clean_tmp`)."""
    files, size = retention.clean_tmp(archive)
    if files:
        log.info("removed %d leftover temporary file(s) (%d bytes) from the archive (%s)", files, size,
                 archive.describe())
    return files


def purge(settings: Settings, db: Database, archive: Archive) -> dict | None:
    """The scheduled retention purge; logs one line, and any failure (the next run tries again)."""
    try:
        report = retention.purge(settings, db, archive)
    except Exception:  # noqa: BLE001 - housekeeping must not die; the next run tries again
        log.exception("retention purge failed; the next one runs in %g s", settings.retention.purge_interval_s)
        return None
    log.info("retention purge: %s", retention.one_line(report))
    return report


def start_scheduler(settings: Settings, db: Database, archive: Archive, *,
                    purge_archive: bool = True) -> BackgroundScheduler:
    """Start the reaper (and, with ``purge_archive``, the retention purge: processes with the receiver)."""
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(reap, "interval", seconds=settings.housekeeping.reap_interval_s,
                      args=[db, settings.worker.max_attempts], id="reap",
                      max_instances=1, coalesce=True)
    interval = settings.retention.purge_interval_s
    if purge_archive and interval > 0:
        first = datetime.now(UTC) + timedelta(seconds=min(interval, FIRST_PURGE_AFTER_S))
        scheduler.add_job(purge, "interval", seconds=interval, args=[settings, db, archive], id="purge",
                          max_instances=1, coalesce=True, next_run_time=first)
    scheduler.start()
    clean_tmp(settings, archive)
    recover(db, settings.node.instance_name or None)
    reap(db, settings.worker.max_attempts)
    return scheduler
