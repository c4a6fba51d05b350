"""Scheduled housekeeping inside ``serve`` and ``worker`` (apscheduler).

- ``reap``: jobs whose lease expired (their worker died or stalled) go back to the queue,
  or to ``failed`` once their attempts are used up.

At start-up, ``recover`` also returns jobs held by processes of this host that are gone
(``kill -9``, power loss), without waiting for their leases to expire.

Retries that are due need no job of their own: a job waiting for a retry is simply not
claimable until its ``next_attempt_at``.
"""

from __future__ import annotations

import logging
import os
import socket

from apscheduler.schedulers.background import BackgroundScheduler

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


def recover(db: Database) -> list[int]:
    """At start-up: take back the jobs of this host's dead processes at once."""
    released = repository.release_orphans(db, socket.gethostname(), os.getpid(), pid_alive)
    if released:
        log.warning("recovered %d job(s) left by a process that ended: %s", len(released), released)
    return released


def start_scheduler(settings: Settings, db: Database) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(reap, "interval", seconds=settings.housekeeping.reap_interval_s,
                      args=[db, settings.worker.max_attempts], id="reap",
                      max_instances=1, coalesce=True)
    scheduler.start()
    recover(db)
    reap(db, settings.worker.max_attempts)
    return scheduler
