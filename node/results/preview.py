"""The picture of one job's results, read back from what the node archived (the source, SEG, SR).

Reading the archived SEG and SR rather than re-running the networks shows exactly what was sent.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom import dcmread

from node.imaging import display_pixels, patient_left_on_image_right

from .picture import QUALITY_CHECK, lung_layers, overlay_picture
from .seg import LUNG_SEGMENTS
from .sr import COMMENT, TB_SCORE, TB_SCREENING_RESULT, TUBERCULOSIS

__all__ = ["result_preview"]


def result_preview(source_path: Path, seg_path: Path, sr_path: Path, max_side: int = 1024) -> Image.Image:
    """The radiograph with the SEG's lungs, the SR's TB score and result, and the model named.

    Raises:
        ValueError: the SEG does not reference the source, or the SR has no TB score.
    """
    source = dcmread(source_path)
    seg = hd.seg.segread(seg_path)
    numbers = [segment.segment_number for segment in LUNG_SEGMENTS]
    try:
        masks = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=numbers)[0] > 0
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"the SEG does not hold the lungs of this image: {exc}") from None
    by_side = {segment.side: masks[..., index] for index, segment in enumerate(LUNG_SEGMENTS)}
    score, result, checks = _tb_finding(sr_path)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    caption = [
        f"TB score {score:.3f}: {result}",
        *checks,  # "Quality check: ...", as the SR says it
        f"Lungs: {algorithm.AlgorithmName} {algorithm.AlgorithmVersion} (green: patient's left, blue: right)",
    ]
    return overlay_picture(display_pixels(source), lung_layers(by_side["left"], by_side["right"]), caption,
                           patient_left_on_image_right=patient_left_on_image_right(source), max_side=max_side)


def _tb_finding(sr_path: Path) -> tuple[float, str, list[str]]:
    """(TB score, screening result, the "Quality check: ..." warnings in its comments) of the SR's TB group."""
    sr = hd.sr.srread(sr_path)
    for group in sr.content.get_image_measurement_groups():
        if group.finding_type != TUBERCULOSIS:
            continue
        (score,) = group.get_measurements(name=TB_SCORE)
        evaluations = group.get_qualitative_evaluations(name=TB_SCREENING_RESULT)
        result = evaluations[0].value.meaning if evaluations else "no result"
        texts = [str(item.get("TextValue", "")) for item in group[0].get("ContentSequence", [])
                 if item.ConceptNameCodeSequence[0].CodeValue == COMMENT.value]
        # "TB score ...: Abnormal. Quality check: ..." (the warning follows the score in its Comment)
        checks = [text[text.index(QUALITY_CHECK):] for text in texts if QUALITY_CHECK in text]
        return float(np.float64(score.value)), str(result), checks
    raise ValueError("the SR has no TB screening group")
