"""Scheduled housekeeping inside ``serve`` and ``worker`` (apscheduler).

- ``reap``: jobs whose lease expired (their worker died or stalled) go back to the queue,
  or to ``failed`` once their attempts are used up.

Retries that are due need no job of their own: a job waiting for a retry is simply not
claimable until its ``next_attempt_at``.
"""

from __future__ import annotations

import logging

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


def start_scheduler(settings: Settings, db: Database) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(reap, "interval", seconds=settings.housekeeping.reap_interval_s,
                      args=[db, settings.worker.max_attempts], id="reap",
                      max_instances=1, coalesce=True)
    scheduler.start()
    reap(db, settings.worker.max_attempts)  # at start-up too: recover after a crash at once
    return scheduler
