"""Composition root: builds the listener, the worker, the sender and the scheduler, and stops
them in order.

The first SIGTERM/SIGINT is a warm stop: the listener stops accepting, open associations and the
current job finish, then the process exits. A second signal exits at once; leases and the
reaper make that safe (nothing acknowledged is lost, unfinished work is picked up on restart).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from node.archive import Archive
from node.housekeeping import start_scheduler
from node.queue.db import Database
from node.scp import server as scp_server
from node.sender.runner import Sender
from node.settings import Settings

log = logging.getLogger(__name__)


class Service:
    """The running node: what ``cxrnode serve`` (listen + work) and ``cxrnode worker`` run."""

    def __init__(self, settings: Settings, *, listen: bool, work: bool) -> None:
        self.settings = settings
        self.listen, self.work = listen, work
        self.stop = threading.Event()
        self._signals = 0
        self.db = Database(settings.data_path)
        self.archive = Archive(settings.data_path)
        self.ae = None
        self.server = None
        self.threads: list[threading.Thread] = []
        self.scheduler = None

    def start(self) -> None:
        pipeline = None
        if self.work:
            from node.worker.pipeline import Pipeline  # loads torch: only when working

            pipeline = Pipeline.load(self.settings)
        self.scheduler = start_scheduler(self.settings, self.db)
        if self.listen:
            self.ae, self.server = scp_server.start(self.settings, self.db, self.archive)
        if pipeline is not None:
            from node.worker.runner import InferenceWorker

            worker = InferenceWorker(self.settings, self.db, self.archive, pipeline, self.stop)
            sender = Sender(self.settings, self.db, self.stop)
            for name, target in (("worker", worker.run_forever), ("sender", sender.run_forever)):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self.threads.append(thread)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: finishing work in flight, then stopping (again to stop at once)",
                     signal.Signals(signum).name)
            self.stop.set()
        else:
            log.warning("second signal: stopping at once")
            os._exit(130)

    def run(self) -> int:
        """Start, block until signalled, stop warmly. Returns the exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        log.info("cxrnode ready (listen=%s, work=%s)", self.listen, self.work)
        while not self.stop.wait(0.5):
            for thread in self.threads:
                if not thread.is_alive():
                    log.error("%s thread died; stopping", thread.name)
                    self.stop.set()
        self.shutdown()
        return 0

    def _receiving(self) -> bool:
        """True while an established association is still open (a bare TCP probe does not count)."""
        return self.ae is not None and any(a.is_established for a in self.ae.active_associations)

    def shutdown(self, grace_s: float = 60.0) -> None:
        self.stop.set()
        if self.server is not None:
            self.server.shutdown()  # stop accepting
            deadline = time.monotonic() + grace_s
            while self._receiving() and time.monotonic() < deadline:
                time.sleep(0.1)
        for thread in self.threads:
            thread.join(timeout=grace_s)
        if self.ae is not None:
            self.ae.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        self.db.dispose()
        log.info("cxrnode stopped")
