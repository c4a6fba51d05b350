"""The sender loop: claim encoded jobs and C-STORE their SEG and SR to every destination."""

from __future__ import annotations

import logging
import threading
from functools import partial
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from node import faults
from node.archive import Archive, open_archive
from node.errors import PermanentSendError, SendError, SettingsError
from node.http import metrics
from node.loop import describe, run_loop
from node.queue import repository
from node.queue.db import Database
from node.queue.states import JobStatus
from node.queue.tables import Job
from node.sender import scu
from node.settings import Destination, Settings
from node.wakeups import Stage, Wakeups
from node.worker.runner import worker_name

log = logging.getLogger(__name__)


class Sender:
    """Delivers results until ``stop`` is set; failed sends come back after the backoff.

    With ``wakeups`` it sends as soon as the worker rings (results recorded); without, it polls.
    """

    def __init__(self, settings: Settings, db: Database, stop: threading.Event,
                 wakeups: Wakeups | None = None, *, archive: Archive | None = None) -> None:
        self.settings, self.db, self.stop, self.wakeups = settings, db, stop, wakeups
        self.archive = archive if archive is not None else open_archive(settings)
        self.owner = worker_name(settings, "send")

    def run_forever(self) -> None:
        """Send until ``stop`` is set; raises :class:`node.loop.GiveUp` if the queue stays unreachable."""
        log.info("sender %s started", self.owner)
        idle = None if self.wakeups is None else partial(self.wakeups.wait, Stage.ENCODED)
        run_loop("sender", self.run_once, self.stop, poll_s=self.settings.send.poll_interval_s,
                 give_up_after_s=self.settings.worker.give_up_after_s, idle=idle)
        log.info("sender %s stopped", self.owner)

    def run_once(self) -> bool:
        """Send one due job's results; False if none was due.

        A failed C-STORE is recorded on its delivery and retried with backoff; a permanent error
        (or a destination no longer configured) fails that delivery only, and the job fails once
        no destination is left to try. Anything else that goes
        wrong in the round (the database locked while a delivery is recorded) ends it as a
        failed attempt of the destinations it had not recorded yet, with the error. Raises only
        when the queue cannot be reached at all (the claim failed, or recording the failure
        failed too: the job's lease expires and the reaper returns it).
        """
        cfg = self.settings.send
        faults.fire("db-claim")
        job_id = repository.claim(self.db, JobStatus.ENCODED, JobStatus.SENDING, self.owner,
                                  lease_s=cfg.timeout_s * 4 * max(1, len(self.settings.destinations)))
        if job_id is None:
            return False
        recorded: set[str] = set()
        try:
            self._send(job_id, recorded)
        except repository.LeaseLost as exc:
            log.warning("job %d: %s; the send round is not recorded", job_id, exc)
        except Exception as exc:  # noqa: BLE001 - e.g. the database locked: recorded on the job
            log.exception("job %d: the send round failed", job_id)
            self._record_failed_round(job_id, recorded, f"send round failed: {describe(exc)}")
        return True

    def _send(self, job_id: int, recorded: set[str]) -> None:
        cfg = self.settings.send
        job = repository.get_job(self.db, job_id)
        with ExitStack() as opened:
            local: dict[str, Path] = {}  # key -> local file, fetched once per round (object store)

            def files_for(dest: Destination) -> list[Path]:
                for key in (keys := self._keys_for(job, dest)):
                    if key not in local:
                        local[key] = opened.enter_context(self.archive.local_file(key))
                return [local[key] for key in keys]

            attempts = self._send_each(job_id, recorded, files_for)
        faults.fire("db-record")
        status = repository.finish_sending(self.db, job_id, self.owner,
                                           max_attempts=cfg.max_attempts,
                                           delay_s=cfg.delay_after(max(attempts, 1)))
        metrics.job_sent(job, status)
        log.info("job %d: %s", job_id, status)

    def _send_each(self, job_id: int, recorded: set[str],
                   files_for: Callable[[Destination], list[Path]]) -> int:
        """One C-STORE association per destination still pending; each outcome recorded on its
        delivery. Returns the most attempts any destination has had."""
        cfg = self.settings.send
        attempts = 0
        for name in repository.pending_deliveries(self.db, job_id):
            error: str | None = None
            permanent = False
            started = metrics.now()
            try:
                dest = self.settings.destination(name)
                scu.store(dest, files_for(dest), self.settings.node.ae_title, cfg.timeout_s)
            except SendError as exc:
                error = str(exc)
                permanent = isinstance(exc, PermanentSendError)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - a bug, an unreadable archived file, ...
                error = describe(exc)
                # a destination removed from the config will not come back; anything else may
                permanent = isinstance(exc, SettingsError)
            metrics.send_attempted(name, error, started)
            attempts = max(attempts, repository.record_delivery(self.db, job_id, name, error,
                                                                permanent=permanent))
            recorded.add(name)
            log.log(logging.WARNING if error else logging.INFO, "job %d -> %s: %s", job_id,
                    name, error or "stored")
        return attempts

    def _record_failed_round(self, job_id: int, recorded: set[str], error: str) -> None:
        """Count the round as a failed attempt for each destination not recorded yet, then retry or
        fail the job as after any round; raises if the queue cannot be reached."""
        cfg = self.settings.send
        try:
            repository.note(self.db, job_id, "send", "error", error)
            attempts = 0
            for name in repository.pending_deliveries(self.db, job_id):
                if name not in recorded:
                    attempts = max(attempts, repository.record_delivery(self.db, job_id, name, error))
            status = repository.finish_sending(self.db, job_id, self.owner,
                                               max_attempts=cfg.max_attempts,
                                               delay_s=cfg.delay_after(max(attempts, 1)))
        except repository.LeaseLost as exc:
            log.warning("job %d: %s; the send round is not recorded", job_id, exc)
            return
        except Exception as exc:
            log.error("job %d: could not record the failed send round (%s): %s; the reaper returns "
                      "the job when its lease expires", job_id, error, describe(exc))
            raise
        log.warning("job %d: %s after a failed send round", job_id, status)

    @staticmethod
    def _keys_for(job: Job, dest: Destination) -> list[str]:
        """The archive keys of the results ``dest`` receives, in the order of its ``outputs``.

        Raises:
            PermanentSendError: the job has none of them (e.g. encoded before an output was
                added to the destination: ``cxrnode jobs retry`` after re-analysis makes them).
        """
        keys = [r.path for kind in dest.outputs if (r := job.result(kind)) is not None]
        if not keys:
            raise PermanentSendError(f"job {job.id} has none of the outputs {list(dest.outputs)} for {dest.name}")
        return keys
