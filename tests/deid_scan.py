"""Scan an export folder for patient and study identifiers: names, bytes, PNG chunks (decompressed too)."""

from __future__ import annotations

import zlib
from pathlib import Path

from pydicom.dataset import Dataset


def identifiers(ds: Dataset) -> list[str]:
    """The values of ``ds`` that must never leave the node in an export (names also in parts)."""
    values = [str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate), str(ds.AccessionNumber),
              str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
              str(ds.get("InstitutionName", "")), str(ds.get("ReferringPhysicianName", ""))]
    values += [part for value in (ds.PatientName, ds.get("ReferringPhysicianName", ""))
               for part in str(value).split("^")]
    birth = str(ds.PatientBirthDate)
    if len(birth) == 8:
        values.append(f"{birth[:4]}-{birth[4:6]}-{birth[6:]}")
    return [v for v in values if len(v) >= 3]


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk of a PNG file."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        chunks.append((data[at + 4:at + 8], data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def assert_no_identifiers(folder: Path, values: list[str]) -> int:
    """Fail if any of ``values`` (case-insensitive) is in the path or bytes of a file under ``folder``;
    PNGs may hold only IHDR, IDAT and IEND chunks, and their decompressed pixels are scanned too.
    Returns how many files were checked."""
    checked = 0
    needles = [v.lower().encode() for v in values if len(v) >= 3]
    assert needles
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder)).lower().encode()
        assert not [n for n in needles if n in relative], path
        if not path.is_file():
            continue
        blobs = [path.read_bytes()]
        if path.suffix == ".png":
            chunks = png_chunks(blobs[0])
            assert {name for name, _ in chunks} == {b"IHDR", b"IDAT", b"IEND"}, (path, [n for n, _ in chunks])
            blobs.append(zlib.decompress(b"".join(body for name, body in chunks if name == b"IDAT")))
        for blob in blobs:
            lowered = blob.lower()
            leaked = [n.decode() for n in needles if n in lowered]
            assert not leaked, f"{path.relative_to(folder)} holds {leaked}"
        checked += 1
    return checked
