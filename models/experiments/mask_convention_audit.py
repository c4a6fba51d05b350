"""Label audit, not used by the node: which reference lung masks include the lung behind the heart.

The two sources annotate differently. Montgomery's NLM masks exclude the lung behind the heart
(the NLM convention); most of the Shenzhen masks (Stirenko et al.) do too, but some include it.
A segmenter that follows one convention loses on every mask of the other, so the Shenzhen Dice
and the worst cases mix model error with annotation convention. This audit separates the two.

Rule (:mod:`models.conventions`, shared with ``cxrnode train segmentation --ignore-disputed``):
run the shipped segmenter through the node's own code and measure, per reference mask, the share
of the reference lung in the image's right half (the patient's left lung, where the heart is)
that the segmentation leaves out; the cut-off comes from the Montgomery training masks alone. A
mask above it is labelled ``includes_retrocardiac``. The yardstick is the segmenter itself, so
read the labels as "disagrees with the NLM convention behind the heart", and look at the pictures
(``cxrnode evaluate --overlays``) before trusting one.

    python -m models.experiments.mask_convention_audit --data ../shared/data [--arch unet] [--json] [--csv FILE]

It reports, per source and split, how many masks fall on each side and the Dice of each group,
which is how the model cards read the Shenzhen figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from models import conventions, data, metrics
from models.inference import LungAnalyzer

NLM, INCLUDES = conventions.NLM, conventions.INCLUDES
#: Kept under the audit's name; the rule lives in :mod:`models.conventions`.
missed_heart_side_share = conventions.missed_heart_side_share


def audit(data_dir: str | Path, arch: str = "unet", device: str = "cpu") -> dict[str, Any]:
    """Per masked case: source, split, Dice and missed share; the cut-off; and the groups' figures."""
    analyzer = LungAnalyzer.load(arch, device)
    rows = []
    for case in data.read_index(data_dir):
        if case.mask_path is None:
            continue
        reference = data.load_mask(case.mask_path)
        result = analyzer.analyze(data.load_image(case.image_path), out_shape=reference.shape)
        rows.append({"case_id": case.case_id, "source": case.source, "split": case.split,
                     "dice": metrics.dice(result.lung_mask, reference),
                     "missed_share": missed_heart_side_share(result.lung_mask, reference)})
    training = [r for r in rows if r["split"] in ("train", None)]
    try:
        cutoff = conventions.cutoff([r["missed_share"] for r in training], [r["source"] for r in training])
    except ValueError as exc:
        raise ValueError(f"{data_dir}: {exc}") from None
    n_defining = sum(r["source"] == conventions.DEFINING_SOURCE for r in training)
    for r in rows:
        r["convention"] = conventions.label(r["missed_share"], cutoff)
    groups: dict[str, Any] = {}
    for key in sorted({(r["source"], r["split"] or "all") for r in rows}):
        sel = [r for r in rows if (r["source"], r["split"] or "all") == key]
        entry: dict[str, Any] = {"masks": len(sel)}
        for conv in (NLM, INCLUDES):
            d = [r["dice"] for r in sel if r["convention"] == conv]
            entry[conv] = {"masks": len(d), "dice_mean": float(np.mean(d)) if d else None,
                           "dice_min": float(np.min(d)) if d else None}
        groups[f"{key[0]}/{key[1]}"] = entry
    return {"arch": arch, "cutoff": cutoff, "cutoff_rule": f"{conventions.CUTOFF_FACTOR} x the 95th percentile of the missed share "
            f"on {n_defining} Montgomery training masks", "groups": groups, "cases": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.experiments.mask_convention_audit",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with index.csv")
    p.add_argument("--arch", choices=("unet", "resunet"), default="unet")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--csv", metavar="FILE", help="also write one row per masked case")
    p.add_argument("--json", action="store_true", help="print JSON (without the per-case rows) instead of a table")
    args = p.parse_args(argv)
    try:
        result = audit(args.data, args.arch, args.device)
    except (data.DataError, ValueError, FileNotFoundError) as exc:
        print(f"mask_convention_audit: error: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["case_id", "source", "split", "dice", "missed_share", "convention"])
            w.writeheader()
            w.writerows(result["cases"])
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=2))
        return 0
    print(f"{args.arch}: cut-off {result['cutoff']:.4f} ({result['cutoff_rule']})")
    print(f"{'source/split':<20} {'masks':>5} {'NLM':>5} {'Dice':>7} {'incl.':>5} {'Dice':>7}")
    for key, g in result["groups"].items():
        a, b = g[NLM], g[INCLUDES]
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"
        print(f"{key:<20} {g['masks']:>5} {a['masks']:>5} {fmt(a['dice_mean']):>7} {b['masks']:>5} {fmt(b['dice_mean']):>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
