"""Builders of valid chest radiograph DICOM objects for unit and end-to-end tests.

:func:`make_dx` and :func:`make_cr` turn a real Montgomery / Shenzhen PNG (or
any 2-D array, bright = dense) into a DX For Presentation or CR object that
``dciodvfy`` accepts with 0 errors. The header carries no real patient
identifiers (``CXRNODE^TEST`` / ``TEST-0001``).

:func:`nema_chest_cr_path` returns the NEMA WG-04 RG1 chest CR (JPEG 2000)
from the ``pydicom-data`` package, which ships its files inside the wheel, so
it works offline.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import subprocess
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = [
    "DATA_DIR",
    "FIXTURE_DIR",
    "dataset_bytes",
    "dcmtk_compress",
    "make_cr",
    "make_dx",
    "make_ct_slice",
    "new_instance",
    "make_multiframe",
    "make_secondary_capture_film",
    "make_text_report",
    "montgomery_case",
    "nema_chest_cr_path",
    "part10_bytes",
    "reference_lung_masks",
]

#: The shared data folder (Montgomery/Shenzhen PNGs and masks): ``../shared/data``
#: next to the checkout, or ``$CXRNODE_TEST_DATA``. Tests that need it skip without it.
DATA_DIR = Path(os.environ.get("CXRNODE_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

#: The repository's test fixtures (one Montgomery case and its mask).
FIXTURE_DIR = Path(__file__).resolve().parent / "data"

DEFAULT_SIZE = (2048, 2048)
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: View Code Sequence items (CID 4010) for View Position values.
_VIEW_CODES = {
    "PA": ("399348003", "SCT", "postero-anterior"),
    "AP": ("399182009", "SCT", "antero-posterior"),
    "LL": ("399198007", "SCT", "left lateral"),
    "RL": ("399352003", "SCT", "right lateral"),
}
Photometric = Literal["MONOCHROME1", "MONOCHROME2"]
SpacingAttribute = Literal["ImagerPixelSpacing", "PixelSpacing"]


def nema_chest_cr_path(lossless: bool = False) -> Path:
    """Path of the NEMA RG1 chest CR in JPEG 2000 from ``pydicom-data``.

    1955 x 1841, 15 bits stored, MONOCHROME1, Pixel Spacing ``0.000\\0.000``.
    ``lossless`` picks ``RG1_J2KR.dcm`` instead of ``RG1_J2KI.dcm``. The files
    are inside the installed wheel (package ``data_store``); nothing is
    downloaded.
    """
    from pydicom.data import get_testdata_file

    name = "RG1_J2KR.dcm" if lossless else "RG1_J2KI.dcm"
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} not found: install the test dependency 'pydicom-data'")
    return Path(path)


def montgomery_case(case_id: str = "MCUCXR_0017_0") -> tuple[Path, Path]:
    """Image and mask PNG paths of a Montgomery case.

    The repository's own fixture (``tests/data``, case ``MCUCXR_0017_0``) is
    used when it holds the case, so CI needs no shared data; other cases come
    from the shared data folder (:data:`DATA_DIR`).
    """
    image, mask = FIXTURE_DIR / f"{case_id}.png", FIXTURE_DIR / f"{case_id}_mask.png"
    if image.exists() and mask.exists():
        return image, mask
    base = DATA_DIR / "cxr" / "montgomery"
    return base / "images" / f"{case_id}.png", base / "masks" / f"{case_id}.png"


def reference_lung_masks(
    mask_png: str | Path | np.ndarray,
    size: tuple[int, int] | None = DEFAULT_SIZE,
    *,
    patient_left_on_image_right: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Split a merged reference lung mask into (patient_left, patient_right).

    The mask is resized (nearest neighbour) to ``size`` (rows, columns) and
    split at the middle column: in the standard orientation the patient's
    right lung is on the image's left half.
    """
    mask = _load_gray(mask_png, size, resample=Image.Resampling.NEAREST) > 127
    middle = mask.shape[1] // 2
    image_left, image_right = mask.copy(), mask.copy()
    image_left[:, middle:] = False
    image_right[:, :middle] = False
    if patient_left_on_image_right:
        return image_right, image_left
    return image_left, image_right


def make_dx(
    png_path_or_array: str | Path | np.ndarray,
    *,
    sop_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    photometric: Photometric = "MONOCHROME2",
    bits_stored: int = 12,
    pixel_spacing: tuple[float, float] | None = (0.175, 0.175),
    spacing_attribute: SpacingAttribute = "ImagerPixelSpacing",
    view_position: str = "PA",
    body_part: str = "CHEST",
    patient_orientation: tuple[str, str] = ("L", "F"),
    transfer_syntax: str = ExplicitVRLittleEndian,
    size: tuple[int, int] | None = DEFAULT_SIZE,
    window: bool = True,
) -> Dataset:
    """Build a Digital X-Ray Image For Presentation from a real chest image.

    The image (bright = dense) is resized to ``size`` (rows, columns; None
    keeps it) and mapped linearly onto ``bits_stored`` (8 to 16) bits; for
    MONOCHROME1 the stored values are inverted and Presentation LUT Shape is
    INVERSE. Rescale is identity, a window covering the value range is set
    when ``window`` is true. ``pixel_spacing`` goes into ``spacing_attribute``.
    Compressed ``transfer_syntax`` values are encoded with pydicom's encoders
    (RLE, JPEG-LS, JPEG 2000 lossless).

    ``pixel_spacing=None`` (or ``spacing_attribute="PixelSpacing"``) gives a
    DX *without* Imager Pixel Spacing, which the DX Detector module requires
    (Type 1): dciodvfy reports that one error. Such headers occur in practice;
    for a valid object without spacing use :func:`make_cr`.
    """
    ds = _projection_base(
        png_path_or_array,
        sop_class_uid=DigitalXRayImageStorageForPresentation,
        modality="DX",
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        photometric=photometric,
        bits_stored=bits_stored,
        pixel_spacing=pixel_spacing,
        spacing_attribute=spacing_attribute,
        view_position=view_position,
        body_part=body_part,
        patient_orientation=patient_orientation,
        size=size,
        window=window,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.ImageLaterality = "U"  # unpaired body part
    ds.DetectorType = "DIRECT"
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = Sequence()
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    view = _VIEW_CODES.get(view_position)
    ds.ViewCodeSequence = Sequence([_code(*view)] if view else [])
    return _encode(ds, transfer_syntax)


def copies_in_one_study(base: Dataset, count: int, study_instance_uid: str) -> list[Dataset]:
    """``count`` copies of ``base`` in one study, each its own series and SOP Instance UID (the
    load and multi-host tests: many radiographs, one set of pixels)."""
    out = []
    for _ in range(count):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_instance_uid, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def make_cr(
    png_path_or_array: str | Path | np.ndarray,
    *,
    sop_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    photometric: Photometric = "MONOCHROME2",
    bits_stored: int = 12,
    pixel_spacing: tuple[float, float] | None = (0.175, 0.175),
    spacing_attribute: SpacingAttribute = "ImagerPixelSpacing",
    view_position: str = "PA",
    body_part: str = "CHEST",
    patient_orientation: tuple[str, str] = ("L", "F"),
    transfer_syntax: str = ExplicitVRLittleEndian,
    size: tuple[int, int] | None = DEFAULT_SIZE,
    window: bool = True,
) -> Dataset:
    """Build a Computed Radiography Image; arguments as :func:`make_dx`."""
    ds = _projection_base(
        png_path_or_array,
        sop_class_uid=ComputedRadiographyImageStorage,
        modality="CR",
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        photometric=photometric,
        bits_stored=bits_stored,
        pixel_spacing=pixel_spacing,
        spacing_attribute=spacing_attribute,
        view_position=view_position,
        body_part=body_part,
        patient_orientation=patient_orientation,
        size=size,
        window=window,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return _encode(ds, transfer_syntax)


def _projection_base(
    image: str | Path | np.ndarray,
    *,
    sop_class_uid: str,
    modality: str,
    sop_instance_uid: str | None,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    photometric: Photometric,
    bits_stored: int,
    pixel_spacing: tuple[float, float] | None,
    spacing_attribute: SpacingAttribute,
    view_position: str,
    body_part: str,
    patient_orientation: tuple[str, str],
    size: tuple[int, int] | None,
    window: bool,
) -> Dataset:
    if not 8 <= bits_stored <= 16:
        raise ValueError("bits_stored must be 8 to 16")
    gray = _load_gray(image, size, resample=Image.Resampling.BILINEAR)
    bits_allocated = 8 if bits_stored <= 8 else 16
    top = (1 << bits_stored) - 1
    low, high = round(0.05 * top), round(0.90 * top)  # realistic: not the full range
    stored = (low + gray.astype(np.float64) / 255.0 * (high - low)).round()
    if photometric == "MONOCHROME1":
        stored = top - stored
        low, high = top - high, top - low
    stored_dtype = np.uint8 if bits_allocated == 8 else np.uint16
    pixels = stored.astype(stored_dtype)

    now = _dt.datetime.now()
    sop_instance_uid = sop_instance_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class_uid)
    ds.SOPInstanceUID = UID(sop_instance_uid)
    ds.PatientName = "CXRNODE^TEST"
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = UID(study_instance_uid or generate_uid())
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "CXRNODE TEST CHEST"
    ds.Modality = modality
    ds.SeriesInstanceUID = UID(series_instance_uid or generate_uid())
    ds.SeriesNumber = 1
    ds.Manufacturer = "cxrnode test factory"
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.PatientOrientation = list(patient_orientation)
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if pixel_spacing is not None:
        setattr(ds, spacing_attribute, [f"{v:.6g}" for v in pixel_spacing])

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter = f"{(low + high) / 2:g}"
        ds.WindowWidth = f"{high - low:g}"
    ds.PixelData = pixels.tobytes()
    return ds


def _encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax in _NATIVE:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    else:
        ds.compress(transfer_syntax)
    return ds


def _load_gray(
    image: str | Path | np.ndarray, size: tuple[int, int] | None, *, resample: Image.Resampling
) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 2:
            raise ValueError("image array must be 2-D")
        pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    else:
        pil = Image.open(image).convert("L")
    if size is not None and pil.size != (size[1], size[0]):
        pil = pil.resize((size[1], size[0]), resample=resample)
    return np.asarray(pil, dtype=np.uint8)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make_multiframe(ds: Dataset, frames: int = 2) -> Dataset:
    """A copy of a native single-frame object with ``frames`` identical frames.

    Number of Frames is added to a CR / DX header (which does not define it): such objects
    are sent by some modalities all the same.
    """
    if ds.file_meta.TransferSyntaxUID not in _NATIVE:
        raise ValueError("make_multiframe needs a native (uncompressed) dataset")
    multi = copy.deepcopy(ds)
    multi.NumberOfFrames = frames
    multi.PixelData = bytes(ds.PixelData) * frames
    return multi


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` encoded (without file meta) in its file meta's Transfer Syntax, as a C-STORE carries it."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
    write_dataset(buffer, ds)
    return buffer.getvalue()


def part10_bytes(file_meta: FileMetaDataset, dataset: bytes) -> bytes:
    """A DICOM file: preamble, ``DICM``, ``file_meta`` exactly as given, then ``dataset`` unchanged.

    Unlike ``Dataset.save_as`` nothing in the file meta is made consistent with the dataset,
    so a test can send a request whose UIDs differ from the dataset's, or mangled dataset bytes.
    """
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, file_meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue() + dataset


def dcmtk_compress(ds: Dataset, transfer_syntax: str, workdir: Path) -> Dataset:
    """``ds`` (native) compressed by dcmtk's ``dcmcjpeg``: JPEG baseline (8-bit images),
    extended (12-bit) or lossless (process 14 / SV1), which pydicom cannot encode."""
    from pydicom import dcmread

    from tests.servers import dcmtk

    options = {JPEGBaseline8Bit: "+eb", JPEGExtended12Bit: "+ee", JPEGLossless: "+el",
               JPEGLosslessSV1: "+e1"}
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax not in options:
        raise ValueError(f"dcmcjpeg does not make {transfer_syntax.name}")
    workdir.mkdir(parents=True, exist_ok=True)
    source, target = workdir / f"{ds.SOPInstanceUID}.in.dcm", workdir / f"{ds.SOPInstanceUID}.jpg.dcm"
    ds.save_as(source, enforce_file_format=True)
    subprocess.run([dcmtk("dcmcjpeg"), options[transfer_syntax], str(source), str(target)],
                   check=True, capture_output=True, timeout=120)
    compressed = dcmread(target)
    if compressed.file_meta.TransferSyntaxUID != transfer_syntax:
        raise RuntimeError(f"dcmcjpeg wrote {compressed.file_meta.TransferSyntaxUID}")
    return compressed


def make_secondary_capture_film(png_path_or_array: str | Path | np.ndarray, *,
                                size: tuple[int, int] | None = (1024, 1024),
                                study_instance_uid: str | None = None) -> Dataset:
    """A chest film as the NHS COVID-19 Chest Imaging Database keeps NIH ChestX-ray14:
    Secondary Capture, Modality DX, 8-bit, Conversion Type WSD, and no Body Part, View
    Position, Patient Orientation or pixel spacing."""
    ds = make_dx(png_path_or_array, size=size, bits_stored=8, pixel_spacing=None,
                 spacing_attribute="PixelSpacing", study_instance_uid=study_instance_uid)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    for keyword in ("BodyPartExamined", "ViewPosition", "PatientOrientation", "ImagerPixelSpacing",
                    "PixelSpacing", "DetectorType", "PositionerType", "PresentationIntentType",
                    "ImageLaterality", "ImageType", "Manufacturer"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ConversionType = "WSD"
    return ds


def _non_image_base(sop_class_uid: str, modality: str, study_instance_uid: str | None) -> Dataset:
    now = _dt.datetime.now()
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = UID(sop_class_uid), uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "CXRNODE^TEST", "TEST-0001", "", ""
    ds.StudyInstanceUID = UID(study_instance_uid or generate_uid())
    ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 2, 1
    ds.Manufacturer = "cxrnode test factory"
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    return ds


def make_ct_slice(study_instance_uid: str | None = None, size: int = 64) -> Dataset:
    """One axial CT slice (a water disc in air): what a mistaken routing rule sends by the hundred."""
    ds = _non_image_base(CTImageStorage, "CT", study_instance_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
    ds.KVP, ds.AcquisitionNumber = 120, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    ds.PixelData = np.where(disc, 1024, 0).astype(np.int16).tobytes()
    return ds


def make_text_report(study_instance_uid: str | None = None,
                     text: str = "Chest: no acute abnormality.") -> Dataset:
    """A Basic Text SR: the old report a "route the whole study" rule sends along."""
    ds = _non_image_base(BasicTextSRStorage, "SR", study_instance_uid)
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    finding.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    finding.TextValue = text
    ds.ContentSequence = Sequence([finding])
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.InstanceNumber = 1
    return ds


def new_instance(ds: Dataset, patient_id: str | None = None) -> Dataset:
    """A copy of ``ds`` as a new instance in a study and series of its own (new UIDs)."""
    copied = copy.deepcopy(ds)
    copied.StudyInstanceUID, copied.SeriesInstanceUID = generate_uid(), generate_uid()
    copied.SOPInstanceUID = copied.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if patient_id is not None:
        copied.PatientID = patient_id[:64]
    return copied
