"""Liveness and readiness of one node process, as ``/healthz`` and ``/readyz`` report them.

* **Alive** (``/healthz``): the process runs its loops. 503 once a worker or sender thread has
  died (the node then stops with exit code 70, see :mod:`node.service`) or while it stops.
  Cheap: no I/O, for a supervisor or a load balancer polling every few seconds.
* **Ready** (``/readyz``): the process can do its work now. Every check runs on every request;
  each names itself in the answer:

  - ``started``: start-up finished and no stop was asked for;
  - ``models``: the networks are loaded (processes that work only);
  - ``database``: the queue database opens, answers a read, and takes the write lock
    (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: ``LOCK TABLE jobs IN ROW EXCLUSIVE MODE``, what
    every write takes, refused by a read-only server; rolled back: nothing is written), within 2 s;
  - ``archive``: a small object can be stored and removed (a folder: a file created, written,
    fsync'd and removed in ``tmp/``, where every archived object starts; an object store: PUT
    and DELETE);
  - ``disk``: free space of the data folder is at least ``node.min_free_disk_mb`` (below it
    C-STOREs are refused with 0xA700).
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node.archive import Archive
from node.http import metrics
from node.queue.db import DATABASE_FILE

if TYPE_CHECKING:
    from node.queue.db import Database

#: How long the database check waits for the write lock (a busy node holds it for milliseconds).
DATABASE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Check:
    """The outcome of one readiness check."""

    name: str
    ok: bool
    detail: str


def check_database(data_path: Path, timeout_s: float = DATABASE_TIMEOUT_S, db: Database | None = None) -> str:
    """Open the queue database read-write (never creating it), read it and take its write lock:
    the SQLite file in ``data_path``, or ``db``'s PostgreSQL database on a connection of its own.

    Returns a short description; raises (``sqlite3.Error``, ``psycopg.Error``, ``OSError``) when it fails.
    """
    if db is not None and db.dialect == "postgresql":
        return _check_postgresql(db, timeout_s)
    uri = (data_path / DATABASE_FILE).resolve().as_uri() + "?mode=rw"
    connection = sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None)
    try:
        connection.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
    finally:
        connection.close()
    return "answers and takes the write lock"


def _check_postgresql(db: Database, timeout_s: float) -> str:
    from node.queue.db import psycopg_connect

    millis = max(1, int(timeout_s * 1000))
    with psycopg_connect(db.engine, connect_timeout=max(1, round(timeout_s))) as connection:
        connection.execute(f"SET LOCAL lock_timeout = {millis}")  # a lock not granted: "lock timeout"
        connection.execute(f"SET LOCAL statement_timeout = {2 * millis}")
        connection.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        connection.execute("LOCK TABLE jobs IN ROW EXCLUSIVE MODE")
        connection.rollback()
    return "answers and takes the write lock (PostgreSQL)"


def check_archive(archive: Archive) -> str:
    """Store and remove a small object (a folder: create, write, fsync and remove a file in
    ``tmp/``, where archived objects are first written; an object store: PUT and DELETE)."""
    return archive.probe()


class NodeHealth:
    """What one process knows of its own health; the HTTP routes only render it."""

    def __init__(self, *, data_path: Path, archive: Archive, min_free_bytes: int, work: bool,
                 threads: Callable[[], Iterable[threading.Thread]], stop: threading.Event,
                 db: Database | None = None) -> None:
        self.data_path, self.archive, self.min_free_bytes = data_path, archive, min_free_bytes
        self.db = db  # its PostgreSQL database is checked; None or SQLite: the file in data_path
        self.work = work
        self._threads, self._stop = threads, stop
        self._started = threading.Event()

    def mark_started(self) -> None:
        """Start-up is over: the listener listens and the loops run."""
        self._started.set()

    # ----- liveness -----

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """(alive, body): dead threads named; ``stopping`` while a stop is under way."""
        threads = list(self._threads())
        dead = sorted(t.name for t in threads if not t.is_alive())
        body: dict[str, object] = {"threads": {t.name: "alive" if t.is_alive() else "dead" for t in threads}}
        if self._stop.is_set():
            return False, {"status": "stopping", **body}
        if dead:
            return False, {"status": "failing", "dead_threads": dead, **body}
        return True, {"status": "alive", **body}

    # ----- readiness -----

    def checks(self) -> list[Check]:
        """Run every readiness check of this process (see the module's docstring)."""
        results = [self._check_started()]
        if self.work:
            models = metrics.loaded_models()
            results.append(Check("models", models is not None,
                                 f"{models['architecture']} on {models['device']}" if models else "not loaded"))
        results.append(self._guarded("database", lambda: check_database(self.data_path, db=self.db)))
        results.append(self._guarded("archive", lambda: check_archive(self.archive)))
        results.append(self._check_disk())
        return results

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """(ready, body): every check with its detail, and the names of those that failed."""
        results = self.checks()
        failed = [c.name for c in results if not c.ok]
        return not failed, {"status": "ready" if not failed else "not ready", "failed": failed,
                            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in results}}

    def _check_started(self) -> Check:
        if self._stop.is_set():
            return Check("started", False, "stopping")
        if not self._started.is_set():
            return Check("started", False, "starting")
        return Check("started", True, "running")

    @staticmethod
    def _guarded(name: str, run: Callable[[], str]) -> Check:
        try:
            return Check(name, True, run())
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return Check(name, False, f"{type(exc).__name__}: {exc}")

    def _check_disk(self) -> Check:
        try:
            free = shutil.disk_usage(self.data_path).free
        except OSError as exc:
            return Check("disk", False, f"{type(exc).__name__}: {exc}")
        detail = (f"{free // 2**20} MiB free, minimum {self.min_free_bytes // 2**20} MiB "
                  "(node.min_free_disk_mb)")
        return Check("disk", free >= self.min_free_bytes, detail)
