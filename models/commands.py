"""argparse subcommands of ``cxrnode``: ``train segmentation``, ``train tb``, ``evaluate``.

:func:`register` only builds parsers; torch and the networks are imported inside the
handlers, so ``cxrnode`` starts fast for its other commands. Every handler turns bad
input into ``SystemExit("cxrnode: error: ...")`` -- one readable line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any, Callable

ARCHS = ("unet", "resunet")
TB_ARCHS = ("smallcnn", "densenet121", "resnet18")
_TRAIN_FLAGS = ("data", "arch", "epochs", "size", "batch_size", "lr", "seed", "device", "out", "resume", "limit")
SEG_FLAGS = _TRAIN_FLAGS
TB_FLAGS = _TRAIN_FLAGS + ("members", "segmenter_arch", "segmenter_dir")


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
            parts += [flag] if value is True else [flag, shlex.quote(str(value))]
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


def _train_segmentation(args: argparse.Namespace) -> int:
    _check_data(args.data)
    from models.training.segmentation import SegConfig, train

    from models.training.segmentation import DEFAULT_EPOCHS

    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.arch]
    cfg = SegConfig(data=args.data, arch=args.arch, epochs=args.epochs, size=args.size, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, device=args.device, out=args.out or f"runs/segmentation-{args.arch}",
                    resume=args.resume, limit=args.limit,
                    command=_command_line(["train", "segmentation"], args, SEG_FLAGS))
    meta = train(cfg)
    print(f"wrote {Path(cfg.out) / meta['weights_file']} (sha256 {meta['sha256'][:12]}…); "
          f"best val Dice at network size {meta['training']['best_val_dice_network_size']:.4f}")
    return 0


def _train_tb(args: argparse.Namespace) -> int:
    _check_data(args.data)
    from models.training.tb import TBConfig, train

    cfg = TBConfig(data=args.data, arch=args.arch, members=args.members, epochs=args.epochs, size=args.size,
                   batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, out=args.out or "runs/tb",
                   resume=args.resume, limit=args.limit, segmenter_arch=args.segmenter_arch,
                   segmenter_dir=args.segmenter_dir,
                   command=_command_line(["train", "tb"], args, TB_FLAGS))
    meta = train(cfg)
    t = meta["training"]
    print(f"wrote {Path(cfg.out) / meta['weights_file']} (sha256 {meta['sha256'][:12]}…); val AUC {t['val_auc']}, "
          f"threshold {meta['threshold']:.4f}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _check_data(args.data, args.split)
    from models.evaluation import evaluate, format_table

    result = evaluate(args.data, split=args.split, arch=args.arch, device=args.device,
                      weights_dir=args.weights, progress=not args.json, overlays_dir=args.overlays)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _common_train(p: argparse.ArgumentParser, epochs: int | None, size: int, batch: int, lr: float,
                  epochs_help: str = "") -> None:
    p.add_argument("--data", required=True, help="folder with index.csv (columns case_id, source, image_path, mask_path, tb_label[, split])")
    p.add_argument("--epochs", type=int, default=epochs, help=epochs_help or f"epochs (default {epochs}: under an hour on a 2-core CPU)")
    p.add_argument("--size", type=int, default=size, help=f"network input size in pixels (default {size}); stored with the weights")
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=20240611)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", help="output folder for checkpoint, log and exported weights")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)  # first N cases per split (smoke tests)


def register(subparsers: Any) -> None:
    """Add ``train`` (``segmentation``, ``tb``) and ``evaluate`` to an argparse subparsers object."""
    train = subparsers.add_parser("train", help="train a lung segmenter or the TB scorer")
    tsub = train.add_subparsers(dest="train_what", metavar="{segmentation,tb}", required=True)
    seg = tsub.add_parser("segmentation", help="train a lung segmenter")
    _common_train(seg, epochs=None, size=256, batch=8, lr=2e-3,
                  epochs_help="epochs (default: unet 60, resunet 15 -- each under an hour on a 2-core CPU)")
    seg.add_argument("--arch", choices=ARCHS, default="unet")
    seg.set_defaults(func=_guard(_train_segmentation))
    tb = tsub.add_parser("tb", help="train the TB scorer")
    _common_train(tb, epochs=40, size=224, batch=16, lr=1e-3)
    tb.add_argument("--arch", choices=TB_ARCHS, default="smallcnn")
    tb.add_argument("--members", type=int, default=1, help="ensemble size (seeds)")
    tb.add_argument("--segmenter-arch", choices=ARCHS, default="unet", help="segmenter that finds the lungs")
    tb.add_argument("--segmenter-dir", help="folder holding that segmenter's weights (default: shipped)")
    tb.set_defaults(func=_guard(_train_tb))
    ev = subparsers.add_parser("evaluate", help="evaluate the shipped models on a data folder")
    ev.add_argument("--data", required=True, help="folder with index.csv")
    ev.add_argument("--split", help="evaluate only this split (default: all cases)")
    ev.add_argument("--arch", choices=ARCHS, default="unet")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ev.add_argument("--overlays", metavar="DIR",
                    help="also write prediction | reference | difference pictures per case and DIR/index.html, worst first")
    ev.add_argument("--weights", help=argparse.SUPPRESS)  # alternative weights folder (tests)
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(func=_guard(_evaluate))
