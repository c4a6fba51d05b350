"""Keep a claimed job's lease alive while a worker is busy with it."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from node import faults
from node.queue import repository
from node.queue.db import Database

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Context manager: renews the lease every third of its length in a background thread.

    If the lease is lost (another worker reclaimed the job after this one stalled), ``lost``
    is set and the caller must not record results.
    """

    def __init__(self, db: Database, job_id: int, owner: str, lease_s: float) -> None:
        self._db, self._job_id, self._owner, self._lease_s = db, job_id, owner, lease_s
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            try:
                faults.fire("lease")
                repository.renew_lease(self._db, self._job_id, self._owner, self._lease_s)
            except repository.LeaseLost:
                log.warning("job %d: lease lost", self._job_id)
                self.lost.set()
                return
            except Exception:  # noqa: BLE001 - a transient database error; try again next tick
                log.exception("job %d: could not renew the lease", self._job_id)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
