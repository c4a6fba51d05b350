"""Experiment, not used by the node: how far a TB member's operating point moves when another
segmenter draws the lungs.

The TB input is the lung crop plus the binary lung mask, so a new segmenter changes every input a
little. This compares two members trained without the same fold of a cross-fitted run (``train tb
--folds K``): member K of that run, and member K of another run's checkpoint (for example one
trained with ``--also-lungs-from``), on fold K's held-out *training* cases (the validation split is
not used), each scored on the lungs of several segmenters. Per member: AUC on each segmenter's
lungs; the threshold for sensitivity 0.90 on the first segmenter's lungs, and sensitivity and
specificity at it on each; the per-case logit shift against the first segmenter's lungs.

    python -m models.experiments.tb_lungs_shift --data ../shared/data --cross-fit runs/tb-cv5 \\
        --challenger runs/tb-cv5-also/checkpoint.pt --fold 0 \\
        --lungs unet=models/weights --lungs resunet=models/weights --lungs candidate=runs/seg-unet-conv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import metrics, networks, registry
from models.training import common, mix, refit, tb

TARGET_SENSITIVITY = 0.90


def _segmenter(spec: str) -> tuple[str, Any]:
    """``NAME=DIR`` where NAME is unet/resunet (the file in DIR) or any label for a folder holding one segmenter."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise ValueError(f"--lungs {spec!r}: expected NAME=DIR")
    arch = name if name in registry.SEGMENTER_FILES else None
    return name, tb.segmenter_in(Path(folder), "cpu", f"--lungs {spec!r}", arch=arch)


def _members(cross_fit_dir: Path, fold: int, challenger: Path) -> tuple[dict[str, Any], dict[str, torch.nn.Module]]:
    meta = registry.verify(registry.TB_FILE, cross_fit_dir)
    config = (meta.get("training") or {}).get("config") or {}
    if not config.get("folds"):
        raise ValueError(f"--cross-fit {cross_fit_dir} is not a cross-fitted run (train tb --folds K)")
    if not 0 <= fold < int(config["folds"]):
        raise ValueError(f"--fold {fold}: the cross-fit has folds 0..{int(config['folds']) - 1}")
    fold_member = refit.cross_fit_members(cross_fit_dir, meta, "cpu")[fold]
    state = common.load_checkpoint(challenger)
    done = state.get("done") or []
    if len(done) <= fold:
        raise ValueError(f"--challenger {challenger} holds {len(done)} finished member(s); member {fold} is needed")
    other = state.get("config") or {}
    if other.get("folds") != config["folds"] or other.get("seed") != config["seed"]:
        raise ValueError(f"--challenger {challenger} was not cross-fitted with the same folds and seed "
                         f"({other.get('folds')}, {other.get('seed')} vs {config['folds']}, {config['seed']})")
    member = networks.build_tb_scorer(other.get("arch", "smallcnn"), **(other.get("network") or {}))
    member.load_state_dict(done[fold])
    return config, {"cross-fit": fold_member.float(), "challenger": member}


def run(data_dir: str, cross_fit_dir: Path, challenger: Path, fold: int, lungs: list[str]) -> dict[str, Any]:
    """The comparison as a JSON-ready dict (see the module doc)."""
    if len(lungs) < 2:
        raise ValueError("name at least two --lungs: the first is the reference the others are compared with")
    config, members = _members(cross_fit_dir, fold, challenger)
    segs = dict(_segmenter(s) for s in lungs)
    if len(segs) != len(lungs):
        raise ValueError("--lungs names must differ")
    dev = torch.device("cpu")
    rows = tb._labelled(mix.read_split(data_dir, "train"))
    labels = np.array([c.tb_label for c in rows], dtype=np.int64)
    held = tb.folds_of(rows, labels, int(config["folds"]), int(config["seed"])) == fold
    held_rows = [c for c, h in zip(rows, held) if h]  # only the fold's cases are segmented and scored
    y = labels[held]
    size = int(config.get("size", 224))
    inputs = {name: tb._inputs(held_rows, seg, int(seg.meta["input_size"]), dev, size)[0] for name, seg in segs.items()}
    ref = next(iter(segs))
    out: dict[str, Any] = {"fold": fold, "n": int(held.sum()), "n_tb": int(y.sum()), "reference_lungs": ref,
                           "lungs": {n: f"{s.identity.name} {s.identity.version}" for n, s in segs.items()}}
    for who, member in members.items():
        logits = {n: tb.predict_logits(member, x, dev) for n, x in inputs.items()}
        scores = {n: 1 / (1 + np.exp(-v)) for n, v in logits.items()}
        threshold = metrics.threshold_for_sensitivity(y, scores[ref], TARGET_SENSITIVITY)
        entry: dict[str, Any] = {"threshold": float(threshold)}
        for n in inputs:
            sens, spec = metrics.sensitivity_specificity(y, scores[n], threshold)
            entry[n] = {"auc": metrics.roc_auc(y, logits[n]), "sensitivity": sens, "specificity": spec}
            if n != ref:
                d = logits[n] - logits[ref]
                entry[n].update(logit_shift_mean=float(d.mean()), logit_shift_sd=float(d.std()))
        out[who] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.experiments.tb_lungs_shift", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with index.csv (its training split)")
    p.add_argument("--cross-fit", required=True, type=Path, help="a cross-fitted TB run's weights folder")
    p.add_argument("--challenger", required=True, type=Path, help="checkpoint.pt of another cross-fitted run")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--lungs", action="append", default=[], metavar="NAME=DIR",
                   help="a segmenter whose lungs to score on (repeatable; the first is the reference)")
    args = p.parse_args(argv)
    try:
        result = run(args.data, args.cross_fit, args.challenger, args.fold, args.lungs)
    except (ValueError, FileNotFoundError, registry.WeightsError) as exc:
        print(f"tb_lungs_shift: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
