"""Logging for the entry points only (library code just uses ``getLogger(__name__)``).

Log lines carry UIDs, job ids and AE titles, never patient identifiers: no module logs a
patient's name, ID, birth date or accession number, and the tests scan the logs for them.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure(level: str, data_dir: Path | None = None) -> None:
    """Log to stderr and, when ``data_dir`` is given, to ``<data_dir>/logs/cxrnode.log`` (0600)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(stream)
    if data_dir is not None:
        folder = data_dir / "logs"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        file = folder / "cxrnode.log"
        handler = logging.handlers.RotatingFileHandler(file, maxBytes=20_000_000, backupCount=5)
        os.chmod(file, 0o600)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
