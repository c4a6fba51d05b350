"""Mix an exported set (``--extra``) into training with the base data (``--data``).

The extra set is a folder in the ``index.csv`` layout, typically ``cxrnode dataset export``'s,
whose rows may carry ``label_source`` (``manual``/``pseudo``), ``label_quality`` and
``tb_label_source``, and blank ``mask_path`` or ``tb_label`` where unknown.

* **Quality floor** (``--extra-min-quality Q``): a pseudo-label mask (``label_source`` pseudo)
  whose ``label_quality`` is below Q, or missing, is dropped (the row keeps its image and its
  TB label); manual masks are always kept. TB labels come from a CSV or a verified report, never
  from the node, so the floor does not touch them.
* **Proportion** (``--extra-fraction P``): an epoch has as many samples as the two training sets
  have cases together (N = n_base + n_extra); round(P * N) of them are drawn from the extra set
  and the rest from the base set. A set drawn for fewer samples than it has cases is subsampled
  without replacement (a fresh subset each epoch); one drawn for more (a small extra set) is
  drawn with repetition, each case k or k + 1 times. The draws are shuffled together. Every draw
  uses the run's seeded generator, so ``--seed`` reproduces the epochs exactly. With P equal to
  the extra set's natural share (n_extra / N) this is a plain shuffle of the union.
* **Validation**: the base data's ``val`` split and the extra set's ``val`` rows, each reported
  on its own (``base``, ``extra``) and together (``all``).

Without ``--extra`` nothing changes: an epoch is a permutation of the base training cases drawn
exactly as before, so earlier runs reproduce bit for bit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import data
from models.training import common

BASE, EXTRA = "base", "extra"
#: Default share of each epoch's samples drawn from the extra set.
DEFAULT_FRACTION = 0.3
#: Default floor for pseudo-label quality: 0 keeps every mask the export kept (the export has its own
#: floor, ``[dataset] min_pseudo_quality``).
DEFAULT_MIN_QUALITY = 0.0


@dataclass(frozen=True)
class ExtraSpec:
    """An extra training set and how to mix it in."""

    folder: str
    fraction: float = DEFAULT_FRACTION
    min_quality: float = DEFAULT_MIN_QUALITY

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"--extra-fraction must be in 0..1, got {self.fraction}")
        if not 0.0 <= self.min_quality <= 1.0:
            raise ValueError(f"--extra-min-quality must be in 0..1, got {self.min_quality}")


def read_split(folder: str | Path, split: str, limit: int | None = None) -> list[data.Case]:
    """The rows of ``split`` in ``folder``, as training always read them: ``train`` is every row when
    no row is in a ``train`` split; another split is empty when no row is in it. ``limit``: first N rows."""
    every = data.read_index(folder, None)
    cases = [c for c in every if c.split == split]
    if not cases and split == "train":
        cases = every
    return cases[:limit] if limit is not None else cases


def apply_quality_floor(cases: list[data.Case], min_quality: float) -> tuple[list[data.Case], int]:
    """Drop the masks of pseudo-labelled rows scoring below ``min_quality`` (a missing score counts as 0).

    Returns the cases (a dropped row keeps its image and TB label, with no mask) and how many masks went.
    Manual masks and rows without a ``label_source`` are kept as they are.
    """
    out, dropped = [], 0
    for c in cases:
        if (c.mask_path is not None and c.label_source == "pseudo"
                and (c.label_quality if c.label_quality is not None else 0.0) < min_quality):
            out.append(data.Case(c.case_id, c.source, c.image_path, None, c.tb_label, c.split, None,
                                 c.label_quality, c.tb_label_source))
            dropped += 1
        else:
            out.append(c)
    return out, dropped


def draw(n_pool: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` indices into a pool of ``n_pool``: a random subset when k <= n_pool, else whole
    permutations repeated and a random subset for the remainder (each index k // n or k // n + 1 times)."""
    if k <= 0 or n_pool <= 0:
        return torch.zeros(0, dtype=torch.long)
    parts = [torch.randperm(n_pool, generator=g) for _ in range(k // n_pool)]
    rest = k % n_pool
    if rest:
        parts.append(torch.randperm(n_pool, generator=g)[:rest])
    return torch.cat(parts)


def epoch_sizes(n_base: int, n_extra: int, fraction: float) -> dict[str, int]:
    """Samples per epoch from each set: N = n_base + n_extra in all, round(fraction * N) of them extra
    (all N when there is no base case; none when there is no extra case)."""
    total = n_base + n_extra
    if n_extra == 0:
        k_extra = 0
    elif n_base == 0:
        k_extra = total
    else:
        k_extra = round(fraction * total)
    return {BASE: total - k_extra, EXTRA: k_extra}


def epoch_order(n_base: int, n_extra: int, fraction: float, g: torch.Generator) -> torch.Tensor:
    """One epoch's sample indices into the concatenation [base cases, extra cases] (see the module doc).

    With no extra cases this is ``torch.randperm(n_base, generator=g)``, as training always drew.
    """
    if n_extra == 0:
        return torch.randperm(n_base, generator=g)
    sizes = epoch_sizes(n_base, n_extra, fraction)
    base = draw(n_base, sizes[BASE], g)
    extra = draw(n_extra, sizes[EXTRA], g) + n_base
    both = torch.cat([base, extra])
    return both[torch.randperm(len(both), generator=g)]


def concat(a: common.CaseArrays, b: common.CaseArrays) -> common.CaseArrays:
    """The cases of ``a`` followed by those of ``b``."""
    return common.CaseArrays(
        a.case_ids + b.case_ids, a.sources + b.sources,
        np.concatenate([a.images, b.images]), np.concatenate([a.masks, b.masks]),
        np.concatenate([a.has_mask, b.has_mask]), np.concatenate([a.labels, b.labels]),
        (a.label_sources or [None] * len(a)) + (b.label_sources or [None] * len(b)),
    )


def human_labelled(a: common.CaseArrays) -> np.ndarray:
    """Cases whose mask is not a pseudo-label (the node's own mask)."""
    sources = a.label_sources or [None] * len(a)
    return np.array([s != "pseudo" for s in sources], dtype=bool)


def set_summary(rows: list[data.Case], used: list[data.Case], dropped: int | None = None) -> dict[str, Any]:
    """Counts of one split of one folder: its rows, the cases training used, by source and by label source."""
    out: dict[str, Any] = {"rows": len(rows), "used": len(used),
                           "used_by_source": dict(sorted(Counter(c.source for c in used).items()))}
    if any(c.label_source or c.tb_label_source for c in rows):
        out["by_label_source"] = dict(sorted(Counter(c.label_source or "none" for c in rows).items()))
        out["used_by_label_source"] = dict(sorted(Counter(c.label_source or "none" for c in used).items()))
        out["by_tb_label_source"] = dict(sorted(Counter(c.tb_label_source or "none" for c in rows).items()))
    if dropped is not None:
        out["pseudo_masks_below_quality"] = dropped
    return out
