"""The reference-free plausibility score of a lung segmentation (models.plausibility)."""

from __future__ import annotations

import numpy as np
import pytest

from models import plausibility, transforms
from models.inference import LungAnalysis
from models.plausibility import PLAUSIBLE, analysis_plausibility, lung_plausibility


def test_every_reference_mask_of_the_fixture_is_plausible(real_masks):
    for mask in real_masks:
        lungs = transforms.split_lungs(mask)
        # the patient's left lung is on the image's right in the standard view
        assert lung_plausibility(lungs.image_right, lungs.image_left) >= 0.9
        assert lung_plausibility(lungs.image_left, lungs.image_right) == 0.0  # sides swapped


def test_failures_a_person_would_reject_score_below_the_cut(real_masks):
    lungs = transforms.split_lungs(real_masks[0])
    left, right = lungs.image_right, lungs.image_left  # patient's left, patient's right
    assert lung_plausibility(left, np.zeros_like(right)) == 0.0  # one lung missing
    tiny = np.zeros_like(left)
    tiny[200:215, 350:365] = True
    assert lung_plausibility(tiny, right) < PLAUSIBLE  # one lung a speck
    speckled = left & (np.indices(left.shape).sum(axis=0) % 3 == 0)  # a lung in fragments
    assert lung_plausibility(speckled, right) < PLAUSIBLE
    everything = np.ones_like(left)
    half = np.arange(left.shape[1]) >= left.shape[1] // 2
    assert lung_plausibility(everything & half, everything & ~half) < PLAUSIBLE  # the whole image


def test_analysis_plausibility_reads_the_sides_of_a_lung_analysis(real_masks):
    lungs = transforms.split_lungs(real_masks[0])
    analysis = LungAnalysis(lung_mask=lungs.lung, image_left=lungs.image_left, image_right=lungs.image_right,
                            tb_score=0.5, segmenter=None, tb_model=None)  # type: ignore[arg-type]
    assert analysis_plausibility(analysis) == lung_plausibility(lungs.image_right, lungs.image_left) >= 0.9


def test_masks_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="two 2-D masks of one shape"):
        lung_plausibility(np.ones((4, 4), bool), np.ones((4, 5), bool))


def test_the_dataset_export_scores_pseudo_labels_with_the_same_function(real_masks):
    from node.dataset.labels import pseudo_quality

    lungs = transforms.split_lungs(real_masks[1])
    assert pseudo_quality(lungs.image_right, lungs.image_left) == lung_plausibility(lungs.image_right, lungs.image_left)
    from node.settings import DatasetSettings

    # the export's default cut for its pseudo-labels is the evaluation's cut for implausible cases
    assert DatasetSettings().min_pseudo_quality == plausibility.PLAUSIBLE


def test_a_large_analysis_is_checked_on_a_subsample_with_the_same_verdict(real_masks):
    from PIL import Image

    mask = real_masks[0]
    big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((2048, 2048), Image.Resampling.NEAREST)) > 127
    lungs = transforms.split_lungs(big)
    analysis = LungAnalysis(lung_mask=lungs.lung, image_left=lungs.image_left, image_right=lungs.image_right,
                            tb_score=0.5, segmenter=None, tb_model=None)  # type: ignore[arg-type]
    full = lung_plausibility(lungs.image_right, lungs.image_left)
    assert abs(analysis_plausibility(analysis) - full) <= 0.01 and full >= 0.9
    broken = LungAnalysis(lung_mask=lungs.lung, image_left=lungs.image_left, image_right=np.zeros_like(big),
                          tb_score=0.5, segmenter=None, tb_model=None)  # type: ignore[arg-type]
    assert analysis_plausibility(broken) == 0.0  # a missing lung is missing at any sampling
