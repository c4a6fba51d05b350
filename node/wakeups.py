"""Wake-ups between the stages: a job is taken up as soon as it is ready, not at the next poll.

The listener rings :attr:`Stage.QUEUED` once a received image's job is committed; the inference
worker rings :attr:`Stage.ENCODED` once a job's results are recorded. The worker waits on the
``queued`` bell and the sender on the ``encoded`` bell instead of sleeping for their poll
interval, so a radiograph no longer waits up to a second twice on its way through the node.

The poll stays, as the fallback for work no bell announces: another process on the same queue
(``cxrnode worker`` beside ``cxrnode serve``, ``cxrnode jobs retry``), a retry whose backoff has
run out, a job the lease reaper returned. ``worker.poll_interval_s`` and ``send.poll_interval_s``
bound how long such work waits.

Ordering makes a ring impossible to miss: the ringer commits first, then rings; the waiter
clears its bell *before* it claims. A ring that arrives while the waiter is busy leaves the bell
set, so its next wait returns at once.

These bells live in one process (what the embedded SQLite queue needs). A queue shared by
several hosts rings them from the database's own notifications instead, behind the same
:meth:`Wakeups.ring` and :meth:`Wakeups.wait`.
"""

from __future__ import annotations

import threading
from enum import StrEnum


class Stage(StrEnum):
    """What a bell announces: a job became ready for the stage that takes it from this state."""

    QUEUED = "queued"  # a received image waits for the inference worker
    ENCODED = "encoded"  # results wait for the sender


class Wakeups:
    """One bell per :class:`Stage`, shared by the listener, the worker and the sender of a process."""

    def __init__(self) -> None:
        self._bells = {stage: threading.Event() for stage in Stage}

    def ring(self, stage: Stage) -> None:
        """Say that a job is ready for ``stage`` (after its transaction committed); never blocks."""
        self._bells[stage].set()

    def ring_all(self) -> None:
        """Wake every waiter at once, e.g. so that it sees the node's stop flag now."""
        for bell in self._bells.values():
            bell.set()

    def wait(self, stage: Stage, timeout_s: float) -> bool:
        """Block until ``stage`` is rung or ``timeout_s`` passed (the fallback poll); True if rung.

        The bell is cleared before returning: the caller claims next, and a ring after this
        point is seen by the following wait.
        """
        bell = self._bells[stage]
        rung = bell.wait(timeout_s)
        bell.clear()
        return rung
