"""The archive: received objects and results, kept by key, behind one small interface.

Keys are relative to the archive, the same on every host (the queue stores them, never host
paths)::

    received/<study>/<sop>.dcm       an object as received (bytes untouched)
    received/<study>/<sop>.v2.dcm    a later object with the same SOP Instance UID but different
                                     bytes (v3, v4, ...: see :meth:`Archive.keep_version`)
    results/<job>/<kind>.dcm         a result made for a job (seg, sr, sc)
    tmp/...                          partial writes of a folder archive; never read

Two backends, chosen by ``[archive] url`` (:func:`open_archive`):

- :class:`node.archive.folder.FolderArchive`: a folder (default ``<data_dir>/archive``; any
  absolute path, e.g. shared over NFS or a Kubernetes volume). A file appears under its key only
  after its bytes are on disk (write to ``tmp/``, fsync, rename, fsync the folder); folders 0700,
  files 0600.
- :class:`node.archive.s3.S3Archive`: an S3-compatible object store (``s3://bucket/prefix``,
  through boto3). An object exists only once its PUT has returned.

Either way :meth:`Archive.put` returns only when the object is durable, so the listener answers
a C-STORE only after that. Failures of the store are :class:`ArchiveError` (an ``OSError``), so
the listener answers 0xA700 and the worker and sender retry, as for a full disk.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.settings import Settings

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: What a key may look like: one of the archive's top folders, then safe path components.
_KEY = re.compile(r"^(received|results|tmp)(/[0-9A-Za-z_-][0-9A-Za-z._-]*)+$")


class UnsafeUID(ValueError):
    """A UID that is not a valid DICOM UID (and so cannot name a file)."""


class UnsafeKey(ValueError):
    """A key that is not one the archive makes (absolute, ``..``, another top folder)."""


class ArchiveError(OSError):
    """The archive could not store or read an object (an object store that fails or cannot be
    reached). An ``OSError``, like a full disk: C-STOREs are answered 0xA700, jobs retried."""


def check_uid(uid: str) -> str:
    if not (0 < len(uid) <= 64 and _UID.match(uid)):
        raise UnsafeUID(f"{uid[:80]!r} is not a valid DICOM UID")
    return uid


def check_key(key: str) -> str:
    """``key`` if it is an archive key (see the module docstring), else raise :class:`UnsafeKey`."""
    if not _KEY.match(key) or "/../" in f"/{key}/" or "//" in key:
        raise UnsafeKey(f"{key[:120]!r} is not an archive key")
    return key


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can start an archive key (``""``, ``received/``, ``results/7/``,
    ``received/<study>/<sop>.v``), else raise :class:`UnsafeKey`."""
    if prefix:
        check_key(prefix + "x")
    return prefix


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


@dataclass(frozen=True)
class Stored:
    """An object in the archive: its key and size in bytes."""

    key: str
    size: int

    @property
    def name(self) -> str:
        """The key's last component (``<sop>.v2.dcm``), for messages."""
        return key_name(self.key)


def key_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


class Archive(ABC):
    """Objects by key; see the module docstring. Implementations are safe to share between threads."""

    # ----- the layout -----
    @staticmethod
    def received_key(study_instance_uid: str, sop_instance_uid: str) -> str:
        return f"received/{check_uid(study_instance_uid)}/{check_uid(sop_instance_uid)}.dcm"

    @staticmethod
    def results_prefix(job_id: int) -> str:
        return f"results/{int(job_id)}/"

    @classmethod
    def result_key(cls, job_id: int, kind: str) -> str:
        return check_key(f"{cls.results_prefix(job_id)}{kind}.dcm")

    # ----- what each backend provides -----
    @abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> int:
        """Store ``data`` under ``key``, durably, whole or not at all; returns its size."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The object's bytes; ``FileNotFoundError`` when there is none."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size, None when there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (nothing when there is none)."""

    @abstractmethod
    def list(self, prefix: str) -> list[Stored]:
        """The objects whose keys start with ``prefix`` (any depth), sorted by key."""

    @abstractmethod
    def local_file(self, key: str) -> AbstractContextManager[Path]:
        """A local file holding the object while the context lasts (the file itself for a
        folder, a private temporary copy for an object store); ``FileNotFoundError`` when there is none."""

    @abstractmethod
    def probe(self) -> str:
        """Write and remove a small object (readiness); returns a description, raises when it fails."""

    @abstractmethod
    def describe(self) -> str:
        """Where the archive is, for logs and ``status`` (never a secret)."""

    # ----- shared behaviour -----
    @contextmanager
    def local_files(self, keys: Iterable[str]) -> Iterator[list[Path]]:
        """:meth:`local_file` of each key, for as long as the context lasts."""
        with ExitStack() as stack:
            yield [stack.enter_context(self.local_file(key)) for key in keys]

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def free_bytes(self) -> int | None:
        """Free space left for the archive, None when it has no local limit (an object store)."""
        return None

    def stale_tmp(self, older_than_s: float) -> list[Stored]:
        """Partial writes a crash left (``tmp/*.part``), older than ``older_than_s``."""
        return []

    def total_bytes(self) -> int:
        """Bytes of every object in the archive."""
        return sum(item.size for item in self.list(""))

    def digest(self, key: str) -> bytes | None:
        """SHA-256 of the object's bytes, None when there is none."""
        try:
            return hashlib.sha256(self.read(key)).digest()
        except FileNotFoundError:
            return None

    def keep_version(self, first: str, data: bytes | memoryview, first_size: int | None = None) -> str | None:
        """Keep ``data``, received again under the SOP Instance UID archived at key ``first``.

        Returns None when ``data`` is byte-identical (SHA-256) to ``first``. Otherwise returns
        the key of the version holding it, next to ``first``: an existing ``<sop>.v<N>.dcm`` with
        the same bytes, else the next free N (from 2), stored with :meth:`put`. A missing
        ``first`` (never expected) counts as different, so nothing received is ever dropped.
        ``first_size`` (the queue's record of it), when it differs from ``len(data)``, spares
        reading and hashing ``first``.
        """
        check_key(first)
        digest = hashlib.sha256(data).digest()
        if (first_size is None or first_size == len(data)) and self.digest(first) == digest:
            return None
        stem = first.removesuffix(".dcm")
        number = 2
        while (size := self.size(candidate := f"{stem}.v{number}.dcm")) is not None:
            if size == len(data) and self.digest(candidate) == digest:
                return candidate
            number += 1
        self.put(candidate, data)
        return candidate

    def versions(self, first: str) -> Iterator[Stored]:
        """The ``<sop>.v<N>.dcm`` versions kept next to key ``first``."""
        stem = first.removesuffix(".dcm")
        for item in self.list(f"{stem}.v"):
            if item.key.endswith(".dcm") and "/" not in item.key[len(stem):]:
                yield item


def open_archive(settings: Settings) -> Archive:
    """The archive ``[archive] url`` names (see :class:`node.settings.ArchiveSettings`)."""
    cfg = settings.archive
    if cfg.is_s3:
        from node.archive.s3 import S3Archive

        return S3Archive.for_settings(settings)
    from node.archive.folder import FolderArchive

    return FolderArchive(cfg.folder(settings.data_path), data_dir=settings.data_path)


__all__ = ["Archive", "ArchiveError", "Stored", "UnsafeKey", "UnsafeUID", "check_key", "check_prefix", "check_uid",
           "fsync_dir", "key_name", "make_private_dirs", "open_archive"]
