"""The shared transforms: geometry round trips, intensity normalisation, post-processing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --------------------------------------------------------------------------- pruning (issue 9)
# Synthetic lungs at network size (256): ellipses or polygons about the size of real lungs there
# (~8,000 px, so the opening radius is 6 px). The image's right lung is the patient's left.

_N = 256


def _ellipse(r, c, rr, rc):
    from skimage.draw import ellipse

    m = np.zeros((_N, _N), bool)
    m[ellipse(r, c, rr, rc, shape=m.shape)] = True
    return m


def _disk(r, c, radius):
    from skimage.draw import disk

    m = np.zeros((_N, _N), bool)
    m[disk((r, c), radius, shape=m.shape)] = True
    return m


def _box(r0, r1, c0, c1):
    m = np.zeros((_N, _N), bool)
    m[r0:r1, c0:c1] = True
    return m


def _polygon(points):
    from skimage.draw import polygon

    m = np.zeros((_N, _N), bool)
    p = np.array(points)
    m[polygon(p[:, 0], p[:, 1], shape=m.shape)] = True
    return transforms.keep_largest(m, 1)[0]  # no stray raster pixel at a sharp tip


def _lung_pair():
    return _ellipse(128, 72, 80, 34), _ellipse(128, 184, 80, 34)  # image left, image right


def _band(m, px=1):
    from scipy import ndimage

    return ndimage.binary_dilation(m, iterations=px)


def test_prune_removes_gastric_bubble_on_a_narrow_neck():
    left, right = _lung_pair()
    bubble = _disk(230, 190, 14)  # under the patient's left lung (image right)
    neck = _box(195, 222, 188, 193)  # 5 px wide, through the hemidiaphragm
    m = left | right | bubble | neck
    r = transforms.split_lungs(m)
    assert not r.lung[bubble].any(), "the bubble is not lung"
    assert not (r.lung & neck & ~_band(right)).any(), "nor is its neck"
    assert not ((r.lung ^ m) & ~_band(bubble | neck)).any(), "the lungs keep their edge everywhere else"
    assert np.array_equal(r.image_left, left) and not (right & ~r.image_right).any()
    # the node's path (full size) and the TB crop get the same lungs
    full = transforms.probabilities_to_masks(m.astype(np.float32), (512, 512))
    assert not full.lung[upscale_nearest(bubble, (512, 512))].any()
    img = np.random.default_rng(0).random((_N, _N)).astype(np.float32)
    np.testing.assert_array_equal(transforms.tb_input(img, m.astype(np.float32), 64),
                                  transforms.tb_input(img, r.lung.astype(np.float32), 64))
    assert transforms.lung_bbox(r.lung)[1] < transforms.lung_bbox(m)[1], "the crop no longer reaches into the stomach"


def test_prune_keeps_a_bubble_on_a_wide_connection():
    left, right = _lung_pair()
    m = left | right | _disk(230, 190, 14) | _box(195, 231, 178, 202)  # 24 px wide: a real lung base
    r = transforms.split_lungs(m)
    assert np.array_equal(r.lung, m)


def test_prune_removes_a_thin_spur_outside_the_ribcage():
    left, right = _lung_pair()
    spur = _box(99, 102, 10, 60)  # 3 px wide, reaching 28 px out of the image-left lung's side
    m = left | right | spur
    r = transforms.split_lungs(m)
    assert not (r.lung & spur & ~_band(left)).any()
    assert not ((r.lung ^ m) & ~_band(spur)).any()
    assert np.array_equal(r.image_right, right)
    # a short bump (reaching 10 px, under two radii) at the hilum is kept; the same, longer, is not
    bump = right | _box(98, 103, 143, 154)
    assert np.array_equal(transforms.prune_lung(bump), bump)
    long_bump = _box(98, 103, 128, 154)
    assert not (transforms.prune_lung(right | long_bump) & long_bump & ~_band(right)).any()


def test_prune_removes_a_thin_bridge_between_the_lungs():
    left, right = _lung_pair()
    bridge = _box(59, 62, 90, 170)  # across the mediastinum: one component, split at the midline
    m = left | right | bridge
    r = transforms.split_lungs(m)
    assert not (r.lung & bridge & ~_band(left | right)).any()
    assert not ((r.lung ^ m) & ~_band(bridge)).any()


def test_disconnected_blob_is_removed():
    left, right = _lung_pair()
    blob = _disk(235, 128, 6)
    r = transforms.split_lungs(left | right | blob)
    assert not r.lung[blob].any()
    assert np.array_equal(r.lung, left | right)


def _lungs_with_sharp_angles():
    # image-left lung: apex, medial border, dome, sharp lateral costophrenic angle (~30 deg) at (228, 30)
    left = _polygon([(40, 80), (50, 100), (200, 108), (180, 62), (228, 30), (70, 44)])
    return left, left[:, ::-1].copy()


def test_prune_keeps_sharp_costophrenic_angles():
    from scipy import ndimage
    from skimage.morphology import disk

    left, right = _lungs_with_sharp_angles()
    m = left | right
    r = transforms.split_lungs(m)
    assert np.array_equal(r.lung, m) and np.array_equal(r.image_left, left)
    # meaningful: the opening that finds the body does cut the tips off; the tips come back
    radius = max(transforms.MIN_NECK_RADIUS, round(transforms.NECK_RADIUS_SHARE * float(np.sqrt(left.sum()))))
    opened = ndimage.binary_opening(left, structure=disk(radius, strict_radius=False))
    tip = left & (np.arange(_N)[:, None] >= 215)
    assert tip.any() and not (opened & tip).any()
    assert r.lung[tip].all()


def test_prune_does_not_cut_a_lung_with_a_large_concavity(monkeypatch):
    left, _ = _lungs_with_sharp_angles()
    # a big effusion meniscus: the base bitten away, a thin lateral tongue left down to the angle
    effusion = transforms.keep_largest(left & ~_disk(215, 80, 45), 1)[0]
    assert effusion[215:225, 28:40].any()
    r = transforms.split_lungs(effusion)
    assert np.array_equal(r.lung, effusion)
    # a tongue 3 px wide down the chest wall, below the lung's lower edge: kept like an angle
    _, right = _lung_pair()
    tongue = right | _box(160, 216, 213, 216)
    assert np.array_equal(transforms.prune_lung(tongue), tongue)
    # a lower part hanging below the upper lung on a narrow neck, but more than the guard share
    upper, lower = _ellipse(100, 190, 60, 30), _ellipse(195, 195, 25, 28)
    hourglass = upper | lower | _box(155, 175, 166, 172)
    assert (lower & ~upper).sum() > transforms.MAX_PRUNED_SHARE * hourglass.sum()
    assert np.array_equal(transforms.prune_lung(hourglass), hourglass)
    monkeypatch.setattr(transforms, "MAX_PRUNED_SHARE", 0.5)  # it is the guard that keeps it
    assert not transforms.prune_lung(hourglass)[lower & ~upper].any()


def test_prune_keeps_a_lung_that_merely_narrows(monkeypatch):
    _, right = _lung_pair()
    strip = _box(150, 201, 150, 166)  # the lung along the heart, wider than the disk
    blob = _box(213, 233, 148, 168)  # 20 px wide, below it
    narrowing = right | strip | _box(201, 213, 153, 164) | blob  # 11 px: wider than half the blob
    assert np.array_equal(transforms.prune_lung(narrowing), narrowing)
    monkeypatch.setattr(transforms, "NECK_CONTRAST", 1.0)  # it is the neck contrast that keeps it
    assert not transforms.prune_lung(narrowing)[blob].any()
    monkeypatch.undo()
    neck = right | strip | _box(201, 213, 156, 161) | blob  # 5 px: a neck
    out = transforms.prune_lung(neck)
    assert not out[blob].any() and not ((out ^ neck) & ~_box(200, 233, 0, _N)).any()


def test_prune_empty_and_one_lung():
    r = transforms.split_lungs(np.zeros((_N, _N), bool))
    assert not r.lung.any() and not r.image_left.any() and not r.image_right.any()
    assert not transforms.prune_lung(np.zeros((_N, _N), bool)).any()
    _, right = _lung_pair()
    bubble = _disk(230, 190, 14)
    r = transforms.split_lungs(right | bubble | _box(195, 222, 188, 193))
    assert not r.image_left.any() and not r.lung[bubble].any()
    assert not (right & ~r.image_right).any() and not (r.image_right & ~_band(right)).any()
    tiny = _box(10, 13, 10, 13)  # thinner than the disk everywhere: left alone
    assert np.array_equal(transforms.prune_lung(tiny), tiny)


@pytest.mark.parametrize("radius", [2, 3, 5, 6, 9])
def test_opening_is_the_library_opening_with_a_disk(real_masks, radius):
    from scipy import ndimage
    from skimage.morphology import disk

    rng = np.random.default_rng(radius)
    masks = [transforms.mask_to_network(m, _N) >= 0.5 for m in real_masks]
    masks += [ndimage.binary_opening(rng.random((80, 90)) < 0.6) for _ in range(5)]
    masks.append(_lung_pair()[1] | _box(195, 222, 188, 193) | _disk(230, 190, 14))
    for m in masks:
        box = np.pad(m, radius + 2)
        expected = ndimage.binary_opening(box, structure=disk(radius, strict_radius=False))
        assert np.array_equal(transforms._open_with_disk(ndimage.distance_transform_edt(box), radius), expected)


def test_prune_rejects_bad_input():
    with pytest.raises(ValueError):
        transforms.prune_lung(np.ones((4, 4, 4), bool))
    with pytest.raises(ValueError):
        transforms.split_lungs(np.ones(16, bool))


def test_prune_leaves_real_reference_lungs_alone(real_masks):
    for m in real_masks:
        small = transforms.mask_to_network(m, _N) >= transforms.MASK_THRESHOLD
        for side in transforms.keep_largest(small, 2):
            assert np.array_equal(transforms.prune_lung(side), side)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_prune_is_a_subset_and_keeps_the_guard_share(seed):
    rng = np.random.default_rng(seed)
    m = np.zeros((_N, _N), bool)
    for _ in range(rng.integers(1, 4)):  # lung-sized blobs
        m |= _ellipse(rng.integers(60, 200), rng.integers(40, 216), rng.integers(30, 90), rng.integers(15, 40))
    for _ in range(rng.integers(0, 4)):  # bubbles, spurs and bridges
        r0, c0 = rng.integers(0, _N - 10, size=2)
        if rng.random() < 0.5:
            m |= _disk(r0, c0, rng.integers(3, 20))
        else:
            m |= _box(r0, r0 + rng.integers(1, 6), c0, c0 + rng.integers(5, 80))
    for side in transforms.keep_largest(m, 2):
        side = fill_holes(side)
        out = transforms.prune_lung(side)
        assert not (out & ~side).any()
        assert out.sum() >= (1 - transforms.MAX_PRUNED_SHARE) * side.sum()
    r = transforms.split_lungs(m)
    assert not (r.lung & ~fill_holes(m)).any()
    assert not (r.image_left & r.image_right).any()


def test_a_sliver_of_lung_still_gives_a_tb_crop():
    """A segmentation of one or two pixels (a radiograph that is not a chest) used to fail the TB
    crop ("image is too small"); the crop is now at least TB_CROP_MIN_SIDE a side, inside the image."""
    image = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    for rows, cols in [((100, 101), (100, 102)), ((0, 1), (0, 1)), ((255, 256), (254, 256))]:
        mask = np.zeros((256, 256), bool)
        mask[rows[0]:rows[1], cols[0]:cols[1]] = True
        r0, r1, c0, c1 = transforms.lung_bbox(mask)
        assert r1 - r0 == transforms.TB_CROP_MIN_SIDE and c1 - c0 == transforms.TB_CROP_MIN_SIDE
        assert 0 <= r0 <= rows[0] and rows[1] <= r1 <= 256 and 0 <= c0 <= cols[0] and cols[1] <= c1 <= 256
        x = transforms.tb_input_for_lungs(image, mask, 224)
        assert x.shape == (2, 224, 224) and np.isfinite(x).all() and x[1].max() > 0
    big = np.zeros((256, 256), bool)
    big[40:200, 30:120] = True  # a real-sized lung keeps the box plus margin exactly
    assert transforms.lung_bbox(big) == (40 - 13, 200 + 13, 30 - 7, 120 + 7)
