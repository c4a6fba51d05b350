"""Shared training machinery: seeds, devices, data arrays, augmentation, logs, checkpoints."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import data, transforms


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (CPU and CUDA); return a torch generator for sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def pick_device(device: str) -> torch.device:
    """``auto`` -> cuda when available; otherwise the named device."""
    from models.inference import resolve_device

    return torch.device(resolve_device(device))


@dataclass
class CaseArrays:
    """Preprocessed cases in memory (network size)."""

    case_ids: list[str]
    sources: list[str]
    images: np.ndarray  # (N, S, S) float32, output of transforms.preprocess
    masks: np.ndarray  # (N, S, S) float32 soft targets; zeros where has_mask is False
    has_mask: np.ndarray  # (N,) bool
    labels: np.ndarray  # (N,) int, -1 where unknown
    #: per case: the mask's ``label_source`` column (``manual``/``pseudo``; None without that column)
    label_sources: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.case_ids)


def subset(a: CaseArrays, keep: np.ndarray) -> CaseArrays:
    """The cases of ``a`` where the boolean array ``keep`` is true."""
    keep = np.asarray(keep, dtype=bool)
    sources = a.label_sources or [None] * len(a.case_ids)
    return CaseArrays(
        [c for c, k in zip(a.case_ids, keep) if k], [s for s, k in zip(a.sources, keep) if k],
        a.images[keep], a.masks[keep], a.has_mask[keep], a.labels[keep],
        [s for s, k in zip(sources, keep) if k],
    )


def load_arrays(data_dir: str | Path, split: str | None, size: int, limit: int | None = None) -> CaseArrays:
    """Read and preprocess the cases of ``split`` with the shared transforms."""
    cases = data.read_index(data_dir, split)
    if limit is not None:
        cases = cases[:limit]
    return load_cases(cases, size)


def load_cases(cases: list[data.Case], size: int) -> CaseArrays:
    """Preprocess ``cases`` (images, masks where they have one, TB labels) at network size ``size``."""
    if not cases:
        return empty_arrays(size)
    images, masks, has = [], [], []
    for c in cases:
        images.append(transforms.preprocess(data.load_image(c.image_path), size))
        if c.mask_path is not None:
            masks.append(transforms.mask_to_network(data.load_mask(c.mask_path), size))
            has.append(True)
        else:
            masks.append(np.zeros((size, size), np.float32))
            has.append(False)
    return CaseArrays(
        case_ids=[c.case_id for c in cases],
        sources=[c.source for c in cases],
        images=np.stack(images).astype(np.float32),
        masks=np.stack(masks).astype(np.float32),
        has_mask=np.array(has, dtype=bool),
        labels=np.array([-1 if c.tb_label is None else c.tb_label for c in cases], dtype=np.int64),
        label_sources=[c.label_source for c in cases],
    )


def empty_arrays(size: int) -> CaseArrays:
    """A :class:`CaseArrays` with no cases."""
    z = np.zeros((0, size, size), np.float32)
    return CaseArrays([], [], z, z.copy(), np.zeros(0, bool), np.zeros(0, np.int64), [])


def has_split(data_dir: str | Path, split: str) -> bool:
    """Whether ``index.csv`` has a ``split`` column containing ``split``."""
    cases = data.read_index(data_dir, None)
    return any(c.split == split for c in cases)


# ------------------------------------------------------------------------------ augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation. No flips: left/right is anatomy (heart, sides) here."""

    rotate_deg: float = 8.0
    scale: float = 0.08
    translate: float = 0.05
    shear: float = 0.04
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.08
    noise_std: float = 0.03
    p_affine: float = 0.8
    p_intensity: float = 0.8


def random_affine(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Apply one random small affine transform per sample to all channels of ``x`` (B, C, H, W)."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=g) * (hi - lo) + lo

    ang = u(-cfg.rotate_deg, cfg.rotate_deg) * np.pi / 180
    sc = u(1 - cfg.scale, 1 + cfg.scale)
    sh = u(-cfg.shear, cfg.shear)
    tx, ty = u(-cfg.translate, cfg.translate) * 2, u(-cfg.translate, cfg.translate) * 2
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack(
        [torch.stack([cos, -sin + sh, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )  # (B, 2, 3)
    apply = torch.rand(b, generator=g) < cfg.p_affine
    ident = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(b, 2, 3)
    theta = torch.where(apply[:, None, None], theta, ident).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_intensity(img: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Gamma, contrast/brightness and Gaussian noise on a (B, 1, H, W) image in [0, 1]."""
    b = img.shape[0]
    dev = img.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(b, generator=g) * (hi - lo) + lo).to(dev).view(b, 1, 1, 1)

    apply = (torch.rand(b, generator=g) < cfg.p_intensity).to(dev).view(b, 1, 1, 1)
    log_g = u(np.log(cfg.gamma[0]), np.log(cfg.gamma[1]))
    out = img.clamp(0, 1) ** torch.exp(log_g)
    out = (out - 0.5) * u(*cfg.contrast) + 0.5 + u(-cfg.brightness, cfg.brightness)
    noise = torch.randn(img.shape, generator=g).to(dev) * u(0, cfg.noise_std)
    out = out + noise
    return torch.where(apply, out, img)


# ------------------------------------------------------------------------------ logs, checkpoints


class JsonlLog:
    """Append one JSON object per epoch to ``path`` (kept next to the checkpoint)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


def save_checkpoint(path: Path, **state: Any) -> None:
    """Atomically write a training checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_checkpoint`."""
    return torch.load(path, map_location="cpu", weights_only=False)


class Timer:
    """Wall-clock seconds since construction."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
