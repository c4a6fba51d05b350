"""argparse subcommands of ``cxrnode``: ``train segmentation``, ``train tb``, ``calibrate``, ``evaluate``.

:func:`register` only builds parsers; torch and the networks are imported inside the
handlers, so ``cxrnode`` starts fast for its other commands. Every handler turns bad
input into ``SystemExit("cxrnode: error: ...")`` -- one readable line, no traceback.

``train`` trains from scratch, or fine-tunes (``--init``, :mod:`models.training.finetune`),
optionally mixing an exported set into the base data (``--extra``, :mod:`models.training.mix`),
and can register the result in the model registry (``--register``, :mod:`models.catalog`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

ARCHS = ("unet", "resunet")
TB_ARCHS = ("smallcnn", "densenet121", "resnet18")
_TRAIN_FLAGS = ("data", "arch", "epochs", "size", "batch_size", "lr", "seed", "device", "out", "resume", "limit")
SEG_FLAGS = _TRAIN_FLAGS + ("select", "ignore_disputed")
TB_FLAGS = _TRAIN_FLAGS + ("members", "folds", "refit", "shift_copies", "p_shift", "shifts", "segmenter_arch", "segmenter_dir",
                          "also_lungs_from")
#: From-scratch defaults (``--init`` switches epochs and lr to the fine-tune defaults of
#: :mod:`models.training.finetune`, and arch/size/members to those of the initial weights).
SCRATCH = {"segmentation": {"size": 256, "lr": 2e-3, "arch": "unet"},
           "tb": {"size": 224, "lr": 1e-3, "arch": "smallcnn", "epochs": 40, "members": 1}}


def _fail(message: str) -> SystemExit:
    return SystemExit(f"cxrnode: error: {message}")


def _check_data(path: str, split: str | None = None) -> None:
    from models.data import DataError, read_index

    try:
        read_index(path, split)
    except DataError as exc:
        raise _fail(str(exc)) from None


def _command_line(words: list[str], args: argparse.Namespace, names: tuple[str, ...]) -> str:
    """The full command (every setting spelled out) that reproduces this run; for the model card."""
    parts = ["cxrnode", *words]
    for name in names:
        value = getattr(args, name)
        if value is not None and value is not False:
            flag = "--" + name.replace("_", "-")
            if value is True:
                parts.append(flag)
            else:  # a repeatable option gives a list: one flag per value
                for one in value if isinstance(value, (list, tuple)) else [value]:
                    parts += [flag, shlex.quote(str(one))]
    return " ".join(parts)


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Translate expected errors into one-line SystemExit messages."""

    def run(args: argparse.Namespace) -> int:
        from models.data import DataError
        from models.registry import WeightsError

        try:
            return fn(args)
        except (DataError, WeightsError, ValueError, RuntimeError, FileNotFoundError) as exc:
            raise _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    return run


def _registry_root(args: argparse.Namespace) -> tuple[Path, str]:
    """(registry folder, segmenter arch to seed a new registry with): ``--registry DIR``, else the
    node's ``[models] registry`` (``--config FILE`` / ``$CXRNODE_CONFIG``; default ``<data_dir>/models``)."""
    if args.registry:
        return Path(args.registry), "unet"
    try:
        from node.settings import SettingsError, load_settings
    except ImportError:  # pragma: no cover - the node package is not installed
        raise _fail("--registry DIR is needed (the node's settings are not available)") from None
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        raise _fail(str(exc)) from None
    return settings.models_registry_path, settings.worker.architecture


class _Plan:
    """What a ``train`` command resolved before training: registry, initial weights, version."""

    def __init__(self, args: argparse.Namespace, kind: str) -> None:
        from models import registry as weights
        from models.training import finetune, mix

        self.kind, self.registry, self.init = kind, None, None
        self.user_version = args.version is not None
        if args.extra is not None:
            _check_data(args.extra)
            mix.ExtraSpec(args.extra, args.extra_fraction, args.extra_min_quality)  # range checks
        if args.register or finetune.needs_registry(args.init):
            root, initial_arch = _registry_root(args)
            self.registry = finetune.open_registry(root, initial_arch)
        scratch = SCRATCH[kind]
        if args.init is not None:
            self.init = finetune.resolve_init(args.init, kind, arch=args.arch, registry_=self.registry)
            # a segmenter is fully convolutional: it may be fine-tuned at another input size
            finetune.check_compatible(self.init, arch=args.arch, size=args.size if kind == "tb" else None,
                                      members=getattr(args, "members", None))
            args.arch = self.init.arch
            if kind == "tb" or args.size is None:
                args.size = self.init.size
            if kind == "tb":
                args.members = self.init.members
            if args.epochs is None:
                args.epochs = finetune.FINETUNE_EPOCHS[args.arch if kind == "segmentation" else "tb"]
            if args.lr is None:
                args.lr = finetune.FINETUNE_LR[kind]
            if self.init.origin == "registry":
                args.init = self.init.ref  # the command line names the weights, not "champion"
        else:
            for key, value in scratch.items():
                if getattr(args, key, None) is None:
                    setattr(args, key, value)
            if args.epochs is None:
                from models.training.segmentation import DEFAULT_EPOCHS

                args.epochs = DEFAULT_EPOCHS[args.arch]
        self.stem = weights.SEGMENTER_FILES[args.arch] if kind == "segmentation" else weights.TB_FILE
        if args.version is not None:
            self.version = finetune.check_version(args.version)
            if self.registry is not None and args.register and any(
                    e.stem == self.stem and e.identity.version == self.version for e in self.registry.entries()):
                raise _fail(f"{self.stem}@{self.version} is already registered: choose another --version")
        elif self.init is not None:
            self.version = finetune.finetune_version(str(self.init.meta["version"]))
        elif args.register:
            self.version = self.registry.next_version(self.stem)
        else:
            self.version = "1.0.0"
        if self.registry is not None and not self.user_version:
            self.version = finetune.unique_version(self.registry, self.stem, self.version)

    def names(self, base: tuple[str, ...], args: argparse.Namespace) -> tuple[str, ...]:
        """The flags the recorded command line spells out."""
        extra = ("init",) if args.init is not None else ()
        if args.extra is not None:
            extra += ("extra", "extra_fraction", "extra_min_quality")
        return base + extra + (("version",) if self.user_version else ())

    def finish(self, args: argparse.Namespace, meta: dict[str, Any], out: str, line: str) -> int:
        """Register (``--register``) and print the outcome: one line each, or JSON (``--json``)."""
        from models.training import finetune

        entry = finetune.register_trained(self.registry, out, self.stem, meta) if args.register else None
        if args.json:
            t = meta["training"]
            summary = {"weights": str(Path(out) / meta["weights_file"]), "name": meta["name"], "version": meta["version"],
                       "sha256": meta["sha256"], "init": t.get("init"), "metrics": finetune.metrics_of(meta),
                       "data": finetune.data_summary(meta), "seconds": t.get("seconds"),
                       "registered": None if entry is None else {"ref": entry.ref, "slot": entry.slot,
                                                                 "folder": str(entry.folder),
                                                                 "registry": str(self.registry.root)}}
            print(json.dumps(_strict(summary), indent=2, sort_keys=True))
            return 0
        print(line)
        if entry is not None:
            print(f"registered {entry.ref} in {self.registry.root} (not in service: "
                  f"cxrnode models promote {entry.ref} --data DIR --why TEXT)")
        return 0


def _strict(obj: Any) -> Any:
    """NaN -> None, for strict JSON output."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _train_segmentation(args: argparse.Namespace) -> int:
    _check_data(args.data)
    plan = _Plan(args, "segmentation")
    from models.training.segmentation import SegConfig, train

    cfg = SegConfig(data=args.data, arch=args.arch, epochs=args.epochs, size=args.size, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, device=args.device, out=args.out or f"runs/segmentation-{args.arch}",
                    resume=args.resume, limit=args.limit, version=plan.version,
                    init=plan.init.as_dict() if plan.init else None, extra=args.extra,
                    extra_fraction=args.extra_fraction, extra_min_quality=args.extra_min_quality,
                    select=args.select, ignore_disputed=args.ignore_disputed,
                    command=_command_line(["train", "segmentation"], args, plan.names(SEG_FLAGS, args)))
    meta = train(cfg)
    conv = meta["training"].get("conventions")
    return plan.finish(args, meta, cfg.out,
                       f"wrote {Path(cfg.out) / meta['weights_file']} ({meta['name']} {meta['version']}, sha256 "
                       f"{meta['sha256'][:12]}…); {'last' if cfg.select == 'last' else 'best'} epoch's val Dice at "
                       f"network size {meta['training']['best_val_dice_network_size']:.4f}"
                       + (f"; {conv['masks_includes_retrocardiac']} of {conv['masks']} training masks drawn with the "
                          "retrocardiac lung: their disputed region carried no loss" if conv else ""))


def _tb_config(args: argparse.Namespace, plan: _Plan) -> Any:
    """The :class:`~models.training.tb.TBConfig` the command line asks for."""
    from models.training.tb import TBConfig

    return TBConfig(data=args.data, arch=args.arch, members=args.members, epochs=args.epochs, size=args.size,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, out=args.out or "runs/tb",
                    resume=args.resume, limit=args.limit, segmenter_arch=args.segmenter_arch,
                    segmenter_dir=args.segmenter_dir, folds=args.folds or 0,
                    also_lungs=tuple(args.also_lungs_from or ()), shift_copies=args.shift_copies or 0,
                    p_shift=args.p_shift if args.p_shift is not None else (0.5 if args.shift_copies else 0.0),
                    shifts=tuple(n.strip() for n in args.shifts.split(",") if n.strip()) if args.shifts else (),
                    version=plan.version, init=plan.init.as_dict() if plan.init else None, extra=args.extra,
                    extra_fraction=args.extra_fraction, extra_min_quality=args.extra_min_quality,
                    network=plan.init.network if plan.init else {},
                    command=_command_line(["train", "tb"], args, plan.names(TB_FLAGS, args)))


def _check_refit(args: argparse.Namespace) -> None:
    """Refuse ``--refit`` settings whose final step (:func:`models.training.refit.attach_operating_point`)
    could not succeed, before anything is trained."""
    if not args.folds:
        raise _fail("--refit needs --folds K: the threshold and calibration come from a K-fold cross-fit")
    if args.init is not None:
        raise _fail("--refit cannot start from --init weights: its cross-fit needs members that never saw "
                    "their fold")
    if args.extra is not None:
        raise _fail("--refit cannot mix in --extra: the operating point is checked and reported on the base "
                    "training and val splits only")
    if args.limit is not None:
        raise _fail("--refit cannot use --limit: the operating point is checked against the full training split")
    if args.members is not None and args.members < 1:
        raise _fail(f"--refit --members {args.members}: the refit needs at least one member")


def _train_refit(cfg: Any) -> dict[str, Any]:
    """``--refit``: the K-fold cross-fit into OUT/cross-fit, the refit of ``cfg.members`` members on
    every training case into OUT/refit (same recipe and seed), then OUT/tb-scorer.*: the refit's
    networks with the cross-fit's calibration and threshold. Returns the final sidecar."""
    from dataclasses import replace

    from models import registry
    from models.training import tb
    from models.training.finetune import check_version
    from models.training.refit import attach_operating_point

    out = Path(cfg.out)
    cross_fit = replace(cfg, out=str(out / "cross-fit"), members=cfg.folds,
                        version=check_version(f"{cfg.version}-cross-fit"))
    refit = replace(cfg, out=str(out / "refit"), folds=0, version=check_version(f"{cfg.version}-refit"))
    tb.train(cross_fit)
    tb.train(refit)
    registry.clear_cache()  # the refit's weights were just (re)written
    return attach_operating_point(Path(refit.out), Path(cross_fit.out), cfg.data, out, version=cfg.version,
                                  device=cfg.device, segmenter_dir=Path(cfg.segmenter_dir) if cfg.segmenter_dir else None,
                                  command=cfg.command)


def _train_tb(args: argparse.Namespace) -> int:
    _check_data(args.data)
    if args.refit:
        _check_refit(args)
    if args.folds:  # one member per fold (with --refit: --members is the refit's); check_folds refuses the rest
        if args.init:  # before _Plan, which would first complain about the initial weights' member count
            raise _fail("--folds cannot start from --init weights: they have seen every training case, "
                        "so no score would be out of fold")
        if args.members is None:
            args.members = args.folds
    plan = _Plan(args, "tb")
    from models.training.tb import train

    cfg = _tb_config(args, plan)
    meta = _train_refit(cfg) if args.refit else train(cfg)
    t = meta["training"]
    n = meta["members"]
    refit = (f"; a refit: the {n} member{'s' if n != 1 else ''} of {Path(cfg.out) / 'refit'}, trained on every training "
             f"case, with the operating point of the {cfg.folds}-fold cross-fit in {Path(cfg.out) / 'cross-fit'}"
             if args.refit else "")
    return plan.finish(args, meta, cfg.out,
                       f"wrote {Path(cfg.out) / meta['weights_file']} ({meta['name']} {meta['version']}, sha256 "
                       f"{meta['sha256'][:12]}…); val AUC {t['val_auc']}, threshold {meta['threshold']:.4f}"
                       + (f" (chosen out of fold: AUC {t['cross_fit']['oof']['auc']:.3f}, sensitivity "
                          f"{t['cross_fit']['oof']['sensitivity']:.3f}, specificity {t['cross_fit']['oof']['specificity']:.3f}; "
                          f"calibrated, ECE {t['cross_fit']['oof']['ece']:.3f})" if t.get("cross_fit") else "")
                       + refit)


def _calibrate(args: argparse.Namespace) -> int:
    _check_data(args.data)
    from models.training.finetune import check_version
    from models.training.refit import attach_operating_point

    command = _command_line(["calibrate"], args, ("scorer", "cross_fit", "data", "device", "segmenter_dir", "lungs_from",
                                                  "out", "version"))
    meta = attach_operating_point(Path(args.scorer), Path(args.cross_fit), args.data, Path(args.out),
                                  version=check_version(args.version), device=args.device,
                                  segmenter_dir=Path(args.segmenter_dir) if args.segmenter_dir else None,
                                  command=command, lungs_dir=Path(args.lungs_from) if args.lungs_from else None)
    t = meta["training"]
    lungs = meta.get("calibrated_on_lungs_of")
    if args.json:
        print(json.dumps(_strict({"weights": str(Path(args.out) / meta["weights_file"]), "name": meta["name"],
                                  "version": meta["version"], "sha256": meta["sha256"], "threshold": meta["threshold"],
                                  "calibration": meta["calibration"], "val": t["val"], "cross_fit": t["cross_fit"],
                                  **({"calibrated_on_lungs_of": lungs} if lungs else {})}),
                         indent=2, sort_keys=True))
        return 0
    val = t["val"]["base"]
    print(f"wrote {Path(args.out) / meta['weights_file']} ({meta['name']} {meta['version']}: the networks of "
          f"{t['operating_point']['networks']['version']}, threshold {meta['threshold']:.4f} and calibration from "
          f"{t['operating_point']['refit_of']['version']}"
          + (f"'s members, re-scored out of fold on the lungs of {lungs} (val too)" if lungs else "")
          + f"); val AUC {val['auc']}, sensitivity {val['sensitivity']}, "
          f"specificity {val['specificity']}, ECE {t['cross_fit'].get('val_ece')}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _check_data(args.data, args.split)
    from models.evaluation import evaluate, format_table

    result = evaluate(args.data, split=args.split, arch=args.arch, device=args.device,
                      weights_dir=args.weights, progress=not args.json, overlays_dir=args.overlays,
                      per_case_csv=args.per_case, shifts=args.shift, runtime=args.runtime,
                      onnx_cache=args.onnx_cache)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _common_train(p: argparse.ArgumentParser, epochs: int | None, size: int, batch: int, lr: float,
                  epochs_help: str = "", finetune_lr: float = 0.0) -> None:
    p.add_argument("--data", required=True, help="folder with index.csv (columns case_id, source, image_path, mask_path, tb_label[, split])")
    p.add_argument("--epochs", type=int, default=None, help=epochs_help or f"epochs (default {epochs}: under an hour on a 2-core CPU)")
    p.add_argument("--size", type=int, default=None, help=f"network input size in pixels (default {size}; with --init: "
                                                          "that of the initial weights); stored with the weights")
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {lr:g}; with --init {finetune_lr:g})")
    p.add_argument("--seed", type=int, default=20240611)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", help="output folder for checkpoint, log and exported weights")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)  # first N cases per split (smoke tests)
    ft = p.add_argument_group("fine-tuning, data mixing and registration")
    ft.add_argument("--init", metavar="REF|PATH|shipped|champion",
                    help="start from existing weights (fine-tuning): the shipped weights, the model registry's champion, "
                         "a registry reference such as lung-unet@1.0.0, or a folder (or .json) with weights and sidecar; "
                         "keeps their architecture (and, TB, input size; a segmenter may take another --size)")
    ft.add_argument("--extra", metavar="DIR", help="an exported set (DIR/index.csv, cxrnode dataset export) mixed into "
                                                   "training; its val rows are validated and reported on their own")
    ft.add_argument("--extra-fraction", type=float, default=0.3, metavar="P",
                    help="share 0..1 of each epoch's samples drawn from --extra (default 0.3; small sets are repeated)")
    ft.add_argument("--extra-min-quality", type=float, default=0.0, metavar="Q",
                    help="drop pseudo-label masks of --extra scoring below Q (default 0: as exported); manual masks are "
                         "always kept")
    ft.add_argument("--version", help="version of the trained model (default: <initial version>+ft.<UTC yyyymmddHHMM> "
                                      "with --init; the next minor version with --register; else 1.0.0); "
                                      "written into the sidecar and every SEG/SR")
    ft.add_argument("--register", action="store_true",
                    help="register the trained weights in the model registry (card, data.json, metrics.json); "
                         "does not put them in service")
    ft.add_argument("--registry", metavar="DIR", help="model registry folder (default: the node's [models] registry)")
    ft.add_argument("--config", metavar="FILE", help="node settings (TOML) for the registry folder (default $CXRNODE_CONFIG)")
    ft.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def register(subparsers: Any) -> None:
    """Add ``train`` (``segmentation``, ``tb``), ``calibrate`` and ``evaluate`` to an argparse subparsers object."""
    train = subparsers.add_parser("train", help="train a lung segmenter or the TB scorer")
    tsub = train.add_subparsers(dest="train_what", metavar="{segmentation,tb}", required=True)
    seg = tsub.add_parser("segmentation", help="train a lung segmenter")
    _common_train(seg, epochs=None, size=256, batch=8, lr=2e-3, finetune_lr=2e-4,
                  epochs_help="epochs (default: unet 60, resunet 15 -- each under an hour on a 2-core CPU; "
                              "with --init: unet 10, resunet 4)")
    seg.add_argument("--arch", choices=ARCHS, default=None,
                     help="unet (default) or resunet; with --init: that of the initial weights "
                          "(with --init shipped: which shipped segmenter to start from)")
    seg.add_argument("--select", choices=("val", "last"), default="val",
                     help="which epoch to export: val = best val Dice (default; val then chose it), last = the last "
                          "epoch (val is only logged, so it stays an honest check)")
    seg.add_argument("--ignore-disputed", action="store_true",
                     help="with --init: training masks that draw the lung behind the heart (labelled by the initial "
                          "weights, cut-off from the Montgomery training masks) carry no loss in that disputed region, "
                          "so the network follows the NLM convention deliberately (models/conventions.py)")
    seg.set_defaults(func=_guard(_train_segmentation))
    tb = tsub.add_parser("tb", help="train the TB scorer")
    _common_train(tb, epochs=40, size=224, batch=16, lr=1e-3, finetune_lr=1e-4,
                  epochs_help="epochs per member (default 40; with --init 8)")
    tb.add_argument("--arch", choices=TB_ARCHS, default=None,
                    help="smallcnn (default), densenet121 or resnet18; with --init: that of the initial weights")
    tb.add_argument("--members", type=int, default=None,
                    help="ensemble size (seeds; default 1; with --init: that of the initial weights)")
    tb.add_argument("--folds", type=int, default=None, metavar="K",
                    help="cross-fitting: K members, member k trained without fold k of the training split; the "
                         "out-of-fold scores fit the score's calibration and choose the threshold, so the val "
                         "split chooses nothing (implies --members K)")
    tb.add_argument("--refit", action="store_true",
                    help="with --folds K: after the cross-fit (OUT/cross-fit), train the members again on every "
                         "training case by the same recipe (OUT/refit; --members M, default K) and write to OUT "
                         "the refit's networks with the cross-fit's calibration and threshold (as cxrnode calibrate)")
    tb.add_argument("--shift-copies", type=int, default=None, metavar="N",
                    help="acquisition-shift augmentation: N shifted versions of each training image (raw image -> "
                         "shift -> segmenter -> crop, as the node sees it), precomputed once (default 0: off)")
    tb.add_argument("--p-shift", type=float, default=None, metavar="P",
                    help="probability that a training sample is replaced by one of its shifted versions "
                         "(default 0.5 with --shift-copies)")
    tb.add_argument("--shifts", metavar="NAME[,NAME...]",
                    help="shifts to draw from (models.shifts; default: all of them)")
    tb.add_argument("--segmenter-arch", choices=ARCHS, default="unet", help="segmenter that finds the lungs")
    tb.add_argument("--segmenter-dir", help="folder holding that segmenter's weights (default: shipped)")
    tb.add_argument("--also-lungs-from", action="append", metavar="ARCH|DIR",
                    help="another segmenter (a shipped arch or a weights folder; repeatable) whose lungs a training "
                         "sample is drawn from, uniformly with the main one's, so the scorer does not hang on one "
                         "segmenter's outline; validation and the out-of-fold scores use the main segmenter's lungs")
    tb.set_defaults(func=_guard(_train_tb))
    cal = subparsers.add_parser(
        "calibrate", help="give a TB scorer trained on every training case the calibration and threshold of a "
                          "cross-fitted run of the same recipe (a refit)")
    cal.add_argument("--scorer", required=True, metavar="DIR",
                     help="folder with the refit tb-scorer.* (train tb without --folds)")
    cal.add_argument("--cross-fit", required=True, metavar="DIR",
                     help="folder with the cross-fitted run's tb-scorer.* (train tb --folds K, same recipe)")
    cal.add_argument("--data", required=True, help="folder with index.csv: the training split is checked, the "
                                                   "val split reported at the threshold (it chooses nothing)")
    cal.add_argument("--out", required=True, metavar="DIR", help="where the recalibrated tb-scorer.* go")
    cal.add_argument("--version", required=True, help="the new model's version")
    cal.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    cal.add_argument("--segmenter-dir", help="folder holding the segmenter the scorer was trained with (default: shipped)")
    cal.add_argument("--lungs-from", metavar="DIR",
                     help="folder holding a new segmenter of the recipe's architecture (lung-<arch>.*): the "
                          "calibration and threshold are fitted again on the cross-fit members' out-of-fold scores "
                          "on its lungs, and val is reported on them (the networks stay; for shipping a new segmenter)")
    cal.add_argument("--json", action="store_true", help="print JSON instead of a line")
    cal.set_defaults(func=_guard(_calibrate))
    ev = subparsers.add_parser("evaluate", help="evaluate the shipped models on a data folder")
    ev.add_argument("--data", required=True, help="folder with index.csv")
    ev.add_argument("--split", help="evaluate only this split (default: all cases)")
    ev.add_argument("--arch", choices=ARCHS, default="unet")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ev.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                    help="run the networks in torch (default) or as ONNX in onnxruntime on the CPU, as the node "
                         "does with [worker] runtime")
    ev.add_argument("--onnx-cache", metavar="DIR",
                    help="where --runtime onnx keeps its exports (default $XDG_CACHE_HOME/cxrnode/onnx)")
    ev.add_argument("--overlays", metavar="DIR",
                    help="also write prediction | reference | difference pictures per case and DIR/index.html, worst first")
    ev.add_argument("--per-case", metavar="FILE.csv",
                    help="also write one row per case: case_id, source, tb_label, tb_score, tb_call, dice, jaccard, hd95")
    ev.add_argument("--shift", metavar="NAME[,NAME...]",
                    help="stress test: evaluate with each simulated acquisition shift applied to every image (seeded "
                         "per case, reruns identical) next to 'none': gamma, blur, noise, border, text, crop, invert, "
                         "film (models/shifts.py); NAME:STRENGTH for another strength")
    ev.add_argument("--weights", help=argparse.SUPPRESS)  # alternative weights folder (tests)
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(func=_guard(_evaluate))
