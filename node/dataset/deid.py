"""De-identification of a training-set export: pseudonyms, splits by patient, the header kept.

What leaves the node in an export folder, and why nothing in it identifies a patient:

* **Pixels only in the PNGs.** Images are written by Pillow without text chunks (no ``tEXt``,
  ``iTXt``, ``zTXt``, ``eXIf``); a radiograph whose Burned In Annotation is ``YES`` is not exported
  at all (the profile's Clean Pixel Data Option is not implemented, so text burned into pixels is
  never cleaned, only refused). Radiographs carry side markers ("R", "L", "PA") as the shared data do.
* **Pseudonymous case ids.** ``case_id`` is a keyed hash (HMAC-SHA-256) of the SOP Instance UID with
  this installation's secret :data:`KEY_FILE` (``<data_dir>/dataset-key``, 32 random bytes, 0600,
  created once): the same image gets the same id in every export of this node (duplicates can be
  found), and without the key no one can compute it from a UID. File names are ``<case_id>.png``.
* **Splits by patient.** A patient's images all fall into one split: the split is drawn from a keyed
  hash of Issuer of Patient ID + Patient ID (the Study Instance UID when there is no Patient ID: then
  each study counts as a patient of its own), so it is reproducible across exports and reveals nothing.
* **The header: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile**, applied by
  ``dicom-anonymizer`` (see below) to the few attributes worth keeping (:data:`KEPT_ATTRIBUTES`:
  modality, view, body part, manufacturer and model, photometric interpretation, bits stored, rows,
  columns, pixel spacing, patient orientation; plus Patient's Sex and Age as candidates). An attribute
  is written to ``headers/<case_id>.json`` only if the profile leaves it unchanged: without any
  profile option (no Retain Patient Characteristics Option) Patient's Sex is emptied (Z) and Patient's
  Age removed (X), so neither is ever written. No UID, date, name, ID or free text is in the list.
* **The re-identification map** (case id to SOP Instance UID, study, job) is kept, if at all
  (``[dataset] keep_reid_map``), only at ``<data_dir>/exports/<export-id>.reid.csv`` (0600 in a
  0700 folder), never in the export folder.
* **A last check:** every text file the export writes (``index.csv``, the header JSONs,
  ``export.json``) is refused (:class:`IdentifierLeak`) if it contains any identifier of the cases
  it describes (:func:`identifiers_of`).

Library choice. ``dicom-anonymizer`` (KitwareMedical/dicom-anonymizer, BSD, depends only on pydicom
and tqdm) holds PS3.15 Annex E Table E.1-1 as data, one tag list per action code of the basic
profile (D, Z, X, U and the combined X/Z, X/D, X/Z/D, X/Z/U*) for each edition it was generated from
(2023, 2024b, 2026c; :data:`PROFILE_TABLES` picks the newest), and applies it to a pydicom dataset
(:func:`dicomanonymizer.simpledicomanonymizer.anonymize_dataset`, private tags removed). Kitware fixes
its bugs but plans no new features; the table is what we need from it. Also checked on the package
index: ``dicognito`` 0.19 (well kept, but it replaces names, IDs, dates and UIDs with plausible fakes
from a list of its own, not the Annex E table) and ``deid`` 0.4.13 (pydicom/deid: recipe-driven; its
default recipe is a site's own list, not Annex E, and it pulls in matplotlib). pydicom has no profile.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from node.archive import make_private_dirs
from node.errors import NodeError
from node.settings import DATASET_SPLITS

__all__ = [
    "DEIDENTIFICATION_METHOD",
    "KEPT_ATTRIBUTES",
    "KEY_FILE",
    "PROFILE_TABLES",
    "IdentifierLeak",
    "case_id",
    "check_clean",
    "identifiers_of",
    "kept_header",
    "load_or_create_key",
    "patient_key",
    "split_of",
]

#: The secret of this installation's exports, in the data folder (0600).
KEY_FILE = "dataset-key"
_KEY_BYTES = 32

#: The edition of PS3.15 Annex E Table E.1-1 that dicom-anonymizer applies.
PROFILE_TABLES = "dicomfields_2026c"
DEIDENTIFICATION_METHOD = ("DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile "
                           f"(dicom-anonymizer, {PROFILE_TABLES}); attributes kept only if left unchanged")
#: DCM 113100 "Basic Application Confidentiality Profile" (CID 7050), as De-identification Method Code Sequence.
PROFILE_CODE = {"CodeValue": "113100", "CodingSchemeDesignator": "DCM",
                "CodeMeaning": "Basic Application Confidentiality Profile"}

#: Header attributes an export may keep, if the basic profile leaves them unchanged (see the module doc).
KEPT_ATTRIBUTES: tuple[str, ...] = (
    "Modality", "ViewPosition", "BodyPartExamined", "Manufacturer", "ManufacturerModelName",
    "PhotometricInterpretation", "BitsStored", "Rows", "Columns", "ImagerPixelSpacing", "PixelSpacing",
    "PatientOrientation", "PatientSex", "PatientAge",
)

#: Attributes whose values identify a patient or a study; checked against every text file written.
IDENTIFYING_ATTRIBUTES: tuple[str, ...] = (
    "PatientName", "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber", "StudyID",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "MedicalRecordLocator",
)


class IdentifierLeak(NodeError):
    """A file the export was about to write holds an identifier of a case; nothing was written."""


# ----- the key -----

def load_or_create_key(data_dir: Path) -> bytes:
    """This installation's export key, ``<data_dir>/dataset-key`` (created once, 0600, first creator wins).

    Raises:
        NodeError: the file cannot be created or read, or is damaged (it must hold 64 hex digits).
    """
    path = Path(data_dir) / KEY_FILE
    if not path.exists():
        try:
            _create_key(path)
        except OSError as exc:
            raise NodeError(f"cannot create the export key {path} ({exc.strerror or type(exc).__name__})") from None
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError):
        raise NodeError(f"the export key {path} cannot be read or is damaged (64 hex digits expected); restore it "
                        "from a backup: a new key gives every image a new case id and every patient a new split") from None
    if len(key) != _KEY_BYTES:
        raise NodeError(f"the export key {path} is damaged (64 hex digits expected)")
    return key


def _create_key(path: Path) -> None:
    make_private_dirs(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=".dataset-key-", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(_KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp_name, path)  # atomic, fails if another process was first
        except FileExistsError:
            return
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _keyed(key: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(key, purpose.encode() + b"\0" + value.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


# ----- pseudonyms and splits -----

def case_id(key: bytes, sop_instance_uid: str) -> str:
    """The pseudonymous id of an image: ``c`` + 20 hex digits of HMAC-SHA-256(key, SOP Instance UID)."""
    return "c" + _keyed(key, "case", str(sop_instance_uid)).hex()[:20]


def patient_key(ds: Dataset) -> str:
    """What identifies the patient for the split: Issuer of Patient ID + Patient ID; the Study Instance
    UID when there is no Patient ID (each such study then counts as a patient of its own)."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        return "study:" + str(ds.get("StudyInstanceUID", "") or "")
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    return f"patient:{issuer}\\{patient_id}"


def split_of(key: bytes, patient: str, fractions: Sequence[float]) -> str:
    """The split (:data:`node.settings.DATASET_SPLITS`) of ``patient``: a keyed hash mapped to [0, 1),
    compared with the cumulative ``fractions``. The same key and patient always give the same split."""
    u = int.from_bytes(_keyed(key, "split", patient)[:8], "big") / 2**64
    total = 0.0
    for name, share in zip(DATASET_SPLITS, fractions, strict=True):
        total += share
        if u < total:
            return name
    return next(n for n, s in zip(reversed(DATASET_SPLITS), reversed(tuple(fractions)), strict=True) if s > 0)


# ----- the header -----

def kept_header(ds: Dataset) -> dict[str, Any]:
    """The attributes of :data:`KEPT_ATTRIBUTES` that the PS3.15 basic profile (dicom-anonymizer,
    :data:`PROFILE_TABLES`) leaves unchanged, as JSON values, plus the de-identification attributes."""
    from dicomanonymizer import simpledicomanonymizer as profile

    subset = Dataset()
    for keyword in KEPT_ATTRIBUTES:
        try:
            element = ds.data_element(keyword)
        except Exception:  # noqa: BLE001 - an undecodable element is not kept
            element = None
        if element is not None and not element.is_empty:
            subset[element.tag] = copy.deepcopy(element)
    original = {element.keyword: _json_value(element.value) for element in subset}
    try:
        profile.anonymize_dataset(subset, None, True, lambda: profile.initialize_actions(PROFILE_TABLES))
    finally:
        profile.dictionary.clear()  # its UID map is module-global; nothing of this image stays in memory
    kept = {}
    for element in subset:
        value = _json_value(element.value)
        if not element.is_empty and original.get(element.keyword) == value:
            kept[element.keyword] = value
    return kept | {
        "PatientIdentityRemoved": "YES",
        "DeidentificationMethod": DEIDENTIFICATION_METHOD,
        "DeidentificationMethodCodeSequence": [dict(PROFILE_CODE)],
    }


def _json_value(value: Any) -> Any:
    if isinstance(value, (MultiValue, list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


# ----- the last check -----

def identifiers_of(ds: Dataset, min_length: int = 6) -> list[str]:
    """The identifying values of ``ds`` (:data:`IDENTIFYING_ATTRIBUTES`, names also as their parts
    joined by spaces) of at least ``min_length`` characters. Shorter values are not checked: a
    3-digit ID would match the hex digits of some case id by chance and stop an export for nothing
    (nothing writes a header value other than those :func:`kept_header` returns anyway)."""
    found: set[str] = set()
    for keyword in IDENTIFYING_ATTRIBUTES:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - undecodable: nothing to compare with
            value = None
        for item in (value if isinstance(value, (MultiValue, list, tuple)) else [value]):
            if item is None:
                continue
            text = str(item).strip()
            if isinstance(item, PersonName):
                parts = [p for p in text.replace("=", "^").split("^") if p.strip()]
                if len(parts) > 1 and len(" ".join(parts)) >= min_length:
                    found.add(" ".join(parts))
            if len(text) >= min_length:
                found.add(text)
    return sorted(found)


def check_clean(data: bytes | str, identifiers: Iterable[str], what: str) -> None:
    """Raise :class:`IdentifierLeak` (naming ``what``, never the value) if ``data`` contains an identifier."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    for identifier in identifiers:
        if identifier and identifier.encode("utf-8", "replace") in blob:
            raise IdentifierLeak(f"{what} would contain a patient or study identifier; nothing was written")
