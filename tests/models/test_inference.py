"""LungAnalyzer on full-size inputs: geometry, types, identities, range independence."""

from __future__ import annotations

import numpy as np
import pytest

from models import data, metrics, transforms
from models.inference import LungAnalysis, LungAnalyzer
from tests.models.helpers import upscale_nearest


@pytest.fixture(scope="module")
def analyzer() -> LungAnalyzer:
    return LungAnalyzer.load(arch="unet", device="cpu")


@pytest.fixture(scope="module")
def case(fixture_dir):
    c = data.read_index(fixture_dir)[0]
    return data.load_image(c.image_path), data.load_mask(c.mask_path)


def test_full_size_16_bit_odd_geometry(analyzer, case):
    image, truth = case
    big = upscale_nearest(image, (1955, 1841)) * 64.0 + 100.0  # a 14-bit "acquisition"
    r = analyzer.analyze(big)
    assert isinstance(r, LungAnalysis)
    for m in (r.lung_mask, r.image_left, r.image_right):
        assert m.shape == (1955, 1841) and m.dtype == bool
    assert np.array_equal(r.lung_mask, r.image_left | r.image_right)
    assert not (r.image_left & r.image_right).any()
    cols = np.nonzero(r.image_left)[1].mean(), np.nonzero(r.image_right)[1].mean()
    assert cols[0] < 1841 / 2 < cols[1]
    assert metrics.dice(r.lung_mask, upscale_nearest(truth, (1955, 1841))) > 0.93
    assert 0.0 <= r.tb_score <= 1.0


def test_same_result_whatever_the_range(analyzer, case):
    image, _ = case
    a, b = analyzer.analyze(image), analyzer.analyze(image * 100.0 - 5.0)
    assert metrics.dice(a.lung_mask, b.lung_mask) > 0.999
    assert a.tb_score == pytest.approx(b.tb_score, abs=1e-4)


def test_identities_and_threshold(analyzer, case):
    r = analyzer.analyze(case[0])
    assert r.segmenter.name == "cxrnode-lung-unet" and r.tb_model.name == "cxrnode-tb-scorer"
    assert 0 < analyzer.tb_threshold < 1 and analyzer.device == "cpu"


def test_lungs_are_split_once_with_the_numbers_of_the_separate_steps(analyzer, case, monkeypatch):
    image = case[0]
    net_image = transforms.preprocess(image, analyzer.seg_size)
    prob = analyzer.lung_probabilities(net_image)
    lungs = transforms.probabilities_to_masks(prob, image.shape, analyzer.seg_threshold)
    score = analyzer.tb_probability(net_image, prob)
    splits = []
    split = transforms.split_lungs
    monkeypatch.setattr(transforms, "split_lungs", lambda mask: splits.append(mask) or split(mask))
    r = analyzer.analyze(image)
    assert len(splits) == 1  # the masks and the TB scorer's crop share one split
    assert r.tb_score == score
    assert np.array_equal(r.image_left, lungs.image_left) and np.array_equal(r.image_right, lungs.image_right)


def test_resunet_loads_and_segments(case):
    r = LungAnalyzer.load(arch="resunet", device="cpu").analyze(case[0])
    assert r.segmenter.name == "cxrnode-lung-resunet"
    assert metrics.dice(r.lung_mask, case[1]) > 0.93


def test_unknown_arch_rejected():
    with pytest.raises(ValueError, match="unknown segmentation arch"):
        LungAnalyzer.load(arch="vnet")
