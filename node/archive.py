"""The on-disk archive: received objects and results, written atomically.

Layout under ``data_dir``::

    archive/tmp/                         partial writes; never read
    archive/received/<study>/<sop>.dcm   objects as received (bytes untouched)
    archive/received/<study>/<sop>.v2.dcm  a later object with the same SOP Instance UID but
                                         different bytes (v3, v4, ...: see :meth:`Archive.keep_version`)
    archive/results/<job>/seg.dcm        the Segmentation made for a job
    archive/results/<job>/sr.dcm         the Structured Report made for a job

A file appears under its final name only after its bytes are on disk (write to ``tmp/``,
fsync, rename, fsync the folder). Folders are 0700 and files 0600: readable by the service
user only. ``tmp/*.part`` files left by a crash, and the files of jobs past ``[retention]``, are
deleted by :mod:`node.retention`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from node import faults

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class UnsafeUID(ValueError):
    """A UID that is not a valid DICOM UID (and so cannot name a file)."""


def check_uid(uid: str) -> str:
    if not (0 < len(uid) <= 64 and _UID.match(uid)):
        raise UnsafeUID(f"{uid[:80]!r} is not a valid DICOM UID")
    return uid


def _sha256(path: Path) -> bytes | None:
    """SHA-256 of a file's bytes, None if it does not exist."""
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").digest()
    except FileNotFoundError:
        return None


def make_private_dirs(folder: Path) -> None:
    """``mkdir -p`` where every folder it creates is 0700, whatever the process umask."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for item in reversed(missing):
        item.mkdir(mode=0o700, exist_ok=True)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` durable (a rename or a new file in it survives power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archive:
    """Paths and atomic writes under ``<data_dir>/archive``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "archive"
        self.tmp = self.root / "tmp"
        self.results_root = self.root / "results"
        for folder in (data_dir, self.root, self.tmp):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def received_path(self, study_instance_uid: str, sop_instance_uid: str) -> Path:
        return self.root / "received" / check_uid(study_instance_uid) / f"{check_uid(sop_instance_uid)}.dcm"

    def keep_version(self, first: Path, data: bytes, first_size: int | None = None) -> Path | None:
        """Keep ``data``, received again under the SOP Instance UID archived at ``first``.

        Returns None when ``data`` is byte-identical (SHA-256) to ``first``. Otherwise returns
        the version file holding it, next to ``first``: an existing ``<sop>.v<N>.dcm`` with the
        same bytes, else the next free N (from 2), written atomically. A missing ``first``
        (never expected) counts as different, so nothing received is ever dropped.
        ``first_size`` (the queue's record of it), when it differs from ``len(data)``, spares
        reading and hashing ``first``.
        """
        digest = hashlib.sha256(data).digest()
        if (first_size is None or first_size == len(data)) and _sha256(first) == digest:
            return None
        stem = first.name.removesuffix(".dcm")
        number = 2
        while (candidate := first.with_name(f"{stem}.v{number}.dcm")).exists():
            if _sha256(candidate) == digest:
                return candidate
            number += 1
        self.write_atomic(candidate, data)
        return candidate

    def results_dir(self, job_id: int) -> Path:
        return self.results_root / str(int(job_id))

    def write_atomic(self, path: Path, data: bytes | memoryview) -> int:
        """Write ``data`` to ``path`` so that it is either complete or absent; returns its size."""
        make_private_dirs(path.parent)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if self.results_root in path.parents:
                    faults.fire("result-write")  # tests: a full disk (ENOSPC) while results are written
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_name, 0o600)
            try:
                os.replace(tmp_name, path)
            except FileNotFoundError:  # the retention purge removed the emptied folder meanwhile
                make_private_dirs(path.parent)
                os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        return len(data)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
