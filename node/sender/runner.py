"""The sender loop: claim encoded jobs and C-STORE their SEG and SR to every destination."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from node.errors import PermanentSendError, SendError
from node.queue import repository
from node.queue.db import Database
from node.queue.states import JobStatus
from node.queue.tables import Job
from node.sender import scu
from node.settings import Destination, Settings
from node.worker.runner import worker_name

log = logging.getLogger(__name__)


class Sender:
    """Delivers results until ``stop`` is set; failed sends come back after the backoff."""

    def __init__(self, settings: Settings, db: Database, stop: threading.Event) -> None:
        self.settings, self.db, self.stop = settings, db, stop
        self.owner = worker_name("send")

    def run_forever(self) -> None:
        log.info("sender %s started", self.owner)
        while not self.stop.is_set():
            if not self.run_once():
                self.stop.wait(self.settings.send.poll_interval_s)
        log.info("sender %s stopped", self.owner)

    def run_once(self) -> bool:
        """Send one due job's results; False if none was due."""
        cfg = self.settings.send
        job_id = repository.claim(self.db, JobStatus.ENCODED, JobStatus.SENDING, self.owner,
                                  lease_s=cfg.timeout_s * 4 * max(1, len(self.settings.destinations)))
        if job_id is None:
            return False
        job = repository.get_job(self.db, job_id)
        give_up = False
        attempts = 0
        for name in repository.pending_deliveries(self.db, job_id):
            error: str | None = None
            try:
                dest = self.settings.destination(name)
                scu.store(dest, self._files_for(job, dest), self.settings.node.ae_title, cfg.timeout_s)
            except SendError as exc:
                error = str(exc)
                give_up = give_up or isinstance(exc, PermanentSendError)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - e.g. a destination removed from the config
                error = f"{type(exc).__name__}: {exc}"
                give_up = True
            attempts = max(attempts, repository.record_delivery(self.db, job_id, name, error))
            log.log(logging.WARNING if error else logging.INFO, "job %d -> %s: %s", job_id,
                    name, error or "stored")
        status = repository.finish_sending(self.db, job_id, self.owner,
                                           max_attempts=cfg.max_attempts,
                                           delay_s=cfg.delay_after(max(attempts, 1)),
                                           give_up=give_up)
        log.info("job %d: %s", job_id, status)
        return True

    @staticmethod
    def _files_for(job: Job, dest: Destination) -> list[Path]:
        """The archived results ``dest`` receives, in the order of its ``outputs``.

        Raises:
            PermanentSendError: the job has none of them (e.g. encoded before an output was
                added to the destination: ``cxrnode jobs retry`` after re-analysis makes them).
        """
        files = [Path(r.path) for kind in dest.outputs if (r := job.result(kind)) is not None]
        if not files:
            raise PermanentSendError(f"job {job.id} has none of the outputs {list(dest.outputs)} for {dest.name}")
        return files
