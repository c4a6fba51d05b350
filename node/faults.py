"""Named fault-injection points, for the crash-safety and fault tests (the mercure way).

Both variables are read by the node's own process only; unset (always, in production) every
point does nothing.

``CXRNODE_FAULT_PAUSE="infer=5,send=5"`` makes the node sleep at those points so that a test can
kill it there with SIGKILL.

Pause points:
    infer  after a job is claimed, before its image is analysed
    send   after the first result is stored at a destination, before the second

``CXRNODE_FAULT_RAISE="result-write=ENOSPC:1,db-claim=locked:2,lease=lost:1,scu=RuntimeError:1"``
makes the named points raise, each ``point=kind[:count]``: ``count`` times (default 1, ``*`` =
every time), counted across the whole process. The exception is the one the real fault raises,
so the code that handles it is the production code.

Raise points:
    result-write  :meth:`node.archive.Archive.write_atomic` of a result file (``results/``), after
                  the bytes went to ``tmp/``, before fsync and rename
    db-claim      the worker's and the sender's claim of the next job
    db-record     the worker recording a job's outcome (results encoded, or an attempt failed)
                  and the sender finishing a send round
    lease         the renewal of a job's lease by the worker (:mod:`node.worker.lease`)
    scu           :func:`node.sender.scu.store`, before it associates with the destination

Kinds:
    ENOSPC, EIO, EACCES, ... (any ``errno`` name)  ``OSError`` with that errno (a full disk: ENOSPC)
    locked        SQLAlchemy ``OperationalError``: "database is locked" (past the busy timeout)
    unavailable   SQLAlchemy ``OperationalError``: "unable to open database file"
    lost          :class:`node.queue.repository.LeaseLost` (another worker holds the job now)
    fatal         :class:`FatalFault`, a ``BaseException`` that no ``except Exception`` catches
                  (a native crash's stand-in): at ``db-claim``, ``db-record`` or ``result-write``
                  the worker's or sender's thread dies and the node stops with exit code 70
    RuntimeError, ValueError, ... (any built-in ``Exception`` class name)  that exception
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import threading
import time

ENV = "CXRNODE_FAULT_PAUSE"
RAISE_ENV = "CXRNODE_FAULT_RAISE"
POINTS = frozenset({"infer", "send"})
RAISE_POINTS = frozenset({"result-write", "db-claim", "db-record", "lease", "scu"})

log = logging.getLogger(__name__)

_lock = threading.Lock()
_fired: dict[str, int] = {}  # raise point -> times it raised, for the spec in _spec
_spec: str | None = None


class FatalFault(BaseException):
    """The ``fatal`` kind: escapes every ``except Exception`` (as a native decoder's panic does)."""


def pause(point: str) -> None:
    """Sleep at ``point`` if ``$CXRNODE_FAULT_PAUSE`` names it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition("=")
        if name.strip() == point:
            log.warning("fault injection: pausing %s s at %r", seconds, point)
            time.sleep(float(seconds))


def _parse(spec: str) -> dict[str, tuple[str, int | None]]:
    """``point=kind[:count],...`` -> {point: (kind, count or None for every time)}."""
    faults: dict[str, tuple[str, int | None]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, rest = item.partition("=")
        kind, _, count = rest.partition(":")
        point, kind, count = point.strip(), kind.strip(), count.strip()
        if point not in RAISE_POINTS or not kind:
            raise ValueError(f"{RAISE_ENV}: {item!r} is not point=kind[:count] with a point of "
                             f"{sorted(RAISE_POINTS)}")
        faults[point] = (kind, None if count == "*" else int(count or 1))
    return faults


def make_exception(kind: str, point: str) -> BaseException:
    """The exception a fault of ``kind`` raises at ``point``."""
    what = f"fault injected at {point!r}"
    if kind == "fatal":
        return FatalFault(what)
    if kind == "lost":
        from node.queue.repository import LeaseLost

        return LeaseLost(f"lease lost ({what})")
    if kind in ("locked", "unavailable"):
        import sqlite3

        from sqlalchemy.exc import OperationalError

        message = "database is locked" if kind == "locked" else "unable to open database file"
        return OperationalError(f"<{what}>", None, sqlite3.OperationalError(message))
    code = getattr(errno, kind, None)
    if kind.startswith("E") and isinstance(code, int):
        return OSError(code, os.strerror(code), what)
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls(what)
    raise ValueError(f"{RAISE_ENV}: unknown fault kind {kind!r} at {point!r}")


def reset() -> None:
    """Forget how often each point raised (tests that reuse a spec)."""
    global _spec
    with _lock:
        _spec = None
        _fired.clear()


def fire(point: str) -> None:
    """Raise the fault ``$CXRNODE_FAULT_RAISE`` names for ``point``, while its count lasts."""
    global _spec
    spec = os.environ.get(RAISE_ENV)
    if not spec:
        return
    with _lock:
        if spec != _spec:  # a new spec (tests change it): counts start again
            _spec = spec
            _fired.clear()
        fault = _parse(spec).get(point)
        if fault is None:
            return
        kind, count = fault
        if count is not None and _fired.get(point, 0) >= count:
            return
        _fired[point] = _fired.get(point, 0) + 1
        n = _fired[point]
    log.warning("fault injection: raising %s at %r (%d/%s)", kind, point, n, "*" if count is None else count)
    raise make_exception(kind, point)
