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
   (:func:`split_lungs`). Each lung's probability map is then resampled bilinearly to the
   original ``H x W`` and thresholded, which maps the geometry back with sub-pixel edges.

All functions are numpy/Pillow only (no torch) so the node can import them cheaply.
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
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
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
    return LungMasks(left | right, left, right)


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


def lung_bbox(mask: np.ndarray, margin: float = TB_CROP_MARGIN) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of the mask's bounding box plus a margin; whole image if empty."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, h, 0, w
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    mr, mc = int(round((r1 - r0) * margin)), int(round((c1 - c0) * margin))
    return max(0, r0 - mr), min(h, r1 + mr), max(0, c0 - mc), min(w, c1 + mc)


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
