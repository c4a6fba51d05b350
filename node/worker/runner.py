"""The worker loop: claim a queued job, run the pipeline under a lease, record the outcome."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

from node import faults
from node.archive import Archive
from node.errors import EncodingError, RejectedInput
from node.queue import repository
from node.queue.db import Database
from node.queue.states import JobStatus
from node.settings import Settings
from node.worker.lease import LeaseKeeper
from node.worker.pipeline import Pipeline

log = logging.getLogger(__name__)


def worker_name(role: str) -> str:
    """Lease owner id: ``host:pid:role``; see :func:`node.queue.repository.release_orphans`."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}"


class InferenceWorker:
    """Takes queued jobs one at a time until ``stop`` is set."""

    def __init__(self, settings: Settings, db: Database, archive: Archive,
                 pipeline: Pipeline, stop: threading.Event) -> None:
        self.settings, self.db, self.archive, self.pipeline = settings, db, archive, pipeline
        self.stop = stop
        self.owner = worker_name("infer")

    def run_forever(self) -> None:
        log.info("inference worker %s started", self.owner)
        while not self.stop.is_set():
            if not self.run_once():
                self.stop.wait(self.settings.worker.poll_interval_s)
        log.info("inference worker %s stopped", self.owner)

    def run_once(self) -> bool:
        """Process one due job; False if none was waiting."""
        cfg = self.settings.worker
        job_id = repository.claim(self.db, JobStatus.QUEUED, JobStatus.PROCESSING, self.owner,
                                  cfg.lease_s)
        if job_id is None:
            return False
        instance = repository.instance_of(self.db, job_id)
        with LeaseKeeper(self.db, job_id, self.owner, cfg.lease_s) as lease:
            faults.pause("infer")
            try:
                outcome = self.pipeline.run(Path(instance.path))
            except RejectedInput as exc:
                log.info("job %d discarded: %s", job_id, exc)
                repository.mark_discarded(self.db, job_id, self.owner, str(exc))
                return True
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - incl. native decoders' panics
                log.exception("job %d: analysis failed", job_id)
                repository.fail_attempt(self.db, job_id, self.owner,
                                        f"{type(exc).__name__}: {exc}",
                                        max_attempts=cfg.max_attempts,
                                        retry_delay_s=cfg.retry_delay_s,
                                        give_up=isinstance(exc, EncodingError))
                return True
            if lease.lost.is_set():
                log.warning("job %d: lease lost; results not recorded", job_id)
                return True
            repository.note(self.db, job_id, "infer", "ok", outcome.summary)
            results_dir = self.archive.results_dir(job_id)
            archived = []
            for result in outcome.results:
                path = results_dir / f"{result.kind}.dcm"
                self.archive.write_atomic(path, result.data)
                archived.append(repository.ArchivedResult(result.kind, result.sop_class_uid,
                                                          result.sop_instance_uid, str(path)))
            repository.mark_encoded(self.db, job_id, self.owner, outcome.tb_score, archived,
                                    [d.name for d in self.settings.destinations_for(instance.calling_ae_title)])
            log.info("job %d encoded (TB score %.3f)", job_id, outcome.tb_score)
        return True
