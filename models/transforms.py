"""The one pre- and post-processing module shared by training, evaluation and the node.

Everything that happens to pixels between "a 2-D array in display orientation" and
"the network's input", and between "the network's probability map" and "a lung
mask in the original geometry", lives here, so training and inference cannot drift.

Pipeline (see :func:`preprocess` and :func:`probabilities_to_masks`):

1. ``resize_area`` -- antialiased (box/area) resampling of the whole image to a square
   ``size x size``. The aspect ratio is deliberately *not* kept: the training PNGs were
   resampled to a square the same way before they reached us.
2. ``normalize_intensity`` -- robust percentile scaling (``P_LOW`` -> 0, ``P_HIGH`` -> 1,
   clipped to [0, 1]), so 8-bit PNGs and 12-16-bit DICOM pixels land in the same range.
3. The network runs at ``size`` (a property of the trained model, stored with its weights).
4. Post-processing at network size (cheap): threshold, keep the two largest components,
   fill holes, split into the lung on the image's left and the one on its right
   (:func:`split_lungs`), and remove from each lung what is anatomically impossible: a piece
   hanging below it through a narrow neck (gastric or bowel gas taken as lung) and thin spurs
   (:func:`prune_lung`). Each lung's probability map is then resampled bilinearly to the
   original ``H x W`` and thresholded, which maps the geometry back with sub-pixel edges.

All functions are numpy/Pillow only (no torch; :func:`prune_lung` imports ``scipy.ndimage``
when first called) so the node can import them cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.components import fill_holes, label_components

#: Lower and upper percentile used for intensity normalisation.
P_LOW = 0.5
P_HIGH = 99.5
#: Probability threshold that turns the network output into a mask.
MASK_THRESHOLD = 0.5
#: A second component smaller than this share of the largest is not a lung.
MIN_SECOND_LUNG_SHARE = 0.1
#: A single component is split in two only if each image half holds at least this share.
MIN_SIDE_SHARE = 0.2

# Post-processing of each lung (:func:`prune_lung`), at network size. The rule has no fitted
# parameters; the values were chosen on the train split with both shipped segmenters, where they
# change no lung, while each looser value cuts lung that the reference mask keeps: NECK_CONTRAST
# 1.0 a Shenzhen retro-cardiac lower lobe on a mere narrowing (CHNCXR_0281_0, resunet),
# MAX_PRUNED_SHARE 0.3 a lower lobe on a 3 px neck (CHNCXR_0361_1, unet), SPUR_MIN_LENGTH 1.5 a
# medial sliver (CHNCXR_0293_0, resunet), spurs pointing down the costophrenic angles.

#: Radius of the disk that opens a lung to find its body, as a share of the square root of the
#: lung's area: about 5 px for a lung of 7,000 px at 256. A part joined to the body only through
#: a neck narrower than the disk (``2 r + 1`` px) falls off the opened body.
NECK_RADIUS_SHARE = 0.06
#: Smallest opening radius, px (for small lungs and small network sizes).
MIN_NECK_RADIUS = 2
#: A piece with a wide part of its own that hangs below the body is removed only if that part is
#: at least this many times as wide as the neck it hangs on (a gastric bubble on a thin neck,
#: not a lung that merely narrows, like a retro-cardiac lower lobe along the heart).
NECK_CONTRAST = 2.0
#: A piece without a wide part is a spur when it is at most this share of the radius wide
#: (half-width), i.e. at most about half as wide as the necks the opening removes ...
SPUR_MAX_HALF_WIDTH = 0.5
#: ... and it reaches at least this many radii out of the body (the thin medial slivers and apex
#: tips of real lungs reach up to about 1.6). A spur that points down from the lung's lower edge
#: is kept: it cannot be told from a sharp costophrenic angle, whose tip is as thin.
SPUR_MIN_LENGTH = 2.0
#: Post-processing never removes more than this share of a lung (a guard, so a real lung of odd
#: shape is not cut in half); an opened part at least this large is part of the lung's body.
MAX_PRUNED_SHARE = 0.15


def _as_2d_mask(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _as_2d_float(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"image is too small: {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("image contains NaN or infinite values")
    return arr


def resize_area(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resample a 2-D array to ``size`` (int = square) with an area (box) filter.

    Area averaging is the antialiased choice for the large downsampling factors of
    full-size radiographs (e.g. 4096 -> 256). For an integer factor it is the exact
    block mean. Returns float32.
    """
    arr = _as_2d_float(image)
    h, w = (size, size) if isinstance(size, int) else size
    if arr.shape == (h, w):
        return arr.copy()
    out = Image.fromarray(arr, mode="F").resize((w, h), resample=Image.Resampling.BOX)
    return np.asarray(out, dtype=np.float32)


def resize_bilinear(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a probability map bilinearly to ``shape`` (H, W); float32."""
    arr = _as_2d_float(prob)
    h, w = shape
    if arr.shape == (h, w):
        return arr.copy()
    out = Image.fromarray(arr, mode="F").resize((w, h), resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Scale ``P_LOW``..``P_HIGH`` percentiles to 0..1 and clip; float32.

    A flat image (no contrast) maps to all zeros rather than dividing by zero.
    """
    arr = _as_2d_float(image)
    lo, hi = np.percentile(arr, [P_LOW, P_HIGH])
    if not hi > lo:
        return np.zeros_like(arr)
    out = (arr - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Display-oriented image of any size and range -> network input ``size x size`` in [0, 1].

    The one entry point used by training (on the 512 PNGs), evaluation and the node
    (on full-size DICOM pixels after Modality/VOI LUT and MONOCHROME1 inversion).
    """
    return normalize_intensity(resize_area(image, size))


def mask_to_network(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary mask -> soft training target at network size (area fraction in [0, 1])."""
    return resize_area(np.asarray(mask) > 0, size)


@dataclass(frozen=True)
class LungMasks:
    """Post-processed lung masks, all of the same shape."""

    lung: np.ndarray
    image_left: np.ndarray
    image_right: np.ndarray


def keep_largest(mask: np.ndarray, n: int = 2) -> list[np.ndarray]:
    """The ``n`` largest 8-connected components of ``mask``, largest first."""
    labels, sizes = label_components(mask, connectivity=8)
    order = np.argsort(sizes)[::-1][:n]
    return [labels == (int(i) + 1) for i in order if sizes[i] > 0]


def _valley_column(component: np.ndarray) -> int:
    """Column between two touching lungs: the thinnest column in the middle of the blob."""
    cols = np.flatnonzero(component.any(axis=0))
    c0, c1 = int(cols[0]), int(cols[-1])
    width = c1 - c0 + 1
    a, b = c0 + width // 4, c0 + (3 * width) // 4 + 1
    profile = component[:, a:b].sum(axis=0).astype(np.float64)
    # Smooth a little so a single ragged column does not decide the split.
    k = max(1, width // 40)
    profile = np.convolve(profile, np.ones(2 * k + 1) / (2 * k + 1), mode="same")
    return a + int(np.argmin(profile))


def split_lungs(mask: np.ndarray) -> LungMasks:
    """Post-process a binary lung mask and split it into image-left and image-right lungs.

    Keeps the two largest components (a second one smaller than
    ``MIN_SECOND_LUNG_SHARE`` of the first is dropped as debris), fills holes in each,
    and assigns each component to a side by its centroid. If one component spans both
    halves of the image (lungs touching, e.g. over the heart or at the apices), it is cut
    at the thinnest column of the middle half of its extent -- the mediastinal midline.
    Each lung is then pruned (:func:`prune_lung`): a piece hanging below it through a narrow
    neck and thin spurs are removed.
    """
    mask = _as_2d_mask(mask)
    w = mask.shape[1]
    comps = keep_largest(mask, 2)
    empty = np.zeros_like(mask)
    if not comps:
        return LungMasks(empty, empty.copy(), empty.copy())
    if len(comps) == 2 and comps[1].sum() < MIN_SECOND_LUNG_SHARE * comps[0].sum():
        comps = comps[:1]
    comps = [fill_holes(c) for c in comps]
    if len(comps) == 1:
        c = comps[0]
        half = w // 2
        left_share = c[:, :half].sum() / max(1, c.sum())
        if min(left_share, 1 - left_share) >= MIN_SIDE_SHARE:
            col = _valley_column(c)
            left, right = c.copy(), c.copy()
            left[:, col:] = False
            right[:, :col] = False
        elif left_share >= 0.5:
            left, right = c, empty.copy()
        else:
            left, right = empty.copy(), c
    else:
        xs = [np.nonzero(c)[1].mean() for c in comps]
        left, right = (comps[0], comps[1]) if xs[0] <= xs[1] else (comps[1], comps[0])
    left, right = prune_lung(left), prune_lung(right)
    return LungMasks(left | right, left, right)


def _lower_edge(body: np.ndarray) -> np.ndarray:
    """Row of the body's lowest pixel in every column (float); columns beside the body take
    the nearest body column's."""
    bottom = np.where(body, np.arange(body.shape[0])[:, None], -1).max(axis=0)
    cols = np.flatnonzero(bottom >= 0)
    return np.interp(np.arange(body.shape[1]), cols, bottom[cols].astype(np.float64))


def _open_with_disk(inside: np.ndarray, radius: int) -> np.ndarray:
    """Morphological opening of a mask with ``skimage.morphology.disk(radius, strict_radius=False)``
    (the pixels within ``radius + 0.5``: a round disk, without the one-pixel tips at its poles
    that slip through a neck one pixel wide), from the mask's distance map ``inside``.

    The same pixels as ``scipy.ndimage.binary_opening`` with that footprint (a test checks it),
    in two distance transforms instead of two passes of a 13 x 13 footprint: the erosion is
    where the background is farther than the disk, the dilation what lies within the disk of
    the erosion. Needs a frame of background at least ``radius + 1`` wide around the mask.
    """
    from scipy import ndimage

    reach = radius + 0.5  # a squared distance is an integer, never exactly reach ** 2
    eroded = inside > reach
    if not eroded.any():
        return eroded
    return ndimage.distance_transform_edt(~eroded) <= reach


def _neck_half_width(inside: np.ndarray, part: np.ndarray, body: np.ndarray) -> float:
    """Half-width of the widest path between ``part`` and ``body``: the largest ``t`` for which
    the pixels at least ``t`` from the background (``inside``, a distance map) still join them."""
    from scipy import ndimage

    eight = np.ones((3, 3), dtype=bool)
    values = np.unique(inside[(inside > 0) & (inside <= inside[part].max())])
    best, lo, hi = 0.0, 0, len(values) - 1
    while lo <= hi:  # joined at t means joined at every smaller t: bisect
        mid = (lo + hi) // 2
        deep = inside >= values[mid]
        labels, _ = ndimage.label(deep, structure=eight)
        if np.intersect1d(labels[part & deep], labels[body & deep]).size:
            best, lo = float(values[mid]), mid + 1
        else:
            hi = mid - 1
    return best


def prune_lung(lung: np.ndarray) -> np.ndarray:
    """Remove from one lung what is anatomically impossible; a subset of ``lung`` (bool).

    The lung is opened with a disk of radius ``NECK_RADIUS_SHARE * sqrt(area)`` (at least
    ``MIN_NECK_RADIUS``); its largest opened part, and any other of at least
    ``MAX_PRUNED_SHARE`` of the lung, is the body. Each connected piece of the lung outside the
    body is then removed if

    * it holds an opened part of its own (it is wide somewhere) that lies below the body's lower
      edge and is at least ``NECK_CONTRAST`` times as wide as the neck joining it to the body --
      gas below the diaphragm hanging on the lung base; or
    * it is thin everywhere (half-width at most ``SPUR_MAX_HALF_WIDTH`` radii), reaches at least
      ``SPUR_MIN_LENGTH`` radii out of the body and does not point down from its lower edge -- a
      spur or bridge along the mediastinum or outside the ribcage.

    Everything else keeps its original edge: the opening only decides, it does not round the
    costophrenic angles off. Pieces are removed smallest first while the total stays within
    ``MAX_PRUNED_SHARE`` of the lung.
    """
    from scipy import ndimage

    lung = _as_2d_mask(lung)
    area = int(lung.sum())
    if area == 0:
        return lung.copy()
    radius = max(MIN_NECK_RADIUS, round(NECK_RADIUS_SHARE * float(np.sqrt(area))))
    # Work on the lung's bounding box plus a frame of background as wide as the disk, so that a
    # lung touching the image's edge has background beyond it for the distance maps too.
    rows, cols = np.flatnonzero(lung.any(axis=1)), np.flatnonzero(lung.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    pad = radius + 2
    box = np.pad(lung[r0:r1, c0:c1], pad)
    eight = np.ones((3, 3), dtype=bool)
    inside = ndimage.distance_transform_edt(box)  # half-width: distance to the background
    opened = _open_with_disk(inside, radius)
    parts, n_parts = ndimage.label(opened, structure=eight)
    if n_parts == 0:  # thinner than the disk everywhere: nothing to tell body from debris
        return lung.copy()
    part_sizes = np.bincount(parts.ravel(), minlength=n_parts + 1)[1:]
    body_ids = np.flatnonzero((part_sizes == part_sizes.max()) | (part_sizes >= MAX_PRUNED_SHARE * area)) + 1
    body = np.isin(parts, body_ids)
    pieces, n_pieces = ndimage.label(box & ~body, structure=eight)
    if n_pieces == 0:
        return lung.copy()
    from_body = ndimage.distance_transform_edt(~body)
    lower_edge = _lower_edge(body)
    # per piece (label k at index k): size, farthest reach out of the body, largest half-width
    in_piece = pieces > 0
    labels = pieces[in_piece]
    sizes = np.bincount(labels, minlength=n_pieces + 1)
    reach, half_width = np.zeros(n_pieces + 1), np.zeros(n_pieces + 1)
    np.maximum.at(reach, labels, from_body[in_piece])
    np.maximum.at(half_width, labels, inside[in_piece])
    has_core = np.bincount(pieces[opened], minlength=n_pieces + 1) > 0
    doomed: list[tuple[int, int]] = []
    for k in range(1, n_pieces + 1):
        if has_core[k]:
            core = (pieces == k) & opened
            core_rows, core_cols = np.nonzero(core)
            below = np.mean(core_rows > lower_edge[core_cols]) > 0.5
            if below and inside[core].max() >= NECK_CONTRAST * _neck_half_width(inside, core, body):
                doomed.append((int(sizes[k]), k))
        elif reach[k] >= SPUR_MIN_LENGTH * radius and half_width[k] <= SPUR_MAX_HALF_WIDTH * radius:
            ys, xs = np.nonzero(pieces == k)
            tip = int(np.argmax(from_body[ys, xs]))
            if ys[tip] <= lower_edge[xs[tip]]:  # not pointing down from the lower edge
                doomed.append((int(sizes[k]), k))
    removed, budget = [], MAX_PRUNED_SHARE * area
    for size, k in sorted(doomed):
        if size <= budget:
            removed.append(k)
            budget -= size
    out = lung.copy()
    if removed:
        out[r0:r1, c0:c1] &= ~np.isin(pieces, removed)[pad:-pad, pad:-pad]
    return out


def _resize_region(soft: np.ndarray, support: np.ndarray, shape: tuple[int, int], pad: int = 2) -> np.ndarray:
    """Bilinear resample of ``soft`` to ``shape``, computed only around ``support``'s bounding box.

    Equivalent to ``resize_bilinear(soft, shape)`` when ``soft`` is zero more than ``pad - 1``
    pixels outside ``support`` (as it is here), but touches only the lung's region of the
    large output, which matters at 4096 x 4096.
    """
    s_h, s_w = soft.shape
    h, w = shape
    rows, cols = np.flatnonzero(support.any(axis=1)), np.flatnonzero(support.any(axis=0))
    r0, r1 = max(0, int(rows[0]) - pad), min(s_h, int(rows[-1]) + 1 + pad)
    c0, c1 = max(0, int(cols[0]) - pad), min(s_w, int(cols[-1]) + 1 + pad)
    R0, R1 = int(np.floor(r0 * h / s_h)), min(h, int(np.ceil(r1 * h / s_h)))
    C0, C1 = int(np.floor(c0 * w / s_w)), min(w, int(np.ceil(c1 * w / s_w)))
    box = (C0 * s_w / w, R0 * s_h / h, C1 * s_w / w, R1 * s_h / h)
    part = Image.fromarray(np.ascontiguousarray(soft, dtype=np.float32), mode="F").resize(
        (C1 - C0, R1 - R0), resample=Image.Resampling.BILINEAR, box=box
    )
    out = np.zeros(shape, dtype=np.float32)
    out[R0:R1, C0:C1] = np.asarray(part, dtype=np.float32)
    return out


def probabilities_to_masks(
    prob: np.ndarray, shape: tuple[int, int], threshold: float = MASK_THRESHOLD
) -> LungMasks:
    """Network probability map (``size x size``) -> post-processed lungs at ``shape`` (H, W).

    Components and sides are decided at network size; each side's probabilities
    (restricted to its component, holes set to 1) are resampled bilinearly to the
    original geometry and thresholded, so the edge lies where the network put it.
    """
    prob = _as_2d_float(prob)
    return resample_lungs(prob, split_lungs(prob >= threshold), shape, threshold)


def resample_lungs(prob: np.ndarray, small: LungMasks, shape: tuple[int, int],
                   threshold: float = MASK_THRESHOLD) -> LungMasks:
    """:func:`probabilities_to_masks` for lungs already split at network size (``small``, which
    ``split_lungs(prob >= threshold)`` gave), so a caller that needs them too splits once."""
    prob = _as_2d_float(prob)
    out: list[np.ndarray] = []
    for side in (small.image_left, small.image_right):
        if not side.any():
            out.append(np.zeros(shape, dtype=bool))
            continue
        soft = np.where(side, np.maximum(prob, threshold + 1e-3), 0.0).astype(np.float32)
        # Holes were filled at network size and every value inside is above the threshold,
        # so bilinear interpolation cannot open new holes: no full-size hole filling needed.
        out.append(_resize_region(soft, side, shape) >= threshold)
    left, right = out
    right &= ~left  # the cut between touching lungs must not overlap after resampling
    return LungMasks(left | right, left, right)


def mask_roundtrip(mask: np.ndarray, size: int) -> np.ndarray:
    """A binary mask mapped to network size and back (what the geometry costs); bool."""
    small = mask_to_network(mask, size)
    return resize_bilinear(small, np.asarray(mask).shape) >= MASK_THRESHOLD


# --------------------------------------------------------------------------- TB input

#: Margin around the lung bounding box, as a share of the box size, for the TB crop.
TB_CROP_MARGIN = 0.08


#: The TB crop is at least this many pixels on each side (a sliver of "lung" would not resample).
TB_CROP_MIN_SIDE = 8


def _widen(lo: int, hi: int, extent: int, side: int) -> tuple[int, int]:
    """[lo, hi) grown about its centre to at least ``side`` pixels, kept inside [0, extent)."""
    side = min(side, extent)
    if hi - lo >= side:
        return lo, hi
    lo = max(0, min((lo + hi - side) // 2, extent - side))
    return lo, lo + side


def lung_bbox(mask: np.ndarray, margin: float = TB_CROP_MARGIN) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of the mask's bounding box plus a margin, at least ``TB_CROP_MIN_SIDE``
    pixels a side (a segmentation of a few pixels still gives a crop); whole image if empty."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, h, 0, w
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    mr, mc = round((r1 - r0) * float(margin)), round((c1 - c0) * float(margin))
    r0, r1 = _widen(max(0, r0 - mr), min(h, r1 + mr), h, TB_CROP_MIN_SIDE)
    c0, c1 = _widen(max(0, c0 - mc), min(w, c1 + mc), w, TB_CROP_MIN_SIDE)
    return r0, r1, c0, c1


def tb_input(net_image: np.ndarray, lung_prob: np.ndarray, size: int) -> np.ndarray:
    """Two-channel TB-scorer input: lung-cropped image and lung mask, ``2 x size x size``.

    ``net_image`` is the output of :func:`preprocess`; ``lung_prob`` the segmenter's
    probabilities at the same size. The crop is the lungs' bounding box (plus margin),
    resampled to a square (bilinear; Pillow antialiases when shrinking) and re-normalised.
    """
    return tb_input_for_lungs(net_image, split_lungs(np.asarray(lung_prob) >= MASK_THRESHOLD).lung, size)


def tb_input_for_lungs(net_image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """:func:`tb_input` from the lungs already split at network size: ``mask`` is
    ``split_lungs(lung_prob >= MASK_THRESHOLD).lung``."""
    r0, r1, c0, c1 = lung_bbox(mask)
    img = normalize_intensity(resize_bilinear(net_image[r0:r1, c0:c1], (size, size)))
    m = resize_bilinear(mask[r0:r1, c0:c1].astype(np.float32), (size, size))
    return np.stack([img, m]).astype(np.float32)
