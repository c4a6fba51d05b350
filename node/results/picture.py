"""Pictures a person looks at: the radiograph with the lungs drawn in colour and the findings burned in.

One renderer serves ``cxrnode jobs show ID --preview FILE.png`` and ``cxrnode evaluate
--overlays DIR``. The patient's left lung is green and the right lung blue (the SEG's
display colours), each filled at :data:`FILL_ALPHA` with a solid outline, and an "L" marks
the side of the image where the patient's left is. The caption names the TB score, the
qualitative result, the model and "NOT FOR DIAGNOSIS".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

__all__ = ["FILL_ALPHA", "LEFT_COLOUR", "NOT_FOR_DIAGNOSIS", "RIGHT_COLOUR", "lung_layers", "overlay_picture"]

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


def _with_caption(picture: Image.Image, caption: list[str], left_on_right: bool | None) -> Image.Image:
    """The picture below a black band holding the caption (nothing of the image is covered)."""
    size = max(12, max(picture.size) // 40)
    font = ImageFont.load_default(size=size)
    lines = [*caption, NOT_FOR_DIAGNOSIS]
    margin = size // 2
    line_height = round(size * 1.25)
    band = margin * 2 + line_height * len(lines)
    out = Image.new("RGB", (picture.width, picture.height + band))
    out.paste(picture, (0, band))
    draw = ImageDraw.Draw(out)
    for index, line in enumerate(lines):
        colour = (255, 80, 80) if line == NOT_FOR_DIAGNOSIS else (255, 255, 255)
        draw.text((margin, margin + index * line_height), line, fill=colour, font=font)
    if left_on_right is not None:
        marker = ImageFont.load_default(size=size * 2)
        x = out.width - margin - size * 2 if left_on_right else margin
        draw.text((x, band + margin), "L", fill=(255, 255, 0), font=marker, stroke_width=2, stroke_fill=(0, 0, 0))
    return out
