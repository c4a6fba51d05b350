"""Job states and the transitions allowed between them.

::

    queued ──claim──▶ processing ──▶ encoded ──claim──▶ sending ──▶ done
      ▲                 │  │  │          ▲                │
      │   retry/reap    │  │  └▶ discarded (rules, unreadable)
      └─────────────────┘  └──▶ failed ◀──────────────────┘
                                  │ (admin retry)
                                  └──▶ queued | encoded

``processing`` and ``sending`` are the two leased states: a worker holds the job until its
lease expires; the reaper returns expired jobs to ``queued`` or ``encoded``.
"""

from __future__ import annotations

import enum

from node.errors import NodeError


class JobStatus(enum.StrEnum):
    QUEUED = "queued"          # received, waiting for a worker
    PROCESSING = "processing"  # claimed by a worker (leased): reading, inferring, encoding
    ENCODED = "encoded"        # SEG and SR written to the archive, waiting to be sent
    SENDING = "sending"        # claimed by a sender (leased)
    DONE = "done"              # results stored at every destination
    DISCARDED = "discarded"    # archived, not analysed: outside the acceptance rules or unreadable
    FAILED = "failed"          # dead letter: attempts used up; `cxrnode jobs retry` revives it


class FailStage(enum.StrEnum):
    INFERENCE = "inference"
    SEND = "send"


LEASED = frozenset({JobStatus.PROCESSING, JobStatus.SENDING})
TERMINAL = frozenset({JobStatus.DONE, JobStatus.DISCARDED, JobStatus.FAILED})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.PROCESSING}),
    JobStatus.PROCESSING: frozenset(
        {JobStatus.ENCODED, JobStatus.DISCARDED, JobStatus.QUEUED, JobStatus.FAILED}
    ),
    JobStatus.ENCODED: frozenset({JobStatus.SENDING}),
    JobStatus.SENDING: frozenset({JobStatus.DONE, JobStatus.ENCODED, JobStatus.FAILED}),
    JobStatus.DONE: frozenset(),
    JobStatus.DISCARDED: frozenset({JobStatus.QUEUED}),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.ENCODED}),
}


class InvalidTransition(NodeError):
    """A job was asked to move along an edge the state machine does not have."""


def check_transition(current: JobStatus | str, new: JobStatus | str) -> JobStatus:
    """Return ``new`` as a JobStatus if ``current -> new`` is allowed, else raise."""
    current, new = JobStatus(current), JobStatus(new)
    if new not in ALLOWED[current]:
        raise InvalidTransition(f"a job cannot go from {current} to {new}")
    return new
