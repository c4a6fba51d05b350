"""This installation's identity: a random id created once in the data folder, then only read.

``<data_dir>/installation.toml`` (0600) holds a random installation id (a UUID4, 32 hex
digits) and the host name at the time it was created. It is written atomically on the first
start that needs it (a temporary file, fsync, then a hard link to the final name, which fails
if another process created it first: both then use the winner's file), and never rewritten.
The defaults of the node's DICOM identity derive from it (:func:`node.results.device.device_for`):
the Device Serial Number (:attr:`Installation.serial_number`), the Station Name
(:attr:`Installation.station_name`) and the SR's Device Observer UID. So they are the same
after every restart, and differ between two installations.

Deleting the file gives the installation a new identity. A damaged file is an error, never
silently replaced: that would change the identity.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import tomllib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from node.archive import make_private_dirs
from node.errors import SettingsError

__all__ = ["FILE_NAME", "Installation", "load_or_create"]

FILE_NAME = "installation.toml"

_ID = re.compile(r"^[0-9a-f]{32}$")
_HOST_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_FALLBACK_HOST_NAME = "cxrnode"


@dataclass(frozen=True)
class Installation:
    """What ``installation.toml`` holds."""

    installation_id: str  # 32 lowercase hex digits
    host_name: str  # the host name when the file was created: letters, digits, ".", "_", "-"
    created: str = ""  # ISO 8601, UTC

    @property
    def serial_number(self) -> str:
        """The default Device Serial Number: the id's first 12 hex digits, upper case."""
        return self.installation_id[:12].upper()

    @property
    def station_name(self) -> str:
        """The default Station Name (SH, 16 characters): the host name's first label."""
        return self.host_name.split(".")[0][:16] or _FALLBACK_HOST_NAME


def load_or_create(data_dir: Path) -> Installation:
    """The installation of ``data_dir``, created on the first call for that folder.

    Raises:
        SettingsError: the file cannot be created (a read-only data folder, no permission) or
            read, or it is damaged; the message names ``node.data_dir`` and the file.
    """
    path = Path(data_dir) / FILE_NAME
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    try:
        _create(path)
    except OSError as exc:
        raise SettingsError(
            f"node.data_dir: cannot create this installation's identity file {path} "
            f"({exc.strerror or type(exc).__name__}); the data folder must be writable on the first start "
            "(the file is created once, then only read)") from None
    try:
        return _read(path)
    except FileNotFoundError:  # pragma: no cover - removed between creating and reading it
        raise SettingsError(f"node.data_dir: {path} disappeared right after it was created") from None


def _read(path: Path) -> Installation:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"node.data_dir: cannot read this installation's identity file {path} "
                            f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        values = {}
    installation_id, host_name = values.get("installation_id"), values.get("host_name")
    if not (isinstance(installation_id, str) and _ID.match(installation_id)
            and isinstance(host_name, str) and _HOST_NAME.match(host_name)):
        raise SettingsError(
            f"node.data_dir: this installation's identity file {path} is damaged (it needs installation_id, "
            "32 hex digits, and host_name); restore it from a backup, or delete it to give this installation "
            "a new identity (a new Device Observer UID and default serial number)")
    created = values.get("created", "")
    return Installation(installation_id, host_name, str(created))


def _host_name() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "", socket.gethostname())[:64].strip(".")
    return name or _FALLBACK_HOST_NAME


def _create(path: Path) -> None:
    """Write a new identity to ``path`` atomically, unless one is there already."""
    make_private_dirs(path.parent)
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    text = ("# This cxrnode installation's identity, created on its first start and never rewritten.\n"
            "# The results' default Device Serial Number, Station Name and Device Observer UID derive\n"
            "# from it. Deleting this file gives the installation a new identity.\n"
            f'installation_id = "{uuid.uuid4().hex}"\n'
            f'host_name = "{_host_name()}"\n'
            f'created = "{created}"\n')
    fd, tmp_name = tempfile.mkstemp(prefix=".installation-", suffix=".tmp", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp_name, path)  # atomic, and fails if another process was first
        except FileExistsError:
            return
        except OSError:  # a file system without hard links
            if path.exists():
                return
            os.replace(tmp_name, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
