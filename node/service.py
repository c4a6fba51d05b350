"""Composition root: builds the listener, the worker, the sender and the scheduler, and stops
them in order.

The first SIGTERM/SIGINT is a warm stop: the listener stops accepting, open associations and the
current job finish, then the process exits. A second signal exits at once; leases and the
reaper make that safe (nothing acknowledged is lost, unfinished work is picked up on restart).

The node never stops silently. A fault in one job's handling is recorded on the job and the
worker or sender goes on (see :mod:`node.loop`); a fault that leaves the node unable to work
stops it, warmly, with a log line saying why and a non-zero exit code, so that a supervisor
(systemd's ``Restart=on-failure``, Docker's ``--restart on-failure``) starts it again.
Exit codes of ``cxrnode serve`` and ``cxrnode worker``:

    0    stopped by SIGTERM/SIGINT (warm stop: work in flight finished)
    70   EX_SOFTWARE: the worker or sender thread died (an exception no handler expected, e.g.
         a native crash's stand-in; fault kind ``fatal``) or ended on its own
    75   EX_TEMPFAIL: the worker or sender failed on every turn for ``worker.give_up_after_s``
         (at least three times in a row): the queue database is locked or unreachable
    130  a second signal: stopped at once (the job in flight stays leased; start-up recovery
         takes it back)
    1, 2 start-up failed (2: a bad configuration, one line naming the key; 1: anything else,
         with its traceback)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from node.archive import open_archive
from node.housekeeping import start_scheduler
from node.http.server import HttpService
from node.loop import GiveUp, describe
from node.queue.db import Database
from node.scp import server as scp_server
from node.sender.runner import Sender
from node.settings import Settings, SettingsError
from node.wakeups import wakeups_for

log = logging.getLogger(__name__)

EX_OK = 0
EX_SOFTWARE = 70  # a worker/sender thread died
EX_TEMPFAIL = 75  # the worker/sender could not work for worker.give_up_after_s
EX_SECOND_SIGNAL = 130


#: The roles a process can run (``cxrnode serve --role``): the DICOM listener, the inference
#: worker and the sender. Any number of each may share one queue and archive, on any hosts.
ROLES = ("receiver", "worker", "sender")


def parse_roles(text: str) -> frozenset[str]:
    """``"receiver,worker"`` → the set of roles; raises :class:`SettingsError` naming ``--role``."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ROLES))
    if unknown or not names:
        raise SettingsError(f"--role: {', '.join(unknown) or repr(text)} is not a role; "
                            f"give one or more of {', '.join(ROLES)}, separated by commas")
    return frozenset(names)


class Service:
    """The running node: what ``cxrnode serve`` (every role, or those ``--role`` names) and
    ``cxrnode worker`` (worker and sender) run. ``listen`` runs the receiver, ``work`` the
    inference worker, ``send`` the sender (default: with the worker)."""

    def __init__(self, settings: Settings, *, listen: bool, work: bool, send: bool | None = None) -> None:
        self.settings = settings
        self.listen, self.work = listen, work
        self.send = work if send is None else send
        self.stop = threading.Event()
        self._signals = 0
        self.db = Database.for_settings(settings)
        log.info("queue: %s", self.db.describe())
        #: the bells between listener, worker and sender (node.wakeups), across processes on a
        #: PostgreSQL queue; rung on stop too
        self.wakeups = wakeups_for(self.db)
        self.archive = open_archive(settings)
        log.info("archive: %s", self.archive.describe())
        self.ae = None
        self.server = None
        self.threads: list[threading.Thread] = []
        self.scheduler = None
        self.exit_code, self.exit_reason = EX_OK, ""
        self._exit_lock = threading.Lock()
        self.http = HttpService(settings, self.db, self.archive, listen=listen, work=work, send=self.send,
                                threads=lambda: self.threads, stop=self.stop)

    def start(self) -> None:
        self.http.start()  # first: /healthz answers while the models load
        pipeline = None
        if self.work:
            from node.worker.pipeline import Pipeline  # loads torch: only when working

            pipeline = Pipeline.load(self.settings)
        self.scheduler = start_scheduler(self.settings, self.db, self.archive,
                                         purge_archive=self.listen)  # purge: with the receiver
        if self.listen:
            self.ae, self.server = scp_server.start(self.settings, self.db, self.archive, self.wakeups)
        loops = []
        if pipeline is not None:
            from node.worker.runner import InferenceWorker

            workers = [InferenceWorker(self.settings, self.db, self.archive, pipeline, self.stop, self.wakeups,
                                       number=n) for n in range(1, self.settings.worker.concurrency + 1)]
            loops += [(worker.thread_name, worker.run_forever) for worker in workers]
        if self.send:
            sender = Sender(self.settings, self.db, self.stop, self.wakeups, archive=self.archive)
            loops.append(("sender", sender.run_forever))
        for name, target in loops:
            thread = threading.Thread(target=self._guarded(name, target), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: finishing work in flight, then stopping (again to stop at once)",
                     signal.Signals(signum).name)
            self._halt()
        else:
            log.warning("second signal: stopping at once")
            os._exit(EX_SECOND_SIGNAL)

    def fail(self, code: int, reason: str) -> None:
        """Stop the node (warmly) with exit ``code``: it cannot work. The first reason wins."""
        with self._exit_lock:
            if self.exit_code == EX_OK:
                self.exit_code, self.exit_reason = code, reason
        log.critical("%s; stopping with exit code %d so that the supervisor restarts the node",
                     reason, code)
        self._halt()

    def _halt(self) -> None:
        """Set the stop flag and wake the worker and the sender, so that they see it now."""
        self.stop.set()
        self.wakeups.ring_all()

    def _guarded(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        """``target`` as a thread body whose end, other than by a warm stop, stops the node."""
        def run() -> None:
            try:
                target()
            except GiveUp as exc:
                self.fail(EX_TEMPFAIL, f"the node cannot work: {exc}")
            except BaseException as exc:  # noqa: BLE001 - whatever killed the thread, say so
                log.critical("%s thread died", name, exc_info=True)
                self.fail(EX_SOFTWARE, f"{name} thread died: {describe(exc)}")
            else:
                if not self.stop.is_set():
                    self.fail(EX_SOFTWARE, f"{name} thread ended on its own")
        return run

    def run(self) -> int:
        """Start, block until signalled (or until the node cannot work), stop warmly.

        Returns the exit code: 0 after a signal, else the one :meth:`fail` was given (see the
        module's docstring).
        """
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        self.http.mark_started()
        log.info("cxrnode ready (%s)", self.http.role)
        while not self.stop.wait(0.5):
            for thread in self.threads:
                if not thread.is_alive():  # its guard normally said why first
                    self.fail(EX_SOFTWARE, f"{thread.name} thread is gone")
        self.shutdown()
        if self.exit_code != EX_OK:
            log.critical("cxrnode exits with code %d: %s", self.exit_code, self.exit_reason)
        return self.exit_code

    def _receiving(self) -> bool:
        """True while an established association is still open (a bare TCP probe does not count)."""
        return self.ae is not None and any(a.is_established for a in self.ae.active_associations)

    def shutdown(self, grace_s: float = 60.0) -> None:
        self._halt()
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
        self.http.stop()
        self.wakeups.close()
        self.db.dispose()
        log.info("cxrnode stopped")
