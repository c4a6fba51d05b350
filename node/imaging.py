"""Reading a projection radiograph's pixels and geometry for inference.

Three questions are answered from a single-frame CR / DX / Secondary Capture
dataset:

* :func:`display_pixels`: what the image looks like on a correctly set-up
  display (Modality LUT, VOI LUT or window, MONOCHROME1 inversion);
* :func:`pixel_spacing_mm`: how large a pixel is, if the header says so
  reliably;
* :func:`patient_left_on_image_right`: whether the image is in the standard
  radiographic orientation (patient's left on the image's right).

Nothing here logs patient identifiers; errors name attributes, never values
that identify a patient.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

__all__ = [
    "MAX_ROWS_COLUMNS",
    "PixelSpacing",
    "UnreadablePixels",
    "display_pixels",
    "patient_left_on_image_right",
    "pixel_spacing_mm",
    "spacing_attribute_mm",
]

logger = logging.getLogger(__name__)

#: Exceptions that never mean "this input is bad", so are never turned into UnreadablePixels.
_NOT_INPUT_ERRORS = (MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit)

#: Larger Rows or Columns are refused before decoding. The largest chest detectors are about
#: 4,300 pixels a side; the limit keeps a forged header from making the worker allocate
#: gigabytes (8,192 x 8,192 as float64 is 512 MiB).
MAX_ROWS_COLUMNS = 8192

#: A table of display values replaces per-pixel arithmetic up to this many stored values (16 bits).
_MAX_TABLE_SIZE = 2**16

SpacingAttribute = Literal["ImagerPixelSpacing", "PixelSpacing"]

#: Pixel Spacing Calibration Type values that mean Pixel Spacing was
#: calibrated to the patient plane (PS3.3 C.7.6.1.1.1 / Basic Pixel Spacing
#: Calibration Macro).
_CALIBRATED_TYPES = frozenset({"GEOMETRY", "FIDUCIAL"})


class UnreadablePixels(ValueError):
    """The dataset's pixels cannot be turned into a 2-D image for inference.

    The message names the reason (missing attribute, undecodable or truncated
    Pixel Data, multi-frame object, unsupported photometric interpretation).
    """


@dataclass(frozen=True)
class PixelSpacing:
    """Physical size of one pixel, in millimetres.

    ``row_mm`` is the spacing between the centres of adjacent rows (the first
    value of the DICOM attribute), ``column_mm`` between adjacent columns (the
    second value). ``source`` names the attribute the values came from.
    """

    row_mm: float
    column_mm: float
    source: SpacingAttribute

    def __post_init__(self) -> None:
        for value in (self.row_mm, self.column_mm):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"pixel spacing must be finite and positive, got {value!r}")

    @property
    def pixel_area_mm2(self) -> float:
        """Area of one pixel in mm²."""
        return self.row_mm * self.column_mm


def display_pixels(ds: Dataset) -> np.ndarray:
    """Return the image as displayed: float32, shape (Rows, Columns), in [0, 1].

    Steps, in the order PS3.4 N.2 (grayscale pipeline) applies them:

    1. decode Pixel Data (native, or JPEG / JPEG-LS / JPEG 2000 / RLE through
       the pylibjpeg plugins and pyjpegls), any Bits Allocated / Bits Stored;
    2. Modality LUT Sequence or Rescale Slope / Intercept;
    3. VOI LUT Sequence or Window Center / Width (first item), when present
       and valid; an invalid window (e.g. width <= 0) is ignored;
    4. scaling to [0, 1] over the image's own minimum and maximum (a constant
       image becomes all zeros);
    5. inversion when Photometric Interpretation is MONOCHROME1 (or
       MONOCHROME2 with Presentation LUT Shape INVERSE), so that 1 is always
       bright, i.e. dense (bone), on the returned array.

    Multi-frame objects (Number of Frames > 1) are refused (a documented
    choice): a chest radiograph is one frame, and choosing a frame of a
    multi-frame object silently would risk analysing the wrong image; the
    worker discards them with this reason. Colour images (Samples per Pixel
    != 1) and Rows or Columns above :data:`MAX_ROWS_COLUMNS` are refused too.

    Raises:
        UnreadablePixels: the only exception for any input. Pixel Data, Rows or
            Columns missing, empty or malformed; multi-frame; not MONOCHROME1/2;
            too large; Pixel Data that cannot be decoded or is shorter than
            Rows x Columns x Bits Allocated says; values not finite.
        MemoryError: not caught (the job is retried, not discarded).
    """
    _check_pixel_attributes(ds)
    try:
        return _display(ds)
    except (UnreadablePixels, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a header value the LUT steps cannot use
        raise UnreadablePixels(f"pixels cannot be displayed: {type(exc).__name__}") from exc


def _display(ds: Dataset) -> np.ndarray:
    stored = _stored_pixels(ds)
    table = _stored_value_table(stored)
    if table is None:
        return _displayed(stored, ds)
    # Steps 2-5 map each stored value on its own: they are computed once per value the image can
    # hold and looked up for each pixel, the same numbers in a fraction of the time (a 12-bit
    # 2048 x 2048 image has 4 million pixels but at most 4,096 values).
    levels, offsets = table
    return np.take(_displayed(levels, ds, offsets), offsets)


def _stored_pixels(ds: Dataset) -> np.ndarray:
    """The decoded Pixel Data, (Rows, Columns)."""
    try:
        stored = ds.pixel_array
    except _NOT_INPUT_ERRORS:
        raise
    except BaseException as exc:  # noqa: BLE001 - decoders raise many types, see below
        # Native decoders are part of the input surface: pylibjpeg-rle (Rust) raises
        # pyo3_runtime.PanicException, a BaseException, on a corrupt RLE segment; left
        # uncaught it would end the worker thread instead of discarding the object.
        raise UnreadablePixels(
            f"Pixel Data cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise UnreadablePixels(
            f"decoded pixels have shape {stored.shape}, expected (Rows, Columns) = "
            f"({ds.Rows}, {ds.Columns})"
        )
    return stored


def _stored_value_table(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(every value from the image's lowest to its highest stored value, each pixel's offset in
    it); None when the pixels are not integers or span more than :data:`_MAX_TABLE_SIZE` values."""
    if stored.dtype.kind not in "iu":
        return None
    lowest, highest = stored.min(), stored.max()
    if int(highest) - int(lowest) >= _MAX_TABLE_SIZE:
        return None
    levels = np.arange(int(lowest), int(highest) + 1).astype(stored.dtype)
    # In native byte order; wraps around for signed pixels spanning more than half their type,
    # which the unsigned view undoes.
    offsets = np.subtract(stored, lowest, dtype=stored.dtype.type).view(f"u{stored.itemsize}")
    return levels, offsets


def _displayed(stored: np.ndarray, ds: Dataset, offsets: np.ndarray | None = None) -> np.ndarray:
    """Steps 2-5 of :func:`display_pixels` for ``stored`` values: the pixels, or with ``offsets``
    (which of them each pixel has) a table of values, the image's display range being its pixels'."""
    try:
        values = np.asarray(apply_modality_lut(stored, ds))
    except Exception as exc:
        raise UnreadablePixels(
            f"Modality LUT / Rescale cannot be applied: {type(exc).__name__}") from exc
    values = _apply_voi(values, ds).astype(np.float64, copy=False)

    low, high = _display_range(values, offsets)
    if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(high - low)):
        raise UnreadablePixels("pixel values are not finite after the Modality and VOI LUTs")
    if high > low:
        scaled = ((values - low) / (high - low)).astype(np.float32)
    else:
        scaled = np.zeros(values.shape, dtype=np.float32)
    if _is_inverted(ds):
        scaled = np.float32(1.0) - scaled
    return scaled


def _display_range(values: np.ndarray, offsets: np.ndarray | None) -> tuple[float, float]:
    """The lowest and highest of the pixels' values (``values`` of a table: see :func:`_displayed`)."""
    if offsets is not None:
        steps = np.diff(values)
        # A monotonic table's extremes are at its ends, the image's own lowest and highest
        # stored values; any other (a LUT that folds back, NaN) is looked up for every pixel.
        if not (np.all(steps >= 0) or np.all(steps <= 0)):
            values = np.take(values, offsets)
    return float(values.min()), float(values.max())


def pixel_spacing_mm(ds: Dataset) -> PixelSpacing | None:
    """Return the pixel spacing to use for measurements, or None.

    Rules (kept deliberately simple):

    1. Pixel Spacing, when Pixel Spacing Calibration Type is GEOMETRY or
       FIDUCIAL: it was calibrated to the patient plane, the best estimate;
    2. otherwise Imager Pixel Spacing (at the detector plane; areas computed
       with it include the geometric magnification, typically 5-15 % for PA);
    3. otherwise Pixel Spacing (many CR objects carry only this, meaning the
       detector spacing).

    A value is unusable, and the next rule is tried, when it is missing, does
    not have exactly two values, is not numeric, or is zero, negative or not
    finite (the NEMA RG1 CR carries ``0.000\\0.000``).
    """
    imager = spacing_attribute_mm(ds, "ImagerPixelSpacing")
    plane = spacing_attribute_mm(ds, "PixelSpacing")
    calibration = str(ds.get("PixelSpacingCalibrationType", "") or "").strip().upper()
    if plane is not None and calibration in _CALIBRATED_TYPES:
        return plane
    if imager is not None:
        return imager
    return plane


def patient_left_on_image_right(ds: Dataset) -> bool:
    """True if the patient's left is on the image's right (standard PA display).

    Patient Orientation's first value is the patient direction of increasing
    column index (left to right along a row). ``L`` means moving right on the
    image moves towards the patient's left: the standard display of a PA or
    AP chest radiograph. ``R`` means the image is flipped left-right.

    Returns True (the standard orientation) when Patient Orientation is
    absent, empty, unparseable, or its row direction has no left/right
    component (e.g. ``P`` on a lateral view).
    """
    try:
        orientation = ds.get("PatientOrientation")
        if orientation is None:
            return True
        values = [orientation] if isinstance(orientation, str) else list(orientation)
        row_direction = str(values[0]).strip().upper() if values else ""
    except Exception:  # malformed element: fall back to the standard orientation
        logger.debug("Patient Orientation unparseable; assuming standard orientation")
        return True
    has_left, has_right = "L" in row_direction, "R" in row_direction
    if has_right and not has_left:
        return False
    return True


def _check_pixel_attributes(ds: Dataset) -> None:
    try:
        _check_header(ds)
    except UnreadablePixels:
        raise
    except Exception as exc:  # a malformed element: name the problem, never a value
        raise UnreadablePixels(f"image header cannot be read: {type(exc).__name__}") from exc


def _check_header(ds: Dataset) -> None:
    for keyword in ("Rows", "Columns"):
        value = _single_int(ds, keyword)
        if value is None or value <= 0:
            raise UnreadablePixels(f"{keyword} is missing or zero")
        if value > MAX_ROWS_COLUMNS:
            raise UnreadablePixels(
                f"{keyword} {value} is larger than {MAX_ROWS_COLUMNS}: not a projection radiograph")
    if "PixelData" not in ds or not ds.PixelData:
        raise UnreadablePixels("Pixel Data is missing or empty")
    number_of_frames = _single_int(ds, "NumberOfFrames")
    if number_of_frames is not None and number_of_frames > 1:
        raise UnreadablePixels(
            f"multi-frame objects are not supported ({number_of_frames} frames): "
            "send a single-frame chest radiograph"
        )
    if (_single_int(ds, "SamplesPerPixel") or 1) != 1:
        raise UnreadablePixels("only grayscale images (Samples per Pixel = 1) are supported")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnreadablePixels(
            f"Photometric Interpretation {photometric[:16] or '(missing)'} is not supported; "
            "expected MONOCHROME1 or MONOCHROME2"
        )


def _single_int(ds: Dataset, keyword: str) -> int | None:
    """An integer attribute's value; None when absent or empty.

    Raises:
        UnreadablePixels: the value is not one integer (several values, text, a float).
    """
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (bytes, list, tuple)) or not float(value).is_integer():
            raise TypeError
        return int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnreadablePixels(f"{keyword} is not an integer") from exc


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    has_voi_lut = bool(ds.get("VOILUTSequence"))
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if not (has_voi_lut or has_window):
        return values
    if has_voi_lut and values.dtype.kind == "f":
        # a VOI LUT is indexed by integers; an identity rescale gives floats
        values = np.rint(values).astype(np.int64)
    try:
        return np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    except Exception as exc:  # invalid window or LUT: show without VOI
        logger.debug("VOI LUT / window ignored: %s", exc)
        return values


def _is_inverted(ds: Dataset) -> bool:
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric == "MONOCHROME1":
        return True
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return shape == "INVERSE"


def spacing_attribute_mm(ds: Dataset, keyword: SpacingAttribute) -> PixelSpacing | None:
    """Read one spacing attribute; None when missing, malformed, zero or negative."""
    try:
        raw = ds.get(keyword)
        if raw is None or raw == "":
            return None
        values = [float(v) for v in (raw if not isinstance(raw, (str, float, int)) else [raw])]
    except Exception:  # noqa: BLE001 - malformed (even undecodable) spacing is no spacing
        return None
    if len(values) != 2:
        return None
    try:
        return PixelSpacing(row_mm=values[0], column_mm=values[1], source=keyword)
    except ValueError:
        return None
