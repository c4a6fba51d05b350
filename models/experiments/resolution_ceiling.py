"""Resolution audit, not used by the node: how much lung Dice a network size costs by itself.

The segmenters run at 256 px and their masks are resampled to the image (:mod:`models.transforms`).
A *perfect* network at that size would still lose what the round trip loses: the reference mask
mapped to network size (``mask_to_network``) and back (``resize_bilinear``, thresholded as the node
thresholds): :func:`models.transforms.mask_roundtrip`. This audit scores that round trip against
the reference at the data set's own resolution, per source, for each size asked: the Dice ceiling
of a network at that size, which says whether training at a larger size can pay.

    python -m models.experiments.resolution_ceiling --data ../shared/data [--split val] [--sizes 128,256,384] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from models import data, metrics, transforms


def ceiling(masks: list[tuple[str, np.ndarray]], size: int) -> dict[str, Any]:
    """Dice and Jaccard of each reference mask against its round trip through ``size`` px, per
    source and overall: mean and min (a network that is perfect at ``size`` scores exactly this)."""
    if size < 8:
        raise ValueError(f"network size {size} px: at least 8")
    rows: dict[str, list[tuple[float, float]]] = {}
    for source, mask in masks:
        ref = np.asarray(mask) > 0
        back = transforms.mask_roundtrip(ref, size)
        rows.setdefault(source, []).append((metrics.dice(back, ref), metrics.jaccard(back, ref)))
    out: dict[str, Any] = {}
    for name, values in [("all", [v for vs in rows.values() for v in vs]), *sorted(rows.items())]:
        dice = np.array([d for d, _ in values])
        jac = np.array([j for _, j in values])
        out[name] = {"n": len(values), "dice_mean": round(float(dice.mean()), 5), "dice_min": round(float(dice.min()), 5),
                     "jaccard_mean": round(float(jac.mean()), 5)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.experiments.resolution_ceiling", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with index.csv (512 x 512 masks like ../shared/data)")
    p.add_argument("--split", default="val", help="split to audit (default val; 'all' for every case)")
    p.add_argument("--sizes", default="128,256,384", help="network sizes in px, comma-separated")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        cases = data.read_index(args.data, None if args.split == "all" else args.split)
        masks = [(c.source, data.load_mask(c.mask_path)) for c in cases if c.mask_path is not None]
        if not masks:
            raise ValueError(f"no reference masks in {args.data} (split {args.split})")
        result = {"data": args.data, "split": args.split, "sizes": {str(s): ceiling(masks, s) for s in sizes}}
    except (ValueError, data.DataError) as exc:
        print(f"resolution_ceiling: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Dice of the reference masks after a round trip through the network size ({args.split} split)")
    print(f"{'size':>6} {'subset':<12} {'masks':>5} {'Dice mean':>10} {'Dice min':>9} {'Jaccard':>8}")
    for size, table in result["sizes"].items():
        for name, r in table.items():
            print(f"{size:>6} {name:<12} {r['n']:>5} {r['dice_mean']:>10.4f} {r['dice_min']:>9.4f} {r['jaccard_mean']:>8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
