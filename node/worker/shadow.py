"""Shadow mode: a challenger (``cxrnode models shadow REF``) analyses the same pixels as the
champion, after the job's own results are recorded; its results are compared and recorded
(``shadow_results``), never encoded, archived as DICOM nor sent.

:func:`compare` turns the champion's and the shadow's :class:`models.inference.LungAnalysis` of
one image into the columns of a :class:`node.queue.tables.ShadowResult`; :func:`report` sums
those rows up per shadow (``cxrnode models shadow-report``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.inference import LungAnalysis
    from node.queue.tables import ShadowResult


@dataclass(frozen=True)
class ShadowSetup:
    """Which models run in shadow: ``ref`` the shadowed model(s), and the pair that runs (a slot
    without a shadow uses its champion); ``error`` when they could not be loaded."""

    ref: str
    segmenter: str
    tb: str
    error: str | None = None


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def compare(champion: LungAnalysis, shadow: LungAnalysis, champion_threshold: float,
            shadow_threshold: float) -> dict[str, Any]:
    """The comparison columns of a shadow row. Both analyses are of the same standard view, where
    the patient's right lung is on the image's left."""
    champion_call = bool(champion.tb_score >= champion_threshold)
    shadow_call = bool(shadow.tb_score >= shadow_threshold)
    return {"dice_lungs": dice(champion.lung_mask, shadow.lung_mask),
            "dice_right": dice(champion.image_left, shadow.image_left),
            "dice_left": dice(champion.image_right, shadow.image_right),
            "champion_tb_score": float(champion.tb_score), "shadow_tb_score": float(shadow.tb_score),
            "champion_threshold": float(champion_threshold), "shadow_threshold": float(shadow_threshold),
            "champion_call": champion_call, "shadow_call": shadow_call, "agree": champion_call == shadow_call}


def event_message(fields: dict[str, Any]) -> str:
    """The job's ``shadow`` step-log line."""
    if fields.get("error"):
        return f"{fields['shadow_ref']}: failed in {fields['seconds']:.2f} s: {fields['error']}"
    calls = {True: "TB suspected", False: "no TB"}
    return (f"{fields['shadow_ref']}: lung Dice {fields['dice_lungs']:.4f} vs the champion "
            f"(right {fields['dice_right']:.4f}, left {fields['dice_left']:.4f}); TB score "
            f"{fields['shadow_tb_score']:.3f} vs {fields['champion_tb_score']:.3f}; "
            f"{calls[fields['shadow_call']]} vs {calls[fields['champion_call']]} "
            f"({'agree' if fields['agree'] else 'DISAGREE'}); {fields['seconds']:.2f} s")


def report(rows: Sequence[ShadowResult], lowest: int = 5) -> list[dict[str, Any]]:
    """Per shadow ref (in order of first appearance): jobs compared, lung Dice vs the champion
    (mean, min, the ``lowest`` job ids), TB score mean absolute difference, call agreement, errors."""
    groups: dict[str, list[ShadowResult]] = {}
    for row in rows:
        groups.setdefault(row.shadow_ref, []).append(row)
    out = []
    for ref, group in groups.items():
        ok = [r for r in group if r.error is None]
        errors = [r for r in group if r.error is not None]
        dices = [r.dice_lungs for r in ok]
        by_dice = sorted(ok, key=lambda r: (r.dice_lungs, r.job_id))
        agree = sum(1 for r in ok if r.agree)
        out.append({
            "shadow_ref": ref,
            "pairs": sorted({f"{r.shadow_segmenter} + {r.shadow_tb}" for r in ok}),
            "champions": sorted({f"{r.champion_segmenter} + {r.champion_tb}" for r in group}),
            "jobs_compared": len(ok),
            "dice_mean": float(np.mean(dices)) if dices else None,
            "dice_min": min(dices) if dices else None,
            "dice_lowest_jobs": [r.job_id for r in by_dice[:lowest]],
            "tb_score_mean_abs_diff": (float(np.mean([abs(r.shadow_tb_score - r.champion_tb_score) for r in ok]))
                                       if ok else None),
            "agreement_rate": agree / len(ok) if ok else None,
            "agreed": agree,
            "champion_normal_shadow_abnormal": sum(1 for r in ok if not r.champion_call and r.shadow_call),
            "champion_abnormal_shadow_normal": sum(1 for r in ok if r.champion_call and not r.shadow_call),
            "seconds_mean": float(np.mean([r.seconds for r in ok])) if ok else None,
            "errors": len(errors),
            "last_error": errors[-1].error if errors else None,
            "first": min(r.at for r in group).isoformat(timespec="seconds"),
            "last": max(r.at for r in group).isoformat(timespec="seconds"),
        })
    return out
