"""The archive as a folder: ``<data_dir>/archive`` by default, or any folder every host mounts.

A file appears under its key only after its bytes are on disk (write to ``tmp/``, fsync,
rename, fsync the folder). Folders are 0700 and files 0600: readable by the service user only.
``tmp/*.part`` files left by a crash, and the files of jobs past ``[retention]``, are deleted by
:mod:`node.retention`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node import faults
from node.archive import (
    Archive,
    Stored,
    check_key,
    check_prefix,
    fsync_dir,
    make_private_dirs,
)


class FolderArchive(Archive):
    """Objects as files under ``root``; ``data_dir`` is where the node's other files are (for
    the disk check, when the archive is elsewhere)."""

    def __init__(self, root: Path, *, data_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        for folder in ((data_dir,) if data_dir is not None else ()) + (self.root, self.tmp):
            make_private_dirs(Path(folder))

    def path(self, key: str) -> Path:
        """The file of ``key`` (which is checked: nothing outside the archive can be named)."""
        return self.root / check_key(key)

    def put(self, key: str, data: bytes | memoryview) -> int:
        return self.write_atomic(self.path(key), data, result=key.startswith("results/"))

    def write_atomic(self, path: Path, data: bytes | memoryview, *, result: bool = False) -> int:
        """Write ``data`` to ``path`` so that it is either complete or absent; returns its size."""
        make_private_dirs(path.parent)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if result:
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

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def size(self, key: str) -> int | None:
        path = self.path(key)
        try:
            stat = path.lstat()
        except OSError:
            return None
        return stat.st_size if path.is_file() and not path.is_symlink() else None

    def digest(self, key: str) -> bytes | None:
        try:
            with self.path(key).open("rb") as handle:
                return hashlib.file_digest(handle, "sha256").digest()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        """Remove the file, and its folder once empty (``results/<job>``, ``received/<study>``;
        a store into that folder at the same moment recreates it: :meth:`write_atomic`)."""
        path = self.path(key)
        path.unlink(missing_ok=True)
        if path.parent.parent in (self.root / "received", self.root / "results"):
            try:
                path.parent.rmdir()
            except OSError:
                pass

    def list(self, prefix: str) -> list[Stored]:
        folder = check_prefix(prefix).rpartition("/")[0]
        base = self.root / folder if folder else self.root
        found = []
        for path in self._files(base):
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                try:
                    found.append(Stored(key, path.lstat().st_size))
                except OSError:
                    continue
        return sorted(found, key=lambda item: item.key)

    @staticmethod
    def _files(base: Path) -> Iterator[Path]:
        for folder, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
            for name in files:
                path = Path(folder, name)
                if not path.is_symlink():
                    yield path

    @contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{key} is not in the archive")
        yield path

    def probe(self) -> str:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="readyz-", suffix=".probe")
        try:
            os.write(fd, b"cxrnode")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
        return f"writable ({self.tmp})"

    def describe(self) -> str:
        return f"folder {self.root}"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def stale_tmp(self, older_than_s: float) -> list[Stored]:
        limit = time.time() - older_than_s
        found = []
        for path in sorted(self.tmp.glob("*.part")):
            try:
                stat = path.lstat()
            except OSError:
                continue
            if path.is_file() and stat.st_mtime < limit:
                found.append(Stored(f"tmp/{path.name}", stat.st_size))
        return found
