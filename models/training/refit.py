"""A refit TB scorer with the operating point of a cross-fitted run of the same recipe.

Cross-fitting (``train tb --folds K``, :mod:`models.training.tb`) gives every training case a score
from a member that never saw it, so the calibration and the threshold are chosen without the
validation split. But its members each train on (K-1)/K of the training split and rank a little
worse than members trained on all of it. The usual remedy is a *refit*: train the members again on
every training case with the same recipe, and keep the calibration and threshold the cross-fit
chose. :func:`attach_operating_point` does the second half: it takes a scorer trained on all of
the training split (``train tb`` without ``--folds``) and a cross-fitted run, checks that both
follow the same recipe on the same training cases with the same segmenter, and writes the
scorer's networks (the weights file copied byte for byte) with the cross-fit's Platt calibration
and threshold, reporting the validation split at that threshold, which chose nothing.

The calibration was fitted on single members' out-of-fold logits and is applied to the refit
ensemble's mean logit; members trained on more cases may be a little more confident, so the
validation ECE and the sensitivity at the threshold are the check that this carries over.

A new lung segmenter (``lungs_dir``, ``cxrnode calibrate --lungs-from DIR``) changes the TB input
(:func:`models.transforms.tb_input`: the crop and the mask channel follow the segmenter's lungs), so
the scores of networks trained on the old segmenter's lungs shift, and the calibration and
threshold fitted on them no longer hold. The networks can stay; the operating point is derived again, still out of
fold and without the validation split: the training split's folds are dealt again exactly as
:func:`models.training.tb.train` dealt them (same cases, order, fold count and seed), each case is
scored on the new segmenter's lungs by the cross-fit member that never saw it, and Platt scaling
and the threshold are fitted on those logits (:func:`models.training.tb.cross_fit_calibration`).
The validation split is then reported on the new segmenter's lungs, as the node will see them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from models import metrics, networks, registry
from models.training import common, mix, tb

#: TBConfig fields that make two runs the same recipe (members, folds, device, paths, version and
#: the command line may differ; the segmenter is compared by name and version, not by folder).
RECIPE = ("arch", "network", "epochs", "size", "batch_size", "lr", "weight_decay", "seed", "augment",
          "segmenter_arch", "target_sensitivity", "shifts", "shift_copies", "p_shift", "init", "extra",
          "also_lungs")
#: Compared only when the runs mix in an extra set.
_EXTRA_RECIPE = ("extra_fraction", "extra_min_quality")


def _defaults() -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(tb.TBConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def recipe_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The recipe a TB sidecar was trained with; settings older sidecars lack take today's defaults
    (what those runs did: the options did not exist yet)."""
    config = dict(_defaults(), **((meta.get("training") or {}).get("config") or {}))
    keys = RECIPE + (_EXTRA_RECIPE if config.get("extra") else ())
    return {k: json.loads(json.dumps(config.get(k))) for k in keys}  # tuples -> lists, as the JSON holds them


def _ref(meta: dict[str, Any]) -> str:
    return f"{meta.get('name')} {meta.get('version')} (sha256 {str(meta.get('sha256'))[:12]}…)"


def check_pair(scorer: dict[str, Any], cross_fit: dict[str, Any]) -> None:
    """Refuse, with every reason, a pair that is not a refit and its cross-fit."""
    for meta, role in ((scorer, "--scorer"), (cross_fit, "--cross-fit")):
        if meta.get("kind") != "tb":
            raise ValueError(f"{role} {_ref(meta)} is not a TB scorer (kind {meta.get('kind')!r})")
    t_cf = cross_fit.get("training") or {}
    if not t_cf.get("cross_fit") or not cross_fit.get("calibration") or not t_cf.get("config", {}).get("folds"):
        raise ValueError(f"--cross-fit {_ref(cross_fit)} is not a cross-fitted run (train tb --folds K): "
                         "it has no out-of-fold calibration and threshold")
    t_sc = scorer.get("training") or {}
    if (t_sc.get("config") or {}).get("folds") or scorer.get("calibration"):
        raise ValueError(f"--scorer {_ref(scorer)} already has a calibration or was cross-fitted: the refit is a "
                         "run of train tb without --folds, trained on every training case")
    problems = []
    a, b = recipe_of(scorer), recipe_of(cross_fit)
    for key in a.keys() | b.keys():
        if a.get(key) != b.get(key):
            problems.append(f"{key} {json.dumps(a.get(key))} vs {json.dumps(b.get(key))}")
    if scorer.get("segmenter_used_for_training") != cross_fit.get("segmenter_used_for_training"):
        problems.append(f"segmenter {scorer.get('segmenter_used_for_training')} vs "
                        f"{cross_fit.get('segmenter_used_for_training')}")
    if t_sc.get("n_train") != t_cf.get("n_train"):
        problems.append(f"training cases {t_sc.get('n_train')} vs {t_cf.get('n_train')}")
    if problems:
        raise ValueError(f"{_ref(scorer)} is not a refit of {_ref(cross_fit)}'s recipe: " + "; ".join(sorted(problems)))


def _lungs_segmenter(lungs_dir: Path, recipe: dict[str, Any], trained_on: str, device: Any) -> registry.LoadedModel:
    """The segmenter in ``lungs_dir`` whose lungs the operating point is derived on: of the recipe's
    segmenter architecture (the networks were trained on such a segmenter's lungs), and not the one
    they were trained on (its lungs are those the cross-fit's calibration was already fitted on)."""
    arch = recipe["segmenter_arch"]
    stem = registry.SEGMENTER_FILES[arch]
    if not (lungs_dir / f"{stem}.json").is_file():
        others = [f"{a} ({s}.*)" for a, s in registry.SEGMENTER_FILES.items() if (lungs_dir / f"{s}.json").is_file()]
        raise ValueError(f"--lungs-from {lungs_dir} holds no {stem}.*"
                         + (f" but a segmenter of another architecture: {', '.join(others)}" if others else "")
                         + f"; the recipe's segmenter_arch is {arch}: the new lungs must come from a {arch}")
    seg = registry.load(stem, str(device), lungs_dir)
    if seg.meta.get("kind") != "segmentation" or seg.meta.get("arch") != arch:
        raise ValueError(f"--lungs-from {lungs_dir}: {stem}.json describes a {seg.meta.get('kind')} model of arch "
                         f"{seg.meta.get('arch')!r}; the recipe's segmenter_arch is {arch}")
    name = seg.identity.name + " " + seg.identity.version
    if name == trained_on:
        raise ValueError(f"--lungs-from {lungs_dir} holds {name}, the segmenter the networks were trained on: the "
                         "cross-fit's calibration and threshold were fitted on its lungs already, so --lungs-from "
                         "is pointless (leave it out)")
    return seg


def cross_fit_members(cross_fit_dir: Path, cross_fit: dict[str, Any], device: Any) -> list[Any]:
    """The cross-fitted run's members in fold order (member k trained without fold k), uncalibrated:
    the calibration is what is being fitted again."""
    net = registry.load(registry.TB_FILE, str(device), cross_fit_dir).net
    if isinstance(net, networks.Calibrated):
        net = net.net
    members = list(net.members) if isinstance(net, networks.Ensemble) else [net]
    folds = int(cross_fit["training"]["config"]["folds"])
    if len(members) != folds:
        raise ValueError(f"--cross-fit {_ref(cross_fit)} has {len(members)} members for {folds} folds: "
                         "cross-fitting trains one member per fold")
    return members


def _out_of_fold(cross_fit_dir: Path, cross_fit: dict[str, Any], train_rows: list, seg: registry.LoadedModel,
                 size: int, target: float, device: Any) -> dict[str, Any]:
    """:func:`models.training.tb.cross_fit_calibration` of the cross-fit members' out-of-fold logits on
    ``seg``'s lungs. The labelled training cases, their order and their folds are those
    :func:`models.training.tb.train` used (same split, fold count and seed), so with the segmenter the
    networks were trained on this reproduces the cross-fit's own calibration and threshold."""
    config = cross_fit["training"]["config"]
    members = cross_fit_members(cross_fit_dir, cross_fit, device)
    x, y = tb._inputs(train_rows, seg, int(seg.meta["input_size"]), device, size)
    stored = cross_fit["training"]["cross_fit"].get("oof") or {}
    if (len(y), int(y.sum())) != (stored.get("n"), stored.get("n_tb")):
        raise ValueError(f"the training split has {len(y)} labelled cases ({int(y.sum())} TB); the out-of-fold "
                         f"scores of --cross-fit {_ref(cross_fit)} covered {stored.get('n')} "
                         f"({stored.get('n_tb')} TB): not the same training split")
    fold = tb.folds_of(train_rows, y, int(config["folds"]), int(config["seed"]))
    oof = np.zeros(len(y), np.float32)
    for k, member in enumerate(members):
        oof[fold == k] = tb.predict_logits(member, x[fold == k], device)
    return tb.cross_fit_calibration(y, oof, target)


def attach_operating_point(scorer_dir: Path, cross_fit_dir: Path, data: str, out: Path, *, version: str,
                           device: str = "auto", segmenter_dir: Path | None = None, command: str = "",
                           lungs_dir: Path | None = None) -> dict[str, Any]:
    """Write ``out``/tb-scorer.* : the networks of ``scorer_dir`` with the calibration and threshold
    of ``cross_fit_dir``, and the validation split's figures at that threshold. Returns the sidecar.

    With ``lungs_dir`` (a folder holding another segmenter of the recipe's architecture), the
    calibration and threshold are fitted again on the cross-fit members' out-of-fold logits on that
    segmenter's lungs, and the validation split is reported on them (see the module doc)."""
    scorer, cross_fit = registry.verify(registry.TB_FILE, Path(scorer_dir)), registry.verify(registry.TB_FILE, Path(cross_fit_dir))
    check_pair(scorer, cross_fit)
    if str(version) == str(scorer["version"]):
        raise ValueError(f"--version {version} is the refit scorer's own: the recalibrated model needs a new version")
    out = Path(out)
    if (out / f"{registry.TB_FILE}.json").exists() and out.resolve() in (Path(scorer_dir).resolve(), Path(cross_fit_dir).resolve()):
        raise ValueError(f"--out {out} would overwrite an input: choose an empty folder")
    recipe = recipe_of(scorer)
    dev = common.pick_device(device)
    seg = registry.load(registry.SEGMENTER_FILES[recipe["segmenter_arch"]], str(dev),
                        Path(segmenter_dir) if segmenter_dir else registry.WEIGHTS_DIR)
    seg_name = seg.identity.name + " " + seg.identity.version
    if seg_name != scorer.get("segmenter_used_for_training"):
        raise ValueError(f"the segmenter found is {seg_name}, the scorer was trained on the lungs of "
                         f"{scorer.get('segmenter_used_for_training')}: name its folder with --segmenter-dir")
    lungs = _lungs_segmenter(Path(lungs_dir), recipe, seg_name, dev) if lungs_dir is not None else None
    rows = {split: mix.read_split(data, split) for split in ("train", "val")}
    n_train = len(tb._labelled(rows["train"]))
    if n_train != scorer["training"].get("n_train"):
        raise ValueError(f"{data} has {n_train} labelled training cases; the scorer was trained on "
                         f"{scorer['training'].get('n_train')}: not the same training split")
    cf_training = cross_fit["training"]
    cf_ref = f"{cross_fit['name']} {cross_fit['version']}"
    if lungs is None:
        slope, intercept = float(cross_fit["calibration"]["slope"]), float(cross_fit["calibration"]["intercept"])
        threshold = float(cross_fit["threshold"])
        oof = dict(cf_training["cross_fit"])
    else:
        oof = _out_of_fold(Path(cross_fit_dir), cross_fit, rows["train"], lungs, int(scorer["input_size"]),
                           float(recipe["target_sensitivity"]), dev)
        slope, intercept, threshold = (float(oof.pop(k)) for k in ("slope", "intercept", "threshold"))
    lungs_seg = lungs if lungs is not None else seg  # the val split is reported on the lungs the node will see
    loaded = registry.load(registry.TB_FILE, str(dev), Path(scorer_dir))
    scored = networks.Calibrated(loaded.net, slope, intercept)
    x_va, y_va = tb._inputs(rows["val"], lungs_seg, int(lungs_seg.meta["input_size"]), dev, int(scorer["input_size"]))
    report, _, scores = tb.tb_report(scored, {mix.BASE: (x_va, y_va)}, dev, threshold)
    if len(y_va) and 0 < y_va.sum() < len(y_va):
        val_cal = metrics.calibration(y_va, scores)  # the scores the report's figures were taken at
        oof["val_ece"], oof["val_brier"] = val_cal["ece"], val_cal["brier"]
    base = report[mix.BASE]
    source = {"name": cross_fit["name"], "version": cross_fit["version"], "sha256": cross_fit["sha256"],
              "folds": cf_training["config"]["folds"], "command": cf_training.get("command")}
    operating_point: dict[str, Any] = {"command": command, "refit_of": source,
                                       "networks": {"version": scorer["version"], "sha256": scorer["sha256"]}}
    fitted_on = (f"out-of-fold logits of the {oof['oof']['n']} labelled training cases "
                 f"({source['folds']}-fold cross-fitting) of {cf_ref} (sha256 {cross_fit['sha256'][:12]}…)")
    threshold_rule = f"{cf_training['threshold_rule']}; taken from the cross-fitted run {cf_ref} of the same recipe"
    if lungs is not None:
        lungs_name = lungs.identity.name + " " + lungs.identity.version
        operating_point["lungs_from"] = {"name": lungs.identity.name, "version": lungs.identity.version,
                                         "sha256": lungs.identity.sha256}
        fitted_on += (f", recomputed on the lungs of {lungs_name} (sha256 {lungs.identity.sha256[:12]}…) "
                      f"instead of those of {seg_name} the networks were trained on")
        threshold_rule = (f"{cf_training['threshold_rule']}; the out-of-fold logits of the cross-fitted run {cf_ref} "
                          f"of the same recipe recomputed on the lungs of {lungs_name}")
    training = dict(scorer["training"])
    training.update({
        "val_auc": base["auc"], "val_sensitivity": base["sensitivity"], "val_specificity": base["specificity"],
        "val": report, "cross_fit": oof, "threshold_rule": threshold_rule, "operating_point": operating_point,
    })
    meta = {k: v for k, v in scorer.items() if k not in ("calibration", "training")}
    meta.update({
        "version": str(version), "threshold": threshold, "training": training,
        "calibration": {"method": "platt", "slope": slope, "intercept": intercept,
                        "fitted_on": f"{fitted_on}, applied to the mean logit of these {scorer['members']} members, "
                                     "trained on every training case by the same recipe"},
    })
    if lungs is not None:  # segmenter_used_for_training stays: the networks were trained on its lungs
        meta["calibrated_on_lungs_of"] = lungs_name
    registry.calibration_of(meta)  # validate before writing
    out.mkdir(parents=True, exist_ok=True)
    weights_file = scorer["weights_file"]
    tmp = out / f".{weights_file}.tmp"
    shutil.copyfile(Path(scorer_dir) / weights_file, tmp)
    os.replace(tmp, out / weights_file)
    if registry.sha256_file(out / weights_file) != scorer["sha256"]:
        raise RuntimeError(f"copying {weights_file} changed it; nothing is written")
    (out / f"{registry.TB_FILE}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    sums = registry.read_sums(out)
    sums[weights_file] = scorer["sha256"]
    registry.write_sums(out, sums)
    registry.clear_cache()
    return meta
