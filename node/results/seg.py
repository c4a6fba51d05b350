"""DICOM Segmentation of the patient's left and right lung (highdicom).

Segments (fixed numbering, one frame each, frame number = segment number):

====  ==========  =====================================================
 #    label       coding
====  ==========  =====================================================
 1    Left lung   category SCT 91723000 Anatomical Structure,
                  type SCT 39607008 Lung, modifier SCT 7771000 Left
 2    Right lung  same, modifier SCT 24028007 Right
====  ==========  =====================================================

Laterality is a Segmented Property Type Modifier (CID 244) on the generic
"Lung" type rather than the pre-coordinated SCT 44029006 "Left lung" /
3341006 "Right lung": the SR uses the same Lung + laterality pair as its
finding site, so SEG and SR speak the same vocabulary.

"Left" and "right" are always the patient's. An empty mask for one or both
lungs still gives a valid SEG: empty frames are kept (``omit_empty_frames``
is off), so the segment's frame exists and the SR can reference it; its area
is then 0 mm². Whether an empty lung is plausible is the caller's decision.

Geometry for viewers (docs/VIEWERS.md): a radiograph has no Frame of Reference,
but OHIF v3 reads the SEG's Shared Functional Groups unguarded, so every SEG
carries

* Pixel Measures: Pixel Spacing = the spacing the SR measures with
  (:func:`node.imaging.pixel_spacing_mm`: calibrated Pixel Spacing, else
  Imager Pixel Spacing at the detector, which includes the geometric
  magnification, else Pixel Spacing) and a nominal Slice Thickness of 1 mm
  (a projection has none). Without any usable spacing the value is a nominal
  1 mm and Image Comments says so: the SEG is for display, not for measuring.
* Plane Orientation: the source's Image Orientation (Patient) when it has a
  valid one, else exactly ``1\\0\\0\\0\\1\\0``, the value viewers assume for
  projection images without one. It is a display convention, not the patient's
  orientation, and it must never be derived from Patient Orientation: viewers
  reject ``1\\0\\0\\0\\0\\-1`` and *mirror* the mask for ``-1\\0\\0\\0\\1\\0``.

No Plane Position and no Frame of Reference are written: the SEG claims no
position in patient space, only pixels of the referenced image.

Frames are BINARY (1 bit) unless the bit-packed Pixel Data would have an odd
byte length (e.g. 1955 x 1841): then FRACTIONAL with values 0 and 255, because
dcmjs (OHIF) refuses the pad byte of an odd-length packed frame and Orthanc
1.10's per-frame DICOMweb endpoint answers HTTP 400 for 1-bit frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .algorithm import Algorithm
from .device import DEFAULT_DEVICE, NodeDevice
from .source import encoding_source, no_identifier_warnings
from .uids import derive_uid, result_uids

__all__ = [
    "DISPLAY_ORIENTATION",
    "LUNG_SEGMENTS",
    "NOMINAL_SPACING_COMMENT",
    "SEG_CONTENT_LABEL",
    "SEG_SERIES_DESCRIPTION",
    "LungSegment",
    "build_segmentation",
    "segmentation_type_for",
]

SEG_CONTENT_LABEL = "LUNG_SEG"
SEG_SERIES_DESCRIPTION = "LUNG SEG (AI, not for clinical use)"
DEFAULT_SEG_SERIES_NUMBER = 9901

#: Plane orientation for sources without Image Orientation (Patient): what viewers assume.
DISPLAY_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
NOMINAL_SLICE_THICKNESS_MM = 1.0
NOMINAL_SPACING_COMMENT = ("Pixel Measures are nominal (1 mm): the source image has no usable pixel spacing. "
                           "For display only; do not measure with this segmentation.")


@dataclass(frozen=True)
class LungSegment:
    """Number, label, laterality and display colour of one lung segment."""

    segment_number: int
    side: str  # "left" or "right": the patient's, as in measure.LUNG_SIDES
    segment_label: str
    laterality: Code
    display_color: tuple[float, float, float]  # CIELab


LUNG_SEGMENTS: tuple[LungSegment, ...] = (
    LungSegment(1, "left", "Left lung", codes.SCT.Left, (80.0, -60.0, 50.0)),
    LungSegment(2, "right", "Right lung", codes.SCT.Right, (60.0, 20.0, -70.0)),
)


def build_segmentation(
    source: Dataset,
    patient_left: np.ndarray,
    patient_right: np.ndarray,
    algorithm: Algorithm,
    *,
    series_number: int = DEFAULT_SEG_SERIES_NUMBER,
    device: NodeDevice = DEFAULT_DEVICE,
) -> hd.seg.Segmentation:
    """Encode the lung masks of ``source`` as a binary DICOM Segmentation.

    ``patient_left`` / ``patient_right`` are 2-D boolean (or 0/1) masks in
    the source's geometry, shape (Rows, Columns). The SEG carries the source's
    patient and study attributes (it files into the same study), its Patient
    Orientation, the algorithm identification, ``device``'s identity (General
    Equipment), and UIDs derived with :func:`node.results.uids.result_uids` from
    the source SOP Instance UID and the algorithm (under ``device.uid_root``), so
    encoding again gives the same UIDs.

    Type 2 patient/study attributes missing from the source are written
    empty, and an unusable Pixel Spacing is not copied
    (:func:`node.results.source.encoding_source`).

    Raises:
        ValueError: a mask has the wrong shape or values, or the masks overlap,
            or the source lacks a UID; highdicom's own validation errors
            propagate unchanged.
    """
    source = encoding_source(source)
    shape = (int(source.Rows), int(source.Columns))
    masks = [_as_binary(patient_left, shape, "patient_left"), _as_binary(patient_right, shape, "patient_right")]
    if np.logical_and(masks[0], masks[1]).any():
        raise ValueError("the patient's left and right lung masks overlap")
    uids = result_uids(source.SOPInstanceUID, "seg", [algorithm.uid_key], root=device.uid_root)
    descriptions = [_segment_description(source, segment, algorithm, device.uid_root) for segment in LUNG_SEGMENTS]
    segmentation_type = segmentation_type_for(*shape, len(LUNG_SEGMENTS))
    pixel_array = _segment_pixels(masks, segmentation_type)
    spacing = source.spacing
    pixel_measures = hd.PixelMeasuresSequence(
        pixel_spacing=[spacing.row_mm, spacing.column_mm] if spacing is not None else [1.0, 1.0],
        slice_thickness=NOMINAL_SLICE_THICKNESS_MM,
    )

    with no_identifier_warnings():
        seg = _encode(source, pixel_array, segmentation_type, pixel_measures, descriptions,
                      uids.series_instance_uid, uids.sop_instance_uid, algorithm, series_number, device)
    # highdicom refuses a plane orientation for sources without a Frame of Reference.
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(_display_orientation(source))
    seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [orientation]
    _fix_dimension_organization_uid(seg, derive_uid(source.SOPInstanceUID, "seg", "dimension-organization",
                                                    algorithm.uid_key, root=device.uid_root))
    if spacing is None:
        seg.ImageComments = NOMINAL_SPACING_COMMENT
    # highdicom leaves out Patient Orientation for projection sources, but the
    # General Image module needs it (Type 2C): copy it (empty when absent).
    seg.PatientOrientation = source.get("PatientOrientation", "")
    device.write_equipment(seg)
    for item, segment in zip(seg.SegmentSequence, LUNG_SEGMENTS, strict=True):
        modifier = hd.sr.CodedConcept.from_code(segment.laterality)
        item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return seg


def _fix_dimension_organization_uid(seg: Dataset, uid: str) -> None:
    """Give the SEG's dimension organization ``uid`` (derived like its other UIDs) in place of the
    random one highdicom draws: a SEG encoded again (a retry after a crash) is then the same
    object, UID for UID, as the one a PACS may already hold."""
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = uid


def _encode(
    source: Dataset,
    pixel_array: np.ndarray,
    segmentation_type: hd.seg.SegmentationTypeValues,
    pixel_measures: hd.PixelMeasuresSequence,
    descriptions: list[hd.seg.SegmentDescription],
    series_instance_uid: str,
    sop_instance_uid: str,
    algorithm: Algorithm,
    series_number: int,
    device: NodeDevice,
) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=pixel_array,
        segmentation_type=segmentation_type,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        pixel_measures=pixel_measures,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        **device.equipment(),
        content_label=SEG_CONTENT_LABEL,
        content_description=f"Lungs by {algorithm.name} {algorithm.version}"[:64],
        omit_empty_frames=False,
        series_description=SEG_SERIES_DESCRIPTION,
    )


def _segment_pixels(masks: list[np.ndarray], segmentation_type: hd.seg.SegmentationTypeValues) -> np.ndarray:
    """highdicom's pixel input for the lung masks (which do not overlap), in :data:`LUNG_SEGMENTS` order.

    BINARY: a label map, (1, Rows, Columns) uint8 holding each pixel's segment number (0: none).
    highdicom cuts the same one-bit frames out of it as out of a stack of masks, but a stack
    makes it check every pixel for overlapping segments (a sum over the segment axis, most of
    the SEG's cost at 2048 x 2048), which the caller has already ruled out.

    FRACTIONAL: the masks stacked, (1, Rows, Columns, 2) float32 0.0/1.0, stored as 0/255. A
    label map would be stored the same, but it changes Segments Overlap from UNDEFINED to NO.
    """
    if segmentation_type is hd.seg.SegmentationTypeValues.FRACTIONAL:
        return np.stack(masks, axis=-1)[np.newaxis].astype(np.float32)
    labels = np.zeros((1, *masks[0].shape), dtype=np.uint8)
    for segment, mask in zip(LUNG_SEGMENTS, masks, strict=True):
        labels[0][mask] = segment.segment_number
    return labels


def segmentation_type_for(rows: int, columns: int, segments: int) -> hd.seg.SegmentationTypeValues:
    """BINARY, unless the bit-packed Pixel Data of ``segments`` frames has an odd byte length.

    An odd length gets a pad byte, which dcmjs (OHIF v3) refuses, and Orthanc 1.10 cannot
    serve single 1-bit frames; FRACTIONAL 0/255 loads everywhere at 8 bits a pixel.
    """
    packed_bytes = -(-rows * columns * segments // 8)
    if packed_bytes % 2:
        return hd.seg.SegmentationTypeValues.FRACTIONAL
    return hd.seg.SegmentationTypeValues.BINARY


def _display_orientation(source: Dataset) -> tuple[float, ...]:
    """The source's Image Orientation (Patient) if it is six finite numbers, else :data:`DISPLAY_ORIENTATION`."""
    try:
        values = tuple(float(v) for v in source.get("ImageOrientationPatient") or ())
    except (TypeError, ValueError):
        return DISPLAY_ORIENTATION
    if len(values) != 6 or not all(np.isfinite(values)):
        return DISPLAY_ORIENTATION
    row, column = np.array(values[:3]), np.array(values[3:])
    if not (np.isclose(np.linalg.norm(row), 1, atol=1e-3) and np.isclose(np.linalg.norm(column), 1, atol=1e-3)
            and abs(float(row @ column)) < 1e-3):
        return DISPLAY_ORIENTATION
    return values


def _segment_description(source: Dataset, segment: LungSegment, algorithm: Algorithm,
                         uid_root: str) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=segment.segment_number,
        segment_label=segment.segment_label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.seg_identification(),
        tracking_uid=derive_uid(source.SOPInstanceUID, "seg", "tracking", segment.side, algorithm.uid_key,
                                root=uid_root),
        tracking_id=segment.segment_label,
        display_color=hd.color.CIELabColor(*segment.display_color),
    )


def _as_binary(mask: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}; the source image is (Rows, Columns) = {shape}")
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or hold only 0 and 1")
        mask = mask.astype(bool)
    return mask
