"""Secondary Capture of the radiograph with the lungs drawn in: for viewers that cannot show a SEG.

An RGB picture (:func:`node.results.picture.overlay_picture`, the longer side at most
:data:`SC_MAX_SIDE` pixels) with the patient's left lung green and the right blue, the TB
score and its qualitative result, the models' names and versions and "NOT FOR DIAGNOSIS"
burned in, filed into the source's study as a series of its own. Burned In Annotation is YES
and the Conversion Type WSD (workstation): it is a picture of results, not a radiograph, and
carries no Pixel Spacing (nothing may be measured on it).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from .algorithm import ResultAlgorithms
from .device import DEFAULT_DEVICE, NodeDevice
from .picture import QUALITY_CHECK, lung_layers, overlay_picture
from .source import encoding_source, no_identifier_warnings
from .uids import result_uids

__all__ = ["SC_MAX_SIDE", "SC_SERIES_DESCRIPTION", "build_secondary_capture"]

SC_SERIES_DESCRIPTION = "LUNG OVERLAY (AI, not for clinical use)"
DEFAULT_SC_SERIES_NUMBER = 9903
SC_MAX_SIDE = 1024


def build_secondary_capture(
    source: Dataset,
    pixels: np.ndarray,
    patient_left: np.ndarray,
    patient_right: np.ndarray,
    *,
    patient_left_on_image_right: bool,
    tb_score: float,
    threshold: float,
    algorithms: ResultAlgorithms,
    series_number: int = DEFAULT_SC_SERIES_NUMBER,
    device: NodeDevice = DEFAULT_DEVICE,
    quality_warning: str | None = None,
) -> hd.sc.SCImage:
    """Encode the overlay picture of ``source`` (display ``pixels`` in [0, 1], the two lung masks).

    UIDs derive from the source, both algorithms and the threshold, like the SR's.
    ``quality_warning`` (the segmentation failed the plausibility check): a caption line
    "Quality check: ..." (as in the SR's TB score Comment) right below the TB score's, wrapped to the width.

    Raises:
        ValueError: masks or pixels of the wrong shape, a score or threshold outside [0, 1].
    """
    source = encoding_source(source)
    for name, value in (("tb_score", tb_score), ("threshold", threshold)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    result = "Abnormal" if tb_score >= threshold else "Normal"
    segmenter, tb = algorithms.segmenter, algorithms.tb_classifier
    caption = [
        f"TB score {tb_score:.3f} (threshold {threshold:.3f}): {result}",
        *([f"{QUALITY_CHECK} {quality_warning.strip()}"] if quality_warning else []),
        f"Lungs: {segmenter.name} {segmenter.version}; TB: {tb.name} {tb.version}",
        "Green: patient's left lung, blue: patient's right lung",
    ]
    picture = overlay_picture(pixels, lung_layers(patient_left, patient_right), caption,
                              patient_left_on_image_right=patient_left_on_image_right, max_side=SC_MAX_SIDE)
    uid_keys = [segmenter.uid_key, tb.uid_key, f"threshold={threshold!r}"]
    uids = result_uids(source.SOPInstanceUID, "sc", uid_keys, root=device.uid_root)
    with no_identifier_warnings():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=np.asarray(picture, dtype=np.uint8),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uids.series_instance_uid,
            series_number=series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=1,
            manufacturer=device.manufacturer,
            patient_orientation=_orientation(source),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    if "Laterality" not in sc:
        sc.Laterality = ""  # General Series, Type 2C: the chest is not a paired structure
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.DerivationDescription = "Radiograph with AI lung segmentation and TB score burned in"[:1024]
    sc.ImageComments = "NOT FOR DIAGNOSIS. Research use only."
    device.write_equipment(sc)
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def _orientation(source: Dataset) -> tuple[str, str]:
    """The source's Patient Orientation when it has two values, else the standard frontal ``L\\F``."""
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2 and all(str(v) for v in value):
        return (str(value[0]), str(value[1]))
    return ("L", "F")
