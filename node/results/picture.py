"""Pictures a person looks at: the radiograph with the lungs drawn in colour and the findings burned in.

One renderer serves ``cxrnode jobs show ID --preview FILE.png`` and ``cxrnode evaluate
--overlays DIR``. The patient's left lung is green and the right lung blue (the SEG's
display colours), each filled at :data:`FILL_ALPHA` with a solid outline, and an "L" marks
the side of the image where the patient's left is. The caption names the TB score, the
qualitative result, the model and "NOT FOR DIAGNOSIS"; a "Quality check: ..." line (the lung
segmentation failed the plausibility check) in amber; lines too wide are wrapped at spaces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

__all__ = ["FILL_ALPHA", "LEFT_COLOUR", "NOT_FOR_DIAGNOSIS", "QUALITY_CHECK", "RIGHT_COLOUR", "lung_layers",
           "overlay_picture"]

LEFT_COLOUR = (40, 200, 70)  # the patient's left lung (SEG segment 1)
RIGHT_COLOUR = (50, 110, 255)  # the patient's right lung (SEG segment 2)
FILL_ALPHA = 0.30
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"


Layer = tuple[np.ndarray | None, tuple[int, int, int]]


def lung_layers(patient_left: np.ndarray | None, patient_right: np.ndarray | None) -> list[Layer]:
    """The two lungs in their colours: the patient's left green, the right blue."""
    return [(patient_left, LEFT_COLOUR), (patient_right, RIGHT_COLOUR)]


def overlay_picture(
    pixels: np.ndarray,
    layers: Sequence[Layer],
    caption: Sequence[str],
    *,
    patient_left_on_image_right: bool | None = True,
    max_side: int | None = 1024,
) -> Image.Image:
    """An RGB picture of ``pixels`` (2-D, 0 = black, 1 = white) with coloured masks and a caption.

    ``layers`` are (mask, RGB colour) pairs in the image's geometry (a None mask draws
    nothing), e.g. :func:`lung_layers`. The picture is
    scaled down so its longer side is at most ``max_side`` (None keeps the size), then the
    caption goes in a band above it. An "L"
    marks the patient's left side unless ``patient_left_on_image_right`` is None.

    Raises:
        ValueError: the pixels are not 2-D or a mask's shape differs from theirs.
    """
    gray = np.asarray(pixels, dtype=np.float32)
    if gray.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {gray.shape}")
    for index, (mask, _) in enumerate(layers):
        if mask is not None and np.shape(mask) != gray.shape:
            raise ValueError(f"mask {index} has shape {np.shape(mask)}; the image is {gray.shape}")
    rgb = np.repeat((np.clip(gray, 0, 1) * 255)[..., np.newaxis], 3, axis=2)
    outline_px = max(2, round(max(gray.shape) / 400))
    for mask, colour in layers:
        if mask is None or not np.any(mask):
            continue
        mask = np.asarray(mask, dtype=bool)
        rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * np.asarray(colour, dtype=np.float32)
        edge = mask & ~ndimage.binary_erosion(mask, iterations=outline_px)
        rgb[edge] = colour
    picture = Image.fromarray(rgb.round().astype(np.uint8), mode="RGB")
    if max_side is not None and max(picture.size) > max_side:
        scale = max_side / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.LANCZOS)
    return _with_caption(picture, list(caption), patient_left_on_image_right)


#: A caption line starting with this (the results' "Quality check: ..." warning) is drawn in amber.
QUALITY_CHECK = "Quality check:"
_TEXT, _WARNING, _ALERT = (255, 255, 255), (255, 191, 0), (255, 80, 80)


def _wrapped(line: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """``line`` broken at spaces into pieces no wider than ``width`` pixels in ``font`` (a single
    word wider than that stays whole)."""
    pieces: list[str] = []
    for word in line.split(" "):
        if pieces and font.getlength(f"{pieces[-1]} {word}") <= width:
            pieces[-1] = f"{pieces[-1]} {word}"
        else:
            pieces.append(word)
    return pieces or [""]


def _with_caption(picture: Image.Image, caption: list[str], left_on_right: bool | None) -> Image.Image:
    """The picture below a black band holding the caption (nothing of the image is covered)."""
    size = max(12, max(picture.size) // 40)
    font = ImageFont.load_default(size=size)
    margin = size // 2
    lines = [(part, _WARNING if line.startswith(QUALITY_CHECK) else _TEXT)
             for line in caption for part in _wrapped(line, font, picture.width - 2 * margin)]
    lines.append((NOT_FOR_DIAGNOSIS, _ALERT))
    line_height = round(size * 1.25)
    band = margin * 2 + line_height * len(lines)
    out = Image.new("RGB", (picture.width, picture.height + band))
    out.paste(picture, (0, band))
    draw = ImageDraw.Draw(out)
    for index, (line, colour) in enumerate(lines):
        draw.text((margin, margin + index * line_height), line, fill=colour, font=font)
    if left_on_right is not None:
        marker = ImageFont.load_default(size=size * 2)
        x = out.width - margin - size * 2 if left_on_right else margin
        draw.text((x, band + margin), "L", fill=(255, 255, 0), font=marker, stroke_width=2, stroke_fill=(0, 0, 0))
    return out
