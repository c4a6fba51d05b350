"""Simulated acquisition shifts: what other detectors, processing and digitised film do to a radiograph.

Each shift is a named, parameterised transform of a 2-D display-oriented image (any size), random
but fully determined by the :class:`numpy.random.Generator` it is given. They serve two purposes:
TB training augmentation (``cxrnode train tb --shift-copies``, :mod:`models.training.tb`: the raw
image is shifted, then segmented and cropped as the node would) and the stress test
``cxrnode evaluate --shift NAME[,NAME...]`` (:func:`models.evaluation.evaluate`), which measures how
the shipped models' figures move under each shift. They are *simulations*: no substitute for
images from other sources.

Shifts, with what their ``strength`` means (:attr:`Shift.strength_means`) and its default:

========  ======================================================================  =======
gamma     |ln gamma| in 0.25-1 x strength (either sign); S-curve steepness 6-15 x   0.4
blur      Gaussian sigma as a share of the shorter side, drawn in 0.5-1 x           0.005
noise     noise SD at mid-grey as a share of the range, drawn in 0.5-1 x            0.04
border    widest border as a share of that side's length, each 0.25-1 x             0.08
text      text height as a share of the image height, each 0.75-1.25 x              0.04
crop      most cut from each side as a share of that side, each 0-1 x (<= 0.45)     0.15
invert    not used: polarity is binary                                              1.0
film      scales every part of the composite (1 = a typical digitised film)         1.0
========  ======================================================================  =======

Value range: the input's range is kept. ``uint8`` is 0..255; any other dtype uses the image's own
minimum and maximum (a float 0..255 PNG, a [0, 1] network input, 12-bit DICOM pixels), unless
``value_range`` is given. "White" and "black" (borders, text) are the top and bottom of that range,
and the output is clipped to it and returned in the input's dtype (integers rounded). A flat image
(no range) comes back unchanged.

Masks: only ``crop`` moves anatomy, so :func:`apply_with_mask` crops the mask with the image (by the
same share of each side, so a mask of another size than the image stays aligned). The others keep the
mask as it is. ``border`` deliberately does *not* remove the lung it covers from a reference mask: the
reference is the anatomy, and lung hidden under a collimator blade or scanner frame counts as missed,
as it would in service (the node reports the lung it sees). With the default widths the borders rarely
reach the lungs of a PA film: on the val split (``cxrnode evaluate --shift border``'s draws) they cover
0.09 % of the reference lung on average, at most 6.3 % (one case of 83 above 1 %).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: The name that means "no shift" in lists of shifts (``cxrnode evaluate --shift``).
NONE = "none"

_Core = Callable[[np.ndarray, np.random.Generator, float, "np.ndarray | None"], "tuple[np.ndarray, np.ndarray | None]"]


@dataclass(frozen=True)
class Shift:
    """A registered shift: its core on [0, 1] float images, default strength and what the strength means."""

    name: str
    core: _Core
    default_strength: float
    strength_means: str
    #: whether the shift moves anatomy, so a mask has to follow (:func:`apply_with_mask`)
    geometric: bool = False

    @property
    def mimics(self) -> str:
        """The real acquisition it imitates (the first line of the public function's docstring)."""
        return (self.core.__doc__ or "").strip().splitlines()[0]


#: name -> :class:`Shift`, in a fixed order (filled by :func:`_register`).
SHIFTS: dict[str, Shift] = {}


def names() -> tuple[str, ...]:
    """The known shift names, in registry order."""
    return tuple(SHIFTS)


def get(name: str) -> Shift:
    """The registered shift ``name``; ValueError naming the known shifts otherwise."""
    try:
        return SHIFTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown acquisition shift {name!r}; known: {', '.join(SHIFTS)}") from None


def _check_strength(name: str, strength: float | None) -> float:
    shift = get(name)
    if strength is None:
        return shift.default_strength
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength of shift {name!r} must be a number, got {strength!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"strength of shift {name!r} must be a finite number >= 0, got {strength!r}")
    return value


# ------------------------------------------------------------------------------ value range


def value_range_of(image: np.ndarray) -> tuple[float, float]:
    """The range a shift keeps: 0..255 for uint8, otherwise the image's own minimum and maximum."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return 0.0, 255.0
    return float(arr.min()), float(arr.max())


def _check_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"image is too small: {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"expected an integer or float image, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError("image contains NaN or infinite values")
    return arr


def _to_unit(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((arr.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _from_unit(x: np.ndarray, lo: float, hi: float, dtype: np.dtype) -> np.ndarray:
    out = lo + np.clip(x, 0.0, 1.0) * (hi - lo)
    if np.issubdtype(dtype, np.integer):
        out = np.rint(out)
    return np.clip(out, lo, hi).astype(dtype)


# ------------------------------------------------------------------------------ public entry points


def apply(name: str, image: np.ndarray, rng: np.random.Generator, strength: float | None = None,
          value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Shift ``name`` applied to ``image`` (same shape, dtype and value range); ``strength`` None = default."""
    return apply_with_mask(name, image, None, rng, strength, value_range)[0]


def apply_with_mask(name: str, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator,
                    strength: float | None = None, value_range: tuple[float, float] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """(shifted image, mask moved with it). Geometric shifts (``crop``) transform the mask by the same
    share of each side, whatever its size; the others return it unchanged. A bool mask comes back bool
    (resampled bilinearly, cut at 0.5), a float mask float. The image is the same as :func:`apply`'s for
    the same generator state."""
    shift = get(name)
    s = _check_strength(name, strength)
    arr = _check_image(image)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    m = None
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim != 2:
            raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    lo, hi = value_range_of(arr) if value_range is None else (float(value_range[0]), float(value_range[1]))
    if not hi > lo:
        return arr.copy(), (None if m is None else m.copy())
    x = _to_unit(arr, lo, hi)
    m_in = None if m is None or not shift.geometric else m.astype(np.float64)
    y, m_out = shift.core(x, rng, s, m_in)
    out = _from_unit(y, lo, hi, arr.dtype)
    if m is None:
        return out, None
    if not shift.geometric:
        return out, m.copy()
    if m.dtype == bool:
        return out, m_out >= 0.5
    return out, m_out.astype(m.dtype)


@dataclass(frozen=True)
class ShiftSpec:
    """One entry of a list of shifts: a name and a strength (None = the shift's default)."""

    name: str
    strength: float | None = None

    @property
    def label(self) -> str:
        """``name``, or ``name:strength`` when a strength was given."""
        return self.name if self.strength is None else f"{self.name}:{self.strength:g}"


def parse_specs(text: str | Iterable[str]) -> list[ShiftSpec]:
    """``"invert,blur:0.01"`` (or a list of such items) -> specs, in order, without repeats.

    ``none`` (no shift) is accepted. ValueError for an unknown name (naming the known ones), a bad
    strength or an empty list.
    """
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in str(t).split(",")]
    specs: list[ShiftSpec] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, _, value = item.partition(":")
        name = name.strip().lower()
        if name == NONE:
            if value:
                raise ValueError("shift 'none' takes no strength")
            spec = ShiftSpec(NONE)
        else:
            get(name)
            spec = ShiftSpec(name, _check_strength(name, value.strip()) if value else None)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ValueError(f"no acquisition shift named; known: {', '.join(SHIFTS)}")
    return specs


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def case_rng(seed: int, case_id: str, label: str) -> np.random.Generator:
    """The generator of one case under one shift: fixed by ``seed``, the case id and the shift's label, so
    reruns draw the same and adding a shift to a list does not change the others' draws."""
    return np.random.default_rng([int(seed), _stable_int(case_id), _stable_int(label)])


# ------------------------------------------------------------------------------ building blocks


def s_curve(x: np.ndarray, steepness: float, midpoint: float = 0.5, inverse: bool = False) -> np.ndarray:
    """A monotone S-shaped LUT on [0, 1] with 0 -> 0 and 1 -> 1: a logistic of ``steepness`` around
    ``midpoint`` rescaled to the unit interval (the film characteristic curve's toe and shoulder);
    ``inverse`` gives its inverse, which flattens mid-tones instead. Steepness near 0 is the identity."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    if steepness < 1e-3:
        return x.copy()
    a = 1.0 / (1.0 + math.exp(steepness * midpoint))
    b = 1.0 / (1.0 + math.exp(-steepness * (1.0 - midpoint)))
    if not inverse:
        return (1.0 / (1.0 + np.exp(-steepness * (x - midpoint))) - a) / (b - a)
    p = np.clip(a + x * (b - a), 1e-12, 1 - 1e-12)
    return np.clip(midpoint + np.log(p / (1.0 - p)) / steepness, 0.0, 1.0)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (scikit-image; edges extended), ``sigma`` in pixels; the identity for sigma <= 0."""
    if sigma <= 0:
        return x.copy()
    from skimage.filters import gaussian

    return gaussian(x, sigma=sigma, mode="nearest", truncate=4.0, preserve_range=True)


def crop_fractions(rng: np.random.Generator, strength: float) -> tuple[float, float, float, float]:
    """The share cut from (top, bottom, left, right), each uniform in [0, strength]; ``crop`` draws
    these first, so a caller holding the same generator state can predict its geometry."""
    top, bottom, left, right = (float(v) for v in rng.uniform(0.0, strength, size=4))
    return top, bottom, left, right


def crop_resize(x: np.ndarray, fractions: tuple[float, float, float, float]) -> np.ndarray:
    """Cut the shares (top, bottom, left, right) off a float array and resample the rest (bilinear,
    sub-pixel box) back to its shape. Relative, so an image and a mask of another size stay aligned."""
    top, bottom, left, right = fractions
    if min(fractions) < 0 or top + bottom >= 1 or left + right >= 1:
        raise ValueError(f"crop fractions must be >= 0 and leave some image, got {fractions}")
    h, w = x.shape
    box = (left * w, top * h, w - right * w, h - bottom * h)
    out = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32), mode="F").resize(
        (w, h), resample=Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.float64)


def _signal_noise(x: np.ndarray, rng: np.random.Generator, level: float) -> np.ndarray:
    """White noise whose variance grows with the grey value: level^2 * (0.3 + 1.4 x), level at mid-grey."""
    return rng.standard_normal(x.shape) * (level * np.sqrt(0.3 + 1.4 * x))


def _draw_border(x: np.ndarray, rng: np.random.Generator, widest: float) -> np.ndarray:
    h, w = x.shape
    sides = rng.random(4) < 0.5  # top, bottom, left, right
    pick = int(rng.integers(4))
    if not sides.any():
        sides[pick] = True
    shares = rng.uniform(0.25, 1.0, size=4) * widest
    value = 0.0 if rng.random() < 0.5 else 1.0
    out = x.copy()
    for i, (on, share) in enumerate(zip(sides, shares)):
        if not on:
            continue
        n = max(1, round(float(share) * (h if i < 2 else w)))
        n = min(n, (h if i < 2 else w) // 2)
        if i == 0:
            out[:n, :] = value
        elif i == 1:
            out[h - n:, :] = value
        elif i == 2:
            out[:, :n] = value
        else:
            out[:, w - n:] = value
    return out


_WORDS = ("L", "R", "L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "CHEST", "AP SITTING", "MOBILE", "INSP")


def _random_string(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.7:
        return _WORDS[int(rng.integers(len(_WORDS)))]
    y, mo, d = int(rng.integers(1995, 2025)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    if kind < 0.85:
        return f"{y:04d}-{mo:02d}-{d:02d}" if rng.random() < 0.5 else f"{d:02d}/{mo:02d}/{y:04d}"
    return f"ID {int(rng.integers(100000, 1000000))}"


def _glyphs(text: str) -> np.ndarray:
    """``text`` in Pillow's default bitmap font, as a bool array cut to its ink."""
    font = ImageFont.load_default_imagefont()
    _, _, x1, y1 = font.getbbox(text)
    canvas = Image.new("L", (x1 + 2, y1 + 2), 0)
    ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=font)
    ink = np.asarray(canvas) > 127
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


# ------------------------------------------------------------------------------ the shifts


def _register(name: str, default: float, means: str, geometric: bool = False) -> Callable[[_Core], _Core]:
    def deco(core: _Core) -> _Core:
        SHIFTS[name] = Shift(name, core, default, means, geometric)
        return core

    return deco


@_register("gamma", 0.4, "|ln gamma| drawn in 0.25-1 x strength (either sign); S-curve steepness 6-15 x strength")
def _gamma(x: np.ndarray, rng: np.random.Generator, s: float, mask: np.ndarray | None):
    """Another detector's default processing or film's characteristic curve: gamma and an S-shaped (or flattening) LUT."""
    g = math.exp(float(rng.choice([-1.0, 1.0])) * float(rng.uniform(0.25, 1.0)) * s)
    k = float(rng.uniform(0.4, 1.0)) * 15.0 * s
    mid = float(rng.uniform(0.35, 0.65))
    inverse = bool(rng.random() < 0.3)
    return s_curve(x ** g, k, mid, inverse), mask


@_register("blur", 0.005, "Gaussian sigma as a share of the shorter side, drawn in 0.5-1 x strength")
def _blur(x: np.ndarray, rng: np.random.Generator, s: float, mask: np.ndarray | None):
    """Digitised film or a soft detector (lower MTF): Gaussian blur scaled to the image size."""
    sigma = float(rng.uniform(0.5, 1.0)) * s * min(x.shape)
    return gaussian_blur(x, sigma), mask


@_register("noise", 0.04, "noise standard deviation at mid-grey as a share of the range, drawn in 0.5-1 x strength")
def _noise(x: np.ndarray, rng: np.random.Generator, s: float, mask: np.ndarray | None):
    """A lower dose or a noisier detector: Poisson-Gaussian quantum noise (variance a*x + b, brighter = fewer photons)."""
    level = float(rng.uniform(0.5, 1.0)) * s
    return np.clip(x + _signal_noise(x, rng, level), 0.0, 1.0), mask


@_register("border", 0.08, "widest border as a share of the side's length, each drawn in 0.25-1 x strength")
def _border(x: np.ndarray, rng: np.random.Generator, s: float, mask: np.ndarray | None):
    """Collimator blades or a film scanner's frame: black or white bands of random widths on random sides."""
    return _draw_border(x, rng, s), mask


@_register("text", 0.04, "text height as a share of the image height, each string 0.75-1.25 x strength")
def _text(x: np.ndarray, rng: np.random.Generator, s: float, mask: np.ndarray | None):
    """Burned-in annotations: side markers, view, PORTABLE, dates and IDs written into the pixels, white or black."""
    h, w = x.shape
    out = x.copy()
    for _ in range(int(rng.integers(2, 5))):
        ink = _glyphs(_random_string(rng))
        th = max(5, round(s * h * float(rng.uniform(0.75, 1.25))))
        tw = max(1, min(w, round(ink.shape[1] * th / ink.shape[0])))
        th = min(th, h)
        big = np.asarray(Image.fromarray(ink.astype(np.uint8) * 255).resize((tw, th), Image.Resampling.NEAREST)) > 127
        r0 = int(rng.integers(0, h - th + 1))
        c0 = int(rng.integers(0, w - tw + 1))
        value = 1.0 if rng.random() < 0.75 else 0.0
        boxed = bool(rng.random() < 0.25)
        region = out[r0:r0 + th, c0:c0 + tw]
        if boxed:  # a label box of the opposite value behind the text
            region[...] = 1.0 - value
        region[big] = value
    return out, mask


@_register("crop", 0.15, "most cut from each side as a share of that side, each drawn in 0-1 x strength (at most 0.45)", geometric=True)
def _crop(x: np.ndarray, rng: np.random.Generator, s: float, mask: np.ndarray | None):
    """Tighter collimation or another field of view: a random crop of each side, resized back to the input's shape."""
    fr = crop_fractions(rng, min(s, 0.45))
    return crop_resize(x, fr), (None if mask is None else crop_resize(mask, fr))


@_register("invert", 1.0, "not used: polarity is binary")
def _invert(x: np.ndarray, rng: np.random.Generator, s: float, mask: np.ndarray | None):
    """Inverted polarity: a MONOCHROME1 image shown without its photometric interpretation applied."""
    return 1.0 - x, mask


@_register("film", 1.0, "scales every part of the composite (1 = a typical digitised film)")
def _film(x: np.ndarray, rng: np.random.Generator, s: float, mask: np.ndarray | None):
    """A digitised screen-film radiograph: characteristic curve, base fog, grain, scanner blur, uneven light, frame."""
    h, w = x.shape
    g = math.exp(float(rng.uniform(-0.3, 0.3)) * s)
    k = float(rng.uniform(5.0, 9.0)) * s
    mid = float(rng.uniform(0.4, 0.6))
    y = s_curve(x ** g, k, mid)
    fog = float(rng.uniform(0.02, 0.08)) * s  # base + fog: the film is never fully clear
    top = 1.0 - float(rng.uniform(0.0, 0.05)) * s  # the shoulder: maximum density
    y = fog + y * (top - fog)
    grain = gaussian_blur(rng.standard_normal(x.shape), 0.7)
    grain /= max(float(grain.std()), 1e-12)
    y = y + grain * float(rng.uniform(0.01, 0.025)) * s * np.sqrt(0.3 + 1.4 * y)
    y = gaussian_blur(y, float(rng.uniform(0.5, 1.0)) * 0.004 * s * min(h, w))
    angle = float(rng.uniform(0.0, 2 * math.pi))
    rr, cc = np.mgrid[0:h, 0:w]
    ramp = (math.cos(angle) * (cc / max(w - 1, 1) - 0.5) + math.sin(angle) * (rr / max(h - 1, 1) - 0.5))
    y = y + float(rng.uniform(0.0, 0.06)) * s * ramp  # a lightbox or scanner lamp that is not even
    y = _draw_border(np.clip(y, 0.0, 1.0), rng, 0.06 * s)
    return y, mask


# Public, documented functions: one per shift, image in, image out (same dtype and range).


def _public(name: str) -> Callable[..., np.ndarray]:
    shift = SHIFTS[name]

    def fn(image: np.ndarray, rng: np.random.Generator, strength: float | None = None,
           value_range: tuple[float, float] | None = None) -> np.ndarray:
        return apply(name, image, rng, strength, value_range)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (f"{shift.mimics}\n\n``strength``: {shift.strength_means} (default {shift.default_strength:g}). "
                  "Same shape, dtype and value range as ``image`` (:func:`apply`).")
    return fn


gamma = _public("gamma")
blur = _public("blur")
noise = _public("noise")
border = _public("border")
text = _public("text")
crop = _public("crop")
invert = _public("invert")
film = _public("film")
