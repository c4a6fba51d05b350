"""The worker's and the sender's loop: one bad turn never ends it; only a node that cannot work stops.

A turn (``step``) claims and handles one job. A failure of one job's handling is recorded on that
job by the step itself (retried, or failed with the reason) and counts as a good turn: the loop
works. A step that raises could not even do that (the queue database is locked past its busy
timeout or unreachable, so neither the claim nor recording the failure went through): the loop
logs it, waits (``stop.wait``: a warm stop still ends the wait at once) with a bounded
exponential backoff, and tries again. A job it held keeps its lease only until the lease
expires; the reaper then returns it.

The rule for giving up: when every turn has failed for at least ``give_up_after_s``
(``worker.give_up_after_s``) and at least :data:`MIN_FAILURES` times in a row, the node cannot
work; :func:`run_loop` raises :class:`GiveUp`, and :class:`node.service.Service` stops the node
with exit code 75 (EX_TEMPFAIL) and a log line saying why, so that its supervisor restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

#: Failing turns in a row needed (besides the time) before giving up: one slow failure (a
#: 30 s busy timeout) is not an outage.
MIN_FAILURES = 3
#: The longest wait between two failing turns, seconds.
MAX_BACKOFF_S = 30.0


class GiveUp(Exception):
    """A loop has failed for longer than it may: the node cannot work (exit code 75)."""


def describe(exc: BaseException) -> str:
    """One line for a log or a job's error: ``OperationalError: database is locked``."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc).__name__}: {exc.orig}"
    return f"{type(exc).__name__}: {exc}"


def backoff_s(failures: int, poll_s: float, give_up_after_s: float) -> float:
    """Wait after the ``failures``-th failing turn in a row: doubling from ``poll_s``, bounded by
    :data:`MAX_BACKOFF_S` and by a quarter of ``give_up_after_s`` (so that a loop fails several
    times before it gives up)."""
    cap = min(MAX_BACKOFF_S, max(poll_s, give_up_after_s / 4))
    return min(cap, poll_s * 2 ** min(failures - 1, 30))


def run_loop(name: str, step: Callable[[], bool], stop: threading.Event, *, poll_s: float,
             give_up_after_s: float, clock: Callable[[], float] = time.monotonic,
             idle: Callable[[float], object] | None = None) -> None:
    """Call ``step`` until ``stop`` is set; when it found nothing to do (False), wait for
    ``idle(poll_s)``: by default ``stop.wait``, for the worker and the sender their wake-up bell
    (:meth:`node.wakeups.Wakeups.wait`, which returns as soon as a job is ready for them), with
    ``poll_s`` as the fallback poll.

    Raises:
        GiveUp: ``step`` raised on every turn for ``give_up_after_s`` and at least
            :data:`MIN_FAILURES` times in a row.
    """
    idle = idle if idle is not None else stop.wait
    failures, first_failure = 0, 0.0
    while not stop.is_set():
        try:
            busy = step()
        except Exception as exc:  # noqa: BLE001 - whatever it is, the loop goes on (or gives up)
            now = clock()
            if failures == 0:
                first_failure = now
            failures += 1
            failing_s = now - first_failure
            if failures >= MIN_FAILURES and failing_s >= give_up_after_s:
                raise GiveUp(f"{name}: every turn failed for {failing_s:.1f} s ({failures} in a row, "
                             f"limit {give_up_after_s:g} s); last: {describe(exc)}") from exc
            delay = backoff_s(failures, poll_s, give_up_after_s)
            log.error("%s: turn failed (%d in a row for %.1f s): %s; trying again in %.1f s",
                      name, failures, failing_s, describe(exc), delay,
                      exc_info=failures == 1)  # the traceback once per streak
            stop.wait(delay)
            continue
        if failures:
            log.warning("%s: working again after %d failed turn(s)", name, failures)
            failures = 0
        if not busy:
            idle(poll_s)
