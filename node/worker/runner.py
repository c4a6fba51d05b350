"""The worker loop: claim a queued job, run the pipeline under a lease, record the outcome
(whatever it is: see :meth:`InferenceWorker.run_once`)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from functools import partial
from collections.abc import Callable
from typing import Any

from models.plausibility import PLAUSIBLE
from node import faults
from node.archive import Archive
from node.errors import EncodingError, RejectedInput
from node.http import metrics
from node.loop import describe, run_loop
from node.queue import repository
from node.queue.db import Database
from node.queue.states import JobStatus
from node.settings import Settings
from node.worker.lease import LeaseKeeper
from node.worker.pipeline import Pipeline
from node.wakeups import Stage, Wakeups
from node.worker.shadow import event_message

log = logging.getLogger(__name__)


def instance_name(settings: Settings) -> str:
    """This instance's name in leases: ``[node] instance_name``, else the host name."""
    return settings.node.instance_name or socket.gethostname()


def worker_name(settings: Settings, role: str) -> str:
    """Lease owner id: ``instance:pid:role``; see :func:`node.queue.repository.release_orphans`."""
    return f"{instance_name(settings)}:{os.getpid()}:{role}"


class InferenceWorker:
    """Takes queued jobs one at a time until ``stop`` is set.

    With ``wakeups`` (one process running the listener too) it starts a job as soon as the
    listener rings, and rings the sender once the job's results are recorded; without, it polls.
    """

    def __init__(self, settings: Settings, db: Database, archive: Archive,
                 pipeline: Pipeline, stop: threading.Event, wakeups: Wakeups | None = None,
                 number: int = 1) -> None:
        self.settings, self.db, self.archive, self.pipeline = settings, db, archive, pipeline
        self.stop, self.wakeups = stop, wakeups
        # ``worker.concurrency`` workers share a process: each its own lease owner id and thread
        self.owner = worker_name(settings, "infer" if number == 1 else f"infer{number}")
        self.thread_name = "worker" if number == 1 else f"worker-{number}"
        self._doing = ""  # what run_once is doing with its job, for the error it records

    def run_forever(self) -> None:
        """Run jobs until ``stop`` is set; raises :class:`node.loop.GiveUp` if the queue stays unreachable."""
        log.info("inference worker %s started", self.owner)
        cfg = self.settings.worker
        idle = None if self.wakeups is None else partial(self.wakeups.wait, Stage.QUEUED)
        run_loop("inference worker", self.run_once, self.stop, poll_s=cfg.poll_interval_s,
                 give_up_after_s=cfg.give_up_after_s, idle=idle)
        log.info("inference worker %s stopped", self.owner)

    def run_once(self) -> bool:
        """Process one due job; False if none was waiting.

        Whatever goes wrong with the job (its analysis, a full disk while its results are written,
        the database locked while they are recorded, its lease lost) is recorded on the job: it
        is retried after ``worker.retry_delay_s``, or failed with the reason once its attempts
        are used up. Raises only when the queue itself cannot be reached (the claim failed, or
        recording the failure failed too; the job's lease then expires and the reaper returns
        it); :func:`node.loop.run_loop` backs off and tries again.
        """
        cfg = self.settings.worker
        faults.fire("db-claim")
        job_id = repository.claim(self.db, JobStatus.QUEUED, JobStatus.PROCESSING, self.owner,
                                  cfg.lease_s)
        if job_id is None:
            return False
        metrics.job_claimed(self.db, job_id)
        self._doing = "reading the job"
        try:
            self._process(job_id)
        except repository.LeaseLost as exc:
            self._lease_lost(job_id, exc)
        except _AnalysisFailed as exc:
            self._record_failure(job_id, exc.error, give_up=exc.give_up)
        except Exception as exc:  # noqa: BLE001 - disk full, database locked, ...: recorded on the job
            log.exception("job %d: failed while %s", job_id, self._doing)
            self._record_failure(job_id, f"{self._doing}: {describe(exc)}")
        return True

    def _process(self, job_id: int) -> None:
        cfg = self.settings.worker
        instance = repository.instance_of(self.db, job_id)
        shadow = None
        with LeaseKeeper(self.db, job_id, self.owner, cfg.lease_s) as lease:
            faults.pause("infer")
            try:
                with self.archive.local_file(instance.path) as source:
                    outcome = self.pipeline.run(source)
            except RejectedInput as exc:
                log.info("job %d discarded: %s", job_id, exc)
                self._doing = "recording the discard"
                repository.mark_discarded(self.db, job_id, self.owner, str(exc))
                return
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - incl. native decoders' panics
                log.exception("job %d: analysis failed", job_id)
                raise _AnalysisFailed(describe(exc), give_up=isinstance(exc, EncodingError)) from exc
            if lease.lost.is_set():
                raise repository.LeaseLost("the lease was lost during the analysis")
            self._doing = "writing the results"
            archived = []
            for result in outcome.results:
                key = self.archive.result_key(job_id, result.kind)
                self.archive.put(key, result.data)
                archived.append(repository.ArchivedResult(result.kind, result.sop_class_uid,
                                                          result.sop_instance_uid, key))
            self._doing = "recording the results"
            repository.note(self.db, job_id, "infer", "ok", outcome.summary)
            faults.fire("db-record")
            repository.mark_encoded(self.db, job_id, self.owner, outcome.tb_score, archived,
                                    [d.name for d in self.settings.destinations_for(instance.calling_ae_title)])
            if self.wakeups is not None:
                self.wakeups.ring(Stage.ENCODED)
            log.info("job %d encoded (TB score %.3f)", job_id, outcome.tb_score)
            if outcome.plausibility is not None and outcome.plausibility < PLAUSIBLE:
                log.warning("job %d: implausible lung segmentation (plausibility %.3f < %s): its overlay and "
                            "TB score need a person's check", job_id, outcome.plausibility, PLAUSIBLE)
            shadow = outcome.shadow
        if shadow is not None:  # after the job's results are recorded: it never delays nor fails them
            self._run_shadow(job_id, shadow)

    def _run_shadow(self, job_id: int, shadow: Callable[[], dict[str, Any]]) -> None:
        """Run the shadow, record its row and a ``shadow`` step; whatever goes wrong is only logged."""
        try:
            fields = shadow()
            repository.record_shadow(self.db, job_id, fields)
            repository.note(self.db, job_id, "shadow", "error" if fields.get("error") else "ok",
                            event_message(fields))
        except Exception:  # noqa: BLE001 - the job is done; its shadow is only a record
            log.exception("job %d: the shadow comparison could not be recorded", job_id)

    def _record_failure(self, job_id: int, error: str, *, give_up: bool = False) -> None:
        """Retry the job later or fail it; raises if the queue cannot be reached."""
        cfg = self.settings.worker
        try:
            faults.fire("db-record")
            status = repository.fail_attempt(self.db, job_id, self.owner, error,
                                             max_attempts=cfg.max_attempts,
                                             retry_delay_s=cfg.retry_delay_s, give_up=give_up)
        except repository.LeaseLost as exc:
            self._lease_lost(job_id, exc)
            return
        except Exception as exc:
            log.error("job %d: could not record its failure (%s): %s; its lease expires in at most "
                      "%g s and the reaper returns it", job_id, error, describe(exc), cfg.lease_s)
            raise
        log.warning("job %d: %s (%s)", job_id, "failed" if status == JobStatus.FAILED else
                    f"retry in {cfg.retry_delay_s:g} s", error)

    def _lease_lost(self, job_id: int, exc: repository.LeaseLost) -> None:
        """Another worker may hold the job now: record nothing but an event (best effort)."""
        log.warning("job %d: %s; results not recorded (the job returns to the queue when its "
                    "lease expires)", job_id, exc)
        try:
            repository.note(self.db, job_id, "infer", "lease-lost", f"{exc}; results not recorded")
        except Exception:  # noqa: BLE001 - only an event; the reaper does the real work
            log.exception("job %d: could not record the lost lease", job_id)


class _AnalysisFailed(Exception):
    """The pipeline failed (its own exception is the cause); recorded as a failed attempt."""

    def __init__(self, error: str, *, give_up: bool) -> None:
        super().__init__(error)
        self.error, self.give_up = error, give_up
