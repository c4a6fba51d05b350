"""Logging for the entry points only (library code just uses ``getLogger(__name__)``).

Log lines carry UIDs, job ids and AE titles, never patient identifiers: no module logs a
patient's name, ID, birth date or accession number, and the tests scan the logs for them.
Libraries do quote header values in some messages (pydicom's "Unable to convert '<birth date>'
to 'DA' object", highdicom's person-name warning): every line, traceback and captured warning
passes through :func:`redact` before it is written, which also masks the password of any
``scheme://user:password@host`` URL (``[queue] url``) a message might quote.

The log folder is 0700 and every log file, rotated ones included, 0600.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
from pathlib import Path
from typing import IO, Any

from node.archive import make_private_dirs

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
REDACTED = "<value withheld>"

#: Library messages that quote a DICOM value (which may be a patient identifier).
_VALUE_QUOTING = (
    # pydicom.valuerep: "Invalid value for VR DA: '12/04/1936'."
    (re.compile(r"(Invalid value for VR \w{2}: )(['\"]).*?\2"), rf"\1{REDACTED}"),
    # pydicom.valuerep: "Unable to convert [non-conformant value ]'...' to 'DA' object"
    (re.compile(r"(Unable to convert (?:non-conformant value )?)'[^\n]*'( to '\w{2}' object)"),
     rf"\1{REDACTED}\2"),
    # highdicom.valuerep: 'The string "NAME" is unlikely to represent the intended person name'
    (re.compile(r"(The string )\"[^\n]*\"( is unlikely to represent)"), rf"\1{REDACTED}\2"),
    # a database URL's password ([queue] url), should a library quote the URL
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@"), r"\1***@"),
)


def redact(text: str) -> str:
    """``text`` with the values that library messages quote replaced by a placeholder."""
    for pattern, replacement in _VALUE_QUOTING:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats as usual (message, traceback, stack), then :func:`redact`\\ s the result."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose files (the current one and each new one after rollover) are 0600."""

    def _open(self) -> IO[Any]:
        stream = super()._open()
        os.chmod(self.baseFilename, 0o600)
        return stream


def configure(level: str, data_dir: Path | None = None) -> None:
    """Log to stderr and, when ``data_dir`` is given, to ``<data_dir>/logs/cxrnode.log`` (0600)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = RedactingFormatter(FORMAT)
    stream = logging.StreamHandler()
    stream.setFormatter(formatter)
    root.addHandler(stream)
    if data_dir is not None:
        folder = data_dir / "logs"
        make_private_dirs(folder)
        os.chmod(folder, 0o700)
        handler = PrivateRotatingFileHandler(folder / "cxrnode.log", maxBytes=20_000_000,
                                             backupCount=5)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.captureWarnings(True)  # warnings go through the handlers (and redact), not raw stderr
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
