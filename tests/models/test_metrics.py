"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models import metrics


def test_dice_jaccard_hand_computed():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 px
    b[0, 1:] = True  # 3 px, overlap 2
    assert metrics.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert metrics.jaccard(a, b) == pytest.approx(2 / 4)
    assert metrics.dice(a, a) == 1.0 and metrics.dice(a, ~a) == 0.0
    assert metrics.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_hd95_shifted_square():
    a = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b = np.roll(a, 3, axis=1)  # shifted 3 px to the right
    # boundary distances are 0..3 px; the 95th percentile of each direction is 3
    assert metrics.hd95(a, b) == pytest.approx(3.0)
    assert metrics.hd95(a, a) == 0.0
    assert math.isinf(metrics.hd95(a, np.zeros_like(a)))


def test_hd95_outlier_point():
    a = np.zeros((50, 50), bool)
    a[10:30, 10:30] = True
    b = a.copy()
    b[45, 45] = True  # one far stray pixel: below the 95th percentile, unlike the max
    assert metrics.hd95(a, b) == 0.0


def test_auc_hand_computed():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert metrics.roc_auc(y, s) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert metrics.roc_auc(y, [0.5] * 4) == pytest.approx(0.5)  # ties count one half
    assert metrics.roc_auc([0, 1], [0.9, 0.1]) == 0.0
    assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


def test_auc_ci_brackets_estimate():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    s = y + rng.normal(0, 1, 100)
    auc = metrics.roc_auc(y, s)
    lo, hi = metrics.roc_auc_ci(y, s, n_boot=500)
    assert 0 <= lo < auc < hi <= 1 and hi - lo < 0.3


def test_sensitivity_specificity_hand_computed():
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.5]
    sens, spec = metrics.sensitivity_specificity(y, s, 0.5)
    assert sens == pytest.approx(2 / 3) and spec == pytest.approx(2 / 4)  # >= threshold is positive


def test_threshold_for_sensitivity():
    y = [1] * 10 + [0] * 5
    s = list(np.linspace(0.1, 1.0, 10)) + [0.05] * 5
    t = metrics.threshold_for_sensitivity(y, s, 0.9)
    sens, _ = metrics.sensitivity_specificity(y, s, t)
    assert sens >= 0.9 and t == pytest.approx(0.2)


def test_calibration_hand_computed():
    # bins of 0.2: one case each in [0, .2), [.2, .4), [.6, .8), [.8, 1.0]
    cal = metrics.calibration(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.8, 0.3]), bins=5)
    assert cal["ece"] == pytest.approx(0.25 * (0.1 + 0.3 + 0.2 + 0.1), abs=1e-6)
    assert cal["brier"] == pytest.approx((0.01 + 0.01 + 0.04 + 0.09) / 4)
    assert [b["n"] for b in cal["bins"]] == [1, 1, 0, 1, 1]
    assert cal["bins"][2]["mean_score"] is None and cal["bins"][4]["positive_rate"] == 1.0
    assert (cal["bins"][0]["lower"], cal["bins"][-1]["upper"]) == (0.0, 1.0)


def test_calibration_of_perfectly_calibrated_scores_is_zero():
    # in each bin the mean score equals the fraction positive; a score of exactly 1.0 is counted
    labels = np.array([0, 0, 0, 1] * 5 + [1] * 4)
    scores = np.array([0.25] * 20 + [1.0] * 4)
    cal = metrics.calibration(labels, scores, bins=4)
    assert cal["ece"] == pytest.approx(0.0, abs=1e-6) and sum(b["n"] for b in cal["bins"]) == 24


def test_calibration_refuses_scores_that_are_not_probabilities():
    with pytest.raises(ValueError, match=r"scores in \[0, 1\]"):
        metrics.calibration(np.array([0, 1]), np.array([-0.1, 2.0]))
