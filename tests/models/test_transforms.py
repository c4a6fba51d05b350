"""The shared transforms: geometry round trips, intensity normalisation, post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from models import metrics, transforms
from models.components import fill_holes, label_components
from tests.models.helpers import upscale_nearest


@pytest.mark.parametrize("shape", [(512, 512), (1955, 1841), (4096, 4096), (2000, 3000)])
@pytest.mark.parametrize("size", [256, 320])
def test_mask_roundtrip_keeps_dice(real_masks, shape, size):
    for m in real_masks[:3]:
        full = upscale_nearest(m, shape)
        back = transforms.mask_roundtrip(full, size)
        assert back.shape == full.shape
        assert metrics.dice(back, full) > 0.98


def test_preprocess_square_range_and_scale_invariance():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4096, size=(300, 200)).astype(np.float32)  # 12-bit, non-square
    x = transforms.preprocess(img, 64)
    assert x.shape == (64, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    # the same picture stored at another bit depth / offset reaches the net identically
    np.testing.assert_allclose(transforms.preprocess(img * 16 + 1000, 64), x, atol=1e-5)


def test_preprocess_same_for_png_and_full_size_acquisition(real_masks):
    """A 512 training PNG and a 4x larger 16-bit 'acquisition' of it give the same net input."""
    rng = np.random.default_rng(1)
    png = (rng.random((128, 128)) * 255).round()
    big = upscale_nearest(png, (512, 512)) * 257.0  # 16-bit range, exact 4x block replication
    np.testing.assert_allclose(transforms.preprocess(big, 64), transforms.preprocess(png, 64), atol=1e-5)


def test_resize_does_not_keep_aspect():
    img = np.zeros((100, 400), np.float32)
    img[:, :200] = 1.0  # left half bright
    out = transforms.resize_area(img, 50)
    assert out.shape == (50, 50)
    assert np.allclose(out[:, :25], 1.0) and np.allclose(out[:, 25:], 0.0)


def test_flat_image_does_not_divide_by_zero():
    assert not transforms.normalize_intensity(np.full((10, 10), 7.0)).any()


def test_non_finite_rejected():
    img = np.ones((10, 10))
    img[0, 0] = np.nan
    with pytest.raises(ValueError):
        transforms.preprocess(img, 8)


def _two_lungs(h=100, w=100, bridge=False):
    m = np.zeros((h, w), bool)
    m[20:80, 10:40] = True  # image-left lung
    m[20:85, 60:92] = True  # image-right lung (larger)
    if bridge:
        m[60:70, 40:60] = True  # lungs touching below the heart
    return m


def test_split_two_components():
    m = _two_lungs()
    m[50, 20] = False  # a hole
    m[5, 5] = True  # debris
    r = transforms.split_lungs(m)
    assert r.image_left[20:80, 10:40].all() and not r.image_left[:, 50:].any()
    assert r.image_right[20:85, 60:92].all() and not r.image_right[:, :50].any()
    assert not r.lung[5, 5], "debris is not a lung"
    assert r.lung[50, 20], "hole filled"
    assert not (r.image_left & r.image_right).any()
    assert np.array_equal(r.lung, r.image_left | r.image_right)


def test_split_touching_lungs_at_midline():
    r = transforms.split_lungs(_two_lungs(bridge=True))
    cols_l = np.flatnonzero(r.image_left.any(axis=0))
    cols_r = np.flatnonzero(r.image_right.any(axis=0))
    assert cols_l.max() < cols_r.min()
    assert 40 <= cols_r.min() <= 60  # cut inside the bridge, between the lungs
    assert r.image_left[20:80, 10:40].all() and r.image_right[20:85, 60:92].all()


def test_single_lung_stays_on_its_side():
    m = np.zeros((100, 100), bool)
    m[20:80, 60:90] = True
    r = transforms.split_lungs(m)
    assert not r.image_left.any() and r.image_right.sum() == m.sum()


def test_small_second_blob_not_taken_as_lung():
    m = _two_lungs(bridge=True)
    m[2:4, 2:4] = True
    r = transforms.split_lungs(m)
    assert not r.lung[2:4, 2:4].any()
    assert r.image_left.any() and r.image_right.any()


def test_probabilities_to_masks_maps_back_to_original_geometry():
    prob = _two_lungs(64, 64).astype(np.float32)
    r = transforms.probabilities_to_masks(prob, (1955, 1841))
    assert r.lung.shape == (1955, 1841) and r.lung.dtype == bool
    expected = upscale_nearest(_two_lungs(64, 64), (1955, 1841))
    assert metrics.dice(r.lung, expected) > 0.97
    assert not (r.image_left & r.image_right).any()


def test_empty_prediction_gives_empty_masks():
    r = transforms.probabilities_to_masks(np.zeros((32, 32), np.float32), (100, 120))
    assert r.lung.shape == (100, 120) and not r.lung.any()


def _bfs_count(mask, connectivity):
    seen = np.zeros_like(mask)
    n = 0
    offs = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 8 else [])
    for r, c in zip(*np.nonzero(mask)):
        if seen[r, c]:
            continue
        n += 1
        stack = [(r, c)]
        seen[r, c] = True
        while stack:
            y, x = stack.pop()
            for dy, dx in offs:
                yy, xx = y + dy, x + dx
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
    return n


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_matches_flood_fill(connectivity):
    rng = np.random.default_rng(3)
    for _ in range(20):
        m = rng.random((23, 31)) < 0.45
        labels, sizes = label_components(m, connectivity)
        assert len(sizes) == _bfs_count(m, connectivity)
        assert sizes.sum() == m.sum() and ((labels > 0) == m).all()


def test_fill_holes_keeps_border_background():
    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    m[4:6, 4:6] = False  # hole
    m[0:3, 0] = False
    f = fill_holes(m)
    assert f[4:6, 4:6].all() and not f[0, 0]


def test_tb_input_shape_and_channels():
    img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    x = transforms.tb_input(img, _two_lungs(64, 64).astype(np.float32), 48)
    assert x.shape == (2, 48, 48) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x[1].mean() > 0.3  # crop is mostly lung
