"""Wake-ups between the stages: a job is taken up as soon as it is ready, not at the next poll.

The listener rings :attr:`Stage.QUEUED` once a received image's job is committed; the inference
worker rings :attr:`Stage.ENCODED` once a job's results are recorded. The worker waits on the
``queued`` bell and the sender on the ``encoded`` bell instead of sleeping for their poll
interval, so a radiograph no longer waits up to a second twice on its way through the node.

Ordering makes a ring impossible to miss: the ringer commits first, then rings; the waiter
clears its bell *before* it claims. A ring that arrives while the waiter is busy leaves the bell
set, so its next wait returns at once.

:class:`Wakeups` are bells inside one process: enough for the embedded SQLite queue, where the
listener, worker and sender of ``cxrnode serve`` share a process. On a PostgreSQL queue
(``[queue] url``), where they may run in several processes on several hosts,
:class:`PostgresWakeups` rings across them behind the same :meth:`~Wakeups.ring` and
:meth:`~Wakeups.wait`: a ring sets the local bell and sends ``NOTIFY`` on the stage's channel
(after the ringer's commit, so the notified process finds the job); one daemon thread per
process ``LISTEN``\\ s on the channels and sets the local bells. :func:`wakeups_for` picks the
kind from the queue's database.

The poll stays, as the fallback for work no bell announces: on SQLite another process on the
same queue (``cxrnode worker`` beside ``cxrnode serve``, ``cxrnode jobs retry``); on both, a
retry whose backoff has run out, a job the lease reaper returned, and (PostgreSQL) whatever was
rung while the listener was reconnecting. ``worker.poll_interval_s`` and
``send.poll_interval_s`` bound how long such work waits.
"""

from __future__ import annotations

import logging
import threading
import uuid
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.queue.db import Database

log = logging.getLogger(__name__)


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

    def close(self) -> None:
        """Release what the bells hold (nothing here); the node calls it when it stops."""


#: The ``NOTIFY`` channel of each stage (one namespace per PostgreSQL database).
CHANNELS = {stage: f"cxrnode_{stage.value}" for stage in Stage}
#: The listener's reconnect delays: doubled after each failure, from the first to the last.
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.5, 30.0
#: How long the listener waits for notifications before it looks at its stop flag again.
LISTEN_TURN_S = 1.0


class PostgresWakeups(Wakeups):
    """The bells of one process, rung across every process on the same PostgreSQL queue.

    :meth:`ring` sets the local bell first (this process's waiters never depend on the server),
    then sends ``pg_notify`` through the queue's connection pool, with this process's token as
    the payload; the listener thread ignores its own notifications (their bell is already set)
    and sets the bell of every other one. A failed ``NOTIFY`` is logged and otherwise ignored:
    the other processes' poll finds the job.

    The listener holds one connection of its own (outside the pool). When it loses it (the
    server restarted, the network failed) it reconnects with a growing delay, never ending the
    node; after each (re)connection it rings every local bell once, since notifications sent
    while it was away are lost.
    """

    def __init__(self, db: Database) -> None:
        super().__init__()
        self._db = db
        self._token = uuid.uuid4().hex
        self._closing = threading.Event()
        #: Set while the listener is connected and listening (the tests wait for it).
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._listen_forever, name="wakeups", daemon=True)
        self._thread.start()

    def ring(self, stage: Stage) -> None:
        """Set the local bell, then notify the other processes (one short statement, pooled)."""
        super().ring(stage)
        from sqlalchemy import text

        try:
            with self._db.engine.connect() as connection:
                connection.execute(text("SELECT pg_notify(:channel, :token)"),
                                   {"channel": CHANNELS[stage], "token": self._token})
                connection.commit()
        except Exception as exc:  # noqa: BLE001 - the poll covers what a lost notification misses
            log.warning("wake-ups: could not notify the other processes of %s work (%s); they find it at "
                        "their next poll", stage.value, _describe(exc))

    def close(self) -> None:
        """Stop the listener thread and close its connection."""
        self._closing.set()
        self._thread.join(LISTEN_TURN_S + 5.0)  # it sees the flag within a turn

    # ----- the listener thread -----

    def _listen_forever(self) -> None:
        delay = RECONNECT_FIRST_S
        while not self._closing.is_set():
            try:
                self._listen()
                delay = RECONNECT_FIRST_S
            except Exception as exc:  # noqa: BLE001 - never end the node: reconnect, the poll covers meanwhile
                was_listening = self.listening.is_set()
                self.listening.clear()
                if self._closing.is_set():
                    break
                level = logging.WARNING if was_listening or delay >= RECONNECT_MAX_S else logging.INFO
                log.log(level, "wake-ups: not listening to PostgreSQL (%s); retrying in %.1f s, polling meanwhile",
                        _describe(exc), delay)
                self._closing.wait(delay)
                delay = min(2 * delay, RECONNECT_MAX_S)
        self.listening.clear()

    def _listen(self) -> None:
        """One connection's life: LISTEN on every channel, then hand notifications to the bells."""
        from node.queue.db import psycopg_connect

        with psycopg_connect(self._db.engine, autocommit=True) as connection:
            for channel in CHANNELS.values():
                connection.execute(f"LISTEN {channel}")
            super().ring_all()  # what was rung while not listening is not announced again
            self.listening.set()
            log.debug("wake-ups: listening on %s", ", ".join(CHANNELS.values()))
            stages = {channel: stage for stage, channel in CHANNELS.items()}
            while not self._closing.is_set():
                for notify in connection.notifies(timeout=LISTEN_TURN_S):
                    if notify.payload != self._token and notify.channel in stages:
                        super().ring(stages[notify.channel])


def _describe(exc: BaseException) -> str:
    """An exception in one line (the database's message, no traceback)."""
    from node.loop import describe

    return describe(exc)


def wakeups_for(db: Database) -> Wakeups:
    """The bells for a process on ``db``'s queue: across processes on PostgreSQL, in-process on SQLite."""
    return PostgresWakeups(db) if db.dialect == "postgresql" else Wakeups()
