"""Named fault-injection points, for the crash-safety tests (the mercure way).

``CXRNODE_FAULT_PAUSE="infer=5,send=5"`` makes the node sleep at those points so that a test can
kill it there with SIGKILL. Unset (always, in production) it does nothing.

Points:
    infer  after a job is claimed, before its image is analysed
    send   after the first result is stored at a destination, before the second
"""

from __future__ import annotations

import logging
import os
import time

ENV = "CXRNODE_FAULT_PAUSE"
POINTS = frozenset({"infer", "send"})

log = logging.getLogger(__name__)


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
