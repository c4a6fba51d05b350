"""TID 1500 Measurement Report of the TB score and lung areas (highdicom).

IOD: Comprehensive 3D SR (1.2.840.10008.5.1.4.1.1.88.34), highdicom's main
target for TID 1500 and accepted by Orthanc. The content has no 3-D
coordinates, so Enhanced SR or Comprehensive SR would validate as well;
:data:`SR_CLASS` is the one place to change it.

Content (``ContentSequence`` of the root ``Imaging Measurement Report``):

* observer: the node as a device (TID 1004): Device Observer UID (this
  installation's own), Name (the station name), Manufacturer, Model Name and
  Serial Number from :class:`node.results.device.NodeDevice`;
* procedure reported: SCT 399208008 plain chest X-ray;
* image library: the source image;
* one image-level group (TID 1501) on the source image, finding type
  SCT 56717001 Tuberculosis, finding site Lung, with
  - NUM ``(TBSCORE, 99CXRNODE)`` "Tuberculosis score", 0..1, unit UCUM ``1``,
    INFERRED FROM a SCOORD POINT above the lungs (where a viewer puts its label);
  - CODE ``(TBSCREEN, 99CXRNODE)`` "Tuberculosis screening result" =
    SCT 263654008 Abnormal when score >= threshold, else SCT 17621005
    Normal (a named concept of its own: "Finding" is already the finding
    type's concept name);
  - exactly one TEXT DCM 121106 "Comment", the line viewers list (OHIF shows
    comments, not CODE items): "TB score 0.730 (threshold 0.500): Abnormal", going
    on, when the lung areas are left out (no usable pixel spacing), with
    ". Lung areas not reported: <reason>" and, when the lung segmentation failed
    the node's plausibility check (:mod:`models.plausibility`), with
    ". Quality check: ..." last (so that ``text[text.index(QUALITY_CHECK):]`` is
    the whole warning). One Comment because OHIF v3 shows only the first Comment
    of a group, as the measurement's label: a second Comment would not be seen,
    and one before the score's would hide the score. At most 1024 characters
    (a longer text loses its tail, never the score);
  - TB model identification, with ``threshold=<t>`` as a parameter;
* per lung, two groups with the same Tracking Unique Identifier (one finding,
  two views of it):
  - a planar ROI group (TID 1410) referencing its SEG segment and frame,
    finding site Lung + laterality, and (when pixel spacing is known) NUM
    SCT 42798000 Area in UCUM ``mm2``, with the segmenter identification;
  - the lung outline on the source image, a closed SCOORD POLYLINE
    (:func:`node.results.outline.mask_outline`): with an area, a TID 1501
    group whose Area NUM (the same value) is INFERRED FROM the outline and a
    Comment with the lung's name; without one, a TID 1410 image-region group.

Why this shape (docs/VIEWERS.md): OHIF v3 draws SR measurements only from
SCOORDs, merges groups by Tracking Unique Identifier, and crashes on a group
that has no coordinates at all; it lists a measurement in its panel when the
Tracking Identifier text names a Cornerstone tool (:data:`OHIF_FREEHAND`,
:data:`OHIF_ARROW`), the convention of the SRs OHIF writes itself. Those texts
are free text to every other reader.

The ``99CXRNODE`` local codes make dciodvfy print "Unrecognized defined term"
warnings; they are expected (not errors). Two fixes from dciodvfy are
applied: segment references are built by hand (the frame number is the SEG's,
the source image is single-frame), and Referenced Segment Number is removed
from IMAGE items that carry Referenced Frame Number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.imaging import spacing_attribute_mm

from .algorithm import ResultAlgorithms
from .device import DEFAULT_DEVICE, NodeDevice
from .measure import LUNG_SIDES
from .outline import mask_bounds, mask_outline
from .picture import QUALITY_CHECK
from .seg import LUNG_SEGMENTS, LungSegment
from .source import encoding_source, no_identifier_warnings
from .uids import derive_uid, result_uids

__all__ = [
    "AREA",
    "OHIF_ARROW",
    "OHIF_FREEHAND",
    "SR_CLASS",
    "SR_SERIES_DESCRIPTION",
    "TB_SCORE",
    "TB_SCREENING_RESULT",
    "TUBERCULOSIS",
    "build_report",
]

SR_CLASS = hd.sr.Comprehensive3DSR
SR_SERIES_DESCRIPTION = "TB REPORT (AI, not for clinical use)"
DEFAULT_SR_SERIES_NUMBER = 9902
LOCAL_SCHEME = "99CXRNODE"

TB_SCORE = hd.sr.CodedConcept("TBSCORE", LOCAL_SCHEME, "Tuberculosis score")
TB_SCREENING_RESULT = hd.sr.CodedConcept("TBSCREEN", LOCAL_SCHEME, "Tuberculosis screening result")
TUBERCULOSIS = hd.sr.CodedConcept("56717001", "SCT", "Tuberculosis")
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
AREA = hd.sr.CodedConcept.from_code(codes.SCT.Area)
COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)
#: Tracking Identifier texts by which OHIF v3 turns an SR group into a listed measurement.
OHIF_FREEHAND = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
OHIF_ARROW = "Cornerstone3DTools@^0.1.0:ArrowAnnotate"
_SEGMENT_ITEM_CONCEPT = "121214"  # DCM "Referenced Segmentation Frame"


def build_report(
    source: Dataset,
    seg: Dataset,
    *,
    tb_score: float,
    threshold: float,
    lung_masks: Mapping[str, np.ndarray],
    areas_mm2: Mapping[str, float] | None,
    area_omission_reason: str | None,
    algorithms: ResultAlgorithms,
    series_number: int = DEFAULT_SR_SERIES_NUMBER,
    device: NodeDevice = DEFAULT_DEVICE,
    quality_warning: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Encode the TB score and lung areas of ``source`` as a TID 1500 SR.

    ``seg`` is the lung SEG of the same source from
    :func:`node.results.seg.build_segmentation`; ``lung_masks`` are the masks it
    encodes (keys ``"left"`` and ``"right"``, the patient's), outlined in the
    report. Give either ``areas_mm2``
    (keys ``"left"`` and ``"right"``, the patient's) or, when the header has
    no usable pixel spacing, ``area_omission_reason``, written into the TB
    score's Comment after the score: "TB score ...: Abnormal. Lung areas not
    reported: <reason>". UIDs derive from the source SOP Instance UID, both
    algorithms and the threshold (:func:`node.results.uids.result_uids`).
    ``quality_warning``: why the lungs and the score must not be trusted (the segmentation failed
    the plausibility check), written into the same Comment, last:
    "TB score ...: Abnormal[. Lung areas not reported: <reason>]. Quality check: <warning>".
    The TB group has that one Comment and no other (OHIF v3 shows only a group's first).

    Raises:
        ValueError: score or threshold outside [0, 1]; both or neither of
            areas and reason; bad area keys or values; the SEG does not
            belong to the source or lacks a lung segment frame.
    """
    source = encoding_source(source)
    _check_unit_interval("tb_score", tb_score)
    _check_unit_interval("threshold", threshold)
    if (areas_mm2 is None) == (area_omission_reason is None):
        raise ValueError("give exactly one of areas_mm2 and area_omission_reason")
    if areas_mm2 is not None:
        _check_areas(areas_mm2)
    elif not area_omission_reason or not area_omission_reason.strip():
        raise ValueError("area_omission_reason must not be empty")
    if quality_warning is not None and not quality_warning.strip():
        raise ValueError("quality_warning must not be empty")
    if seg.StudyInstanceUID != source.StudyInstanceUID:
        raise ValueError("the SEG is not in the source image's study")
    frames = _frame_numbers_by_segment(seg)
    if set(lung_masks) != set(LUNG_SIDES):
        raise ValueError(f"lung_masks must have exactly the keys {LUNG_SIDES}, got {sorted(lung_masks)}")
    shape = (int(source.Rows), int(source.Columns))
    for side, mask in lung_masks.items():
        if np.shape(mask) != shape:
            raise ValueError(f"the {side} lung mask has shape {np.shape(mask)}; the image is {shape}")
    outlines = {side: mask_outline(mask) for side, mask in lung_masks.items()}

    # The threshold changes the content, so it is part of the identity too.
    uid_keys = [algorithms.segmenter.uid_key, algorithms.tb_classifier.uid_key, f"threshold={threshold!r}"]
    uids = result_uids(source.SOPInstanceUID, "sr", uid_keys, root=device.uid_root)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]
    anchor = _label_anchor(lung_masks, shape)
    groups = [_image_group(source, tb_score, threshold, area_omission_reason, algorithms, uid_keys, anchor,
                           device.uid_root, quality_warning)]
    for segment in LUNG_SEGMENTS:
        if segment.segment_number not in frames:
            raise ValueError(f"the SEG has no frame for segment {segment.segment_number} ({segment.segment_label})")
        area = None if areas_mm2 is None else float(areas_mm2[segment.side])
        tracking_uid = derive_uid(source.SOPInstanceUID, "sr", "tracking", segment.side, *uid_keys,
                                  root=device.uid_root)
        outline = outlines[segment.side]
        if outline is not None:
            groups.append(_outline_group(source, segment, outline, area, algorithms, tracking_uid))
        groups.append(_lung_group(source, seg, segment, frames[segment.segment_number], area, algorithms,
                                  tracking_uid))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device.device_uid,
            name=device.observer_name,
            manufacturer_name=device.manufacturer,
            model_name=device.manufacturer_model_name,
            serial_number=device.device_serial_number,
        ),
    )
    with no_identifier_warnings():
        sr = _encode(source, seg, groups, observer, uids.series_instance_uid, uids.sop_instance_uid,
                     series_number, device)
    _drop_segment_number_beside_frame_number(sr)
    device.write_equipment(sr)
    return sr


def _encode(
    source: Dataset,
    seg: Dataset,
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
    observer: hd.sr.ObserverContext,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    device: NodeDevice,
) -> hd.sr.Comprehensive3DSR:
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=[source] if _has_image_library_descriptors(source) else None,
    )
    return SR_CLASS(
        evidence=[source, seg],
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        **device.equipment(),
        series_description=SR_SERIES_DESCRIPTION,
        is_complete=True,
    )


def _image_group(
    source: Dataset,
    tb_score: float,
    threshold: float,
    area_omission_reason: str | None,
    algorithms: ResultAlgorithms,
    uid_keys: list[str],
    anchor: np.ndarray,
    uid_root: str,
    quality_warning: str | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    tb_algorithm = algorithms.tb_classifier.sr_identification(threshold=f"{threshold:g}")
    result = codes.SCT.Abnormal if tb_score >= threshold else codes.SCT.Normal
    point = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=anchor[np.newaxis],
        source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(source.SOPInstanceUID, "sr", "tracking", "image", *uid_keys, root=uid_root),
            identifier=OHIF_ARROW,
        ),
        finding_type=TUBERCULOSIS,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=tb_algorithm,
        measurements=[
            hd.sr.Measurement(
                name=TB_SCORE,
                value=float(tb_score),
                unit=codes.UCUM.NoUnits,
                algorithm_id=tb_algorithm,
                referenced_coordinates=[point],
            )
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(TB_SCREENING_RESULT, result)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT,
        value=_tb_comment(tb_score, threshold, result.meaning, area_omission_reason, quality_warning),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    return group


def _tb_comment(tb_score: float, threshold: float, result: str, area_omission_reason: str | None,
                quality_warning: str | None) -> str:
    """The TB group's one Comment: the score, then why the areas are missing, then the quality check.

    All in one because OHIF v3 labels the measurement with the group's first Comment only: whatever
    is not in it is shown nowhere. The quality check goes last so that it reads to the end of the
    text (``text[text.index(QUALITY_CHECK):]``, as :mod:`node.results.preview` takes it). Cut to
    1024 characters, the limit kept for TEXT values; the score comes first and is never cut.
    """
    parts = [f"TB score {tb_score:.3f} (threshold {threshold:.3f}): {result}"]
    if area_omission_reason is not None:
        parts.append(f"Lung areas not reported: {area_omission_reason.strip().rstrip('.')}")
    if quality_warning is not None:
        parts.append(f"{QUALITY_CHECK} {quality_warning.strip()}")
    return ". ".join(parts)[:1024]


def _lung_group(
    source: Dataset,
    seg: Dataset,
    segment: LungSegment,
    frame_number: int,
    area_mm2: float | None,
    algorithms: ResultAlgorithms,
    tracking_uid: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    segmenter = algorithms.segmenter.sr_identification()
    site = hd.sr.FindingSite(codes.SCT.Lung, laterality=segment.laterality)
    measurements = None
    if area_mm2 is not None:
        measurements = [
            hd.sr.Measurement(
                name=AREA,
                value=area_mm2,
                unit=codes.UCUM.SquareMillimeter,
                algorithm_id=segmenter,
                finding_sites=[site],
            )
        ]
    # Built by hand: from_segmentation() would put the SEG frame number on
    # the single-frame source image, which dciodvfy rejects.
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        frame_number=frame_number,
        segment_number=segment.segment_number,
        source_image=hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=segment.segment_label),
        referenced_segment=reference,
        finding_type=codes.SCT.Lung,
        finding_sites=[site],
        algorithm_id=segmenter,
        measurements=measurements,
    )


def _outline_group(
    source: Dataset,
    segment: LungSegment,
    outline: np.ndarray,
    area_mm2: float | None,
    algorithms: ResultAlgorithms,
    tracking_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The lung outline on the source image: a listed measurement when there is an area, else a region."""
    segmenter = algorithms.segmenter.sr_identification()
    site = hd.sr.FindingSite(codes.SCT.Lung, laterality=segment.laterality)
    image = hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID)
    if area_mm2 is None:
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=segment.segment_label),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline, source_image=image),
            finding_type=codes.SCT.Lung,
            finding_sites=[site],
            algorithm_id=segmenter,
        )
    coordinates = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline, source_image=image)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=OHIF_FREEHAND),
        finding_type=codes.SCT.Lung,
        finding_sites=[site],
        algorithm_id=segmenter,
        measurements=[
            hd.sr.Measurement(
                name=AREA,
                value=area_mm2,
                unit=codes.UCUM.SquareMillimeter,
                algorithm_id=segmenter,
                finding_sites=[site],
                referenced_coordinates=[coordinates],
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT, value=segment.segment_label, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _label_anchor(lung_masks: Mapping[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(column, row) above the middle of the lungs (the image centre when both are empty)."""
    bounds = [b for b in (mask_bounds(np.asarray(lung_masks[side], dtype=bool)) for side in LUNG_SIDES)
              if b is not None]
    if not bounds:
        return np.array([shape[1] / 2, shape[0] / 2], dtype=np.float32)
    top = min(rows.start for rows, _ in bounds)
    first, last = min(columns.start for _, columns in bounds), max(columns.stop for _, columns in bounds)
    return np.array([(first + last) / 2, top + 0.5], dtype=np.float32)


def _has_image_library_descriptors(source: Dataset) -> bool:
    """Whether highdicom can describe ``source`` in the Image Library (TID 1600).

    For CR/DX it needs a two-valued Patient Orientation and a usable Imager
    Pixel Spacing. Without them the Image Library is left out; the source
    stays referenced by the measurement groups and the evidence sequence.
    """
    if str(source.get("Modality", "")) not in ("CR", "DX", "MG", "IO", "PX", "RG", "XA", "RF"):
        return True
    orientation = source.get("PatientOrientation")
    has_orientation = orientation is not None and not isinstance(orientation, str) and len(orientation) == 2
    return has_orientation and spacing_attribute_mm(source, "ImagerPixelSpacing") is not None


def _frame_numbers_by_segment(seg: Dataset) -> dict[int, int]:
    frames: dict[int, int] = {}
    for index, item in enumerate(seg.get("PerFrameFunctionalGroupsSequence", []), start=1):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frames.setdefault(number, index)
    return frames


def _drop_segment_number_beside_frame_number(sr: Dataset) -> None:
    """Remove Referenced Segment Number where Referenced Frame Number is present.

    highdicom writes both into the Referenced Segmentation Frame IMAGE item;
    the standard (and dciodvfy) forbid the pair. highdicom reads it back
    without the segment number.
    """
    stack = list(sr.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        stack.extend(item.get("ContentSequence", []))
        concept = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") != "IMAGE" or not concept or concept[0].CodeValue != _SEGMENT_ITEM_CONCEPT:
            continue
        for ref in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in ref and "ReferencedSegmentNumber" in ref:
                del ref.ReferencedSegmentNumber


def _check_unit_interval(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_areas(areas_mm2: Mapping[str, float]) -> None:
    if set(areas_mm2) != set(LUNG_SIDES):
        raise ValueError(f"areas_mm2 must have exactly the keys {LUNG_SIDES}, got {sorted(areas_mm2)}")
    for side, value in areas_mm2.items():
        if not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"area of the {side} lung must be finite and >= 0, got {value!r}")
