"""Train a lung segmenter (``unet`` or ``resunet``) on the masked cases of a data folder.

Loss: BCE + soft Dice on area-resampled (soft) masks. Optimiser: AdamW with a cosine
learning-rate schedule. Augmentation: small random affine (rotation, scale, shear,
translation) applied to image and mask together, then gamma, contrast/brightness and
Gaussian noise on the image. No flips (left/right is anatomy here). The best epoch by
validation Dice (at network size) is exported with :func:`models.registry.save`.

Out folder: ``checkpoint.pt`` (resume), ``train_log.jsonl`` (one line per epoch) and the
exported ``lung-<arch>.pt`` / ``.json`` / ``SHA256SUMS`` ready to copy into ``models/weights``.

Fine-tuning (``init``, :mod:`models.training.finetune`) starts from verified existing weights and
logs their val Dice as epoch 0. An extra set (``extra``, :mod:`models.training.mix`) is mixed into
every epoch in the given proportion; its val rows are validated next to the base val split, and
the best epoch is chosen on the val cases whose mask a person drew (all val cases if none is).

Epoch selection (``select``): ``val`` exports the epoch with the best val Dice (val then chose the
epoch, so its figures are optimistic); ``last`` exports the last epoch and only logs val, so val
chooses nothing and stays an honest check.

Mask conventions (``ignore_disputed``, :mod:`models.conventions`): most reference masks leave the
lung behind the heart out, some draw it. Trained on both, a network learns their average there by
accident. With ``ignore_disputed`` the initial weights (``init``) are the NLM-convention yardstick:
training masks they label ``includes_retrocardiac`` (the audit's rule, at network size, cut-off from
the Montgomery training masks) carry no loss in the region the two conventions dispute, so the
network follows one convention deliberately and the rest of those masks still teach it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import conventions, networks, registry
from models.training import common, finetune, mix

#: Default epochs per arch: each fits in about an hour on a 2-core CPU at 256 px, batch 8
#: (measured: unet ~0.75 s, resunet ~3.7 s per batch of 8 with forward+backward).
DEFAULT_EPOCHS = {"unet": 60, "resunet": 15}
#: How the exported epoch is chosen: best val Dice, or the last epoch (val chooses nothing).
SELECTIONS = ("val", "last")


@dataclass
class SegConfig:
    """Settings of one segmentation run (defaults: about an hour on a 2-core CPU for unet)."""

    data: str
    arch: str = "unet"
    epochs: int = 60
    size: int = 256
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 20240611
    device: str = "auto"
    out: str = "runs/segmentation"
    resume: bool = False
    limit: int | None = None  # use only the first N cases of each split (smoke tests)
    version: str = "1.0.0"
    command: str = ""
    #: initial weights (:meth:`models.training.finetune.InitWeights.as_dict`); None = from scratch
    init: dict[str, Any] | None = None
    #: extra training set mixed in (:mod:`models.training.mix`); None = base data only
    extra: str | None = None
    extra_fraction: float = mix.DEFAULT_FRACTION
    extra_min_quality: float = mix.DEFAULT_MIN_QUALITY
    augment: dict[str, Any] = field(default_factory=lambda: asdict(common.AugmentConfig()))
    #: ``val``: export the best val epoch; ``last``: the last epoch (val chooses nothing)
    select: str = "val"
    #: no loss in the disputed retrocardiac region of masks drawn the other way (needs ``init``)
    ignore_disputed: bool = False


def seg_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits plus (1 - soft Dice) per batch; ``weight`` (same shape, 0..1) leaves pixels
    out of both terms (0 = no loss there)."""
    if weight is None:
        bce = F.binary_cross_entropy_with_logits(logits, target)
        p, t = torch.sigmoid(logits), target
    else:
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce = (per_pixel * weight).sum() / weight.sum().clamp(min=1.0)
        p, t = torch.sigmoid(logits) * weight, target * weight
    inter = (p * t).sum(dim=(1, 2, 3))
    denom = p.sum(dim=(1, 2, 3)) + t.sum(dim=(1, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return bce + (1 - dice).mean()


def disputed_maps(net: torch.nn.Module, arrays: common.CaseArrays, device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    """Per training case, where its mask's convention is disputed (1 = no loss), with ``net`` (the
    initial weights) as the NLM-convention yardstick; and a summary for the sidecar."""
    probs = predict_probs(net, arrays.images, device)
    pred, ref = probs >= 0.5, arrays.masks >= 0.5
    has = arrays.has_mask
    shares = [conventions.missed_heart_side_share(p, r) if h else 0.0 for p, r, h in zip(pred, ref, has)]
    try:
        cut = conventions.cutoff([s for s, h in zip(shares, has) if h], [src for src, h in zip(arrays.sources, has) if h])
    except ValueError as exc:
        raise ValueError(f"--ignore-disputed: {exc}") from None
    ignore = np.zeros(arrays.masks.shape, np.float32)
    labelled: list[str] = []
    lung_share = []
    by_source: dict[str, int] = {}
    for i, (share, h) in enumerate(zip(shares, has)):
        if h and conventions.label(share, cut) == conventions.INCLUDES:
            region = conventions.disputed_region(pred[i], ref[i])
            ignore[i] = region
            labelled.append(arrays.case_ids[i])
            lung_share.append(float((region & ref[i]).sum() / max(1, ref[i].sum())))
            by_source[arrays.sources[i]] = by_source.get(arrays.sources[i], 0) + 1
    summary = {
        "rule": f"{conventions.CUTOFF_FACTOR} x the 95th percentile of the missed heart-side share over the "
                f"{conventions.DEFINING_SOURCE} training masks, with the initial weights at network size; no loss in "
                "the disputed region (reference lung on the heart side the initial weights leave out, grown 2 px) "
                "of the masks above it",
        "cutoff": cut, "masks": int(has.sum()), "masks_includes_retrocardiac": len(labelled), "by_source": by_source,
        "disputed_share_of_their_lung_mean": float(np.mean(lung_share)) if lung_share else 0.0,
        "case_ids": labelled,
    }
    return ignore, summary


@torch.no_grad()
def predict_probs(net: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int = 16) -> np.ndarray:
    """Sigmoid outputs of ``net`` for (N, S, S) preprocessed images; float32 on the CPU."""
    net.eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch])[:, None].to(device)
        out.append(torch.sigmoid(net(x))[:, 0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:], np.float32)


def dice_per_case(net: torch.nn.Module, arrays: common.CaseArrays, device: torch.device) -> np.ndarray:
    """Dice of each case at network size (thresholded prediction vs thresholded soft target)."""
    if len(arrays.images) == 0:
        return np.zeros(0, np.float64)
    probs = predict_probs(net, arrays.images, device)
    p, t = probs >= 0.5, arrays.masks >= 0.5
    inter = (p & t).sum(axis=(1, 2))
    return 2 * inter / np.maximum(1, p.sum(axis=(1, 2)) + t.sum(axis=(1, 2)))


def val_dice(net: torch.nn.Module, arrays: common.CaseArrays, device: torch.device) -> float:
    """Mean Dice at network size (thresholded prediction vs thresholded soft target)."""
    if len(arrays.images) == 0:
        return float("nan")
    return float(np.mean(dice_per_case(net, arrays, device)))


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def val_report(net: torch.nn.Module, sets: dict[str, common.CaseArrays],
               device: torch.device) -> tuple[float, dict[str, Any]]:
    """(selection Dice, report) over the validation sets (``base``, and ``extra`` when mixing).

    The report gives each set's case count, mean Dice and mean Dice per ``source``, and ``all``
    when there are several sets. The selection Dice is the mean over the cases whose mask a person
    drew (not a pseudo-label), or over all cases when none is; NaN without validation cases.
    """
    def by_source(d: np.ndarray, sources: list[str]) -> dict[str, float]:
        return {src: float(np.mean(d[[s == src for s in sources]])) for src in sorted(set(sources))}

    report: dict[str, Any] = {}
    dices, human, sources = [], [], []
    for name, a in sets.items():
        d = dice_per_case(net, a, device)
        report[name] = {"n": len(d), "dice": _mean(d), "by_source": by_source(d, a.sources)}
        dices.append(d)
        human.append(mix.human_labelled(a))
        sources += a.sources
    every, is_human = np.concatenate(dices), np.concatenate(human)
    if len(sets) > 1:
        report["all"] = {"n": len(every), "dice": _mean(every), "by_source": by_source(every, sources)}
    if not len(every):
        return float("nan"), report
    return float(np.mean(every[is_human] if is_human.any() else every)), report


def _masked(cases: list) -> list:
    return [c for c in cases if c.mask_path is not None]


def _load_masked(cases: list, size: int) -> common.CaseArrays:
    """The cases with a mask, preprocessed (rows without one are skipped for segmentation)."""
    return common.load_cases(_masked(cases), size)


def train(cfg: SegConfig) -> dict[str, Any]:
    """Run (or resume) training; return the exported sidecar."""
    if cfg.arch not in networks.SEGMENTATION_ARCHS:
        raise ValueError(f"unknown arch {cfg.arch!r}")
    init = finetune.init_from_config(cfg.init)
    if cfg.select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, not {cfg.select!r}")
    if cfg.ignore_disputed and init is None:
        raise ValueError("--ignore-disputed needs --init: the initial weights are the yardstick that tells "
                         "the two mask conventions apart")
    if init is not None:
        finetune.check_compatible(init, arch=cfg.arch)  # fully convolutional: cfg.size may differ from init.size
    extra = mix.ExtraSpec(cfg.extra, cfg.extra_fraction, cfg.extra_min_quality) if cfg.extra else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = common.pick_device(cfg.device)
    g = common.seed_everything(cfg.seed)
    aug = common.AugmentConfig(**cfg.augment)
    base_train_rows = mix.read_split(cfg.data, "train", cfg.limit)
    base_val_rows = mix.read_split(cfg.data, "val", cfg.limit)
    train_a = _load_masked(base_train_rows, cfg.size)
    val_sets = {mix.BASE: _load_masked(base_val_rows, cfg.size)}
    summary: dict[str, Any] = {mix.BASE: {
        "folder": str(Path(cfg.data).resolve()),
        "train": mix.set_summary(base_train_rows, _masked(base_train_rows)),
        "val": mix.set_summary(base_val_rows, _masked(base_val_rows)),
    }}
    n_base, extra_train = len(train_a.images), common.empty_arrays(cfg.size)
    if extra is not None:
        rows = {split: mix.read_split(extra.folder, split, cfg.limit) for split in ("train", "val")}
        kept = {split: mix.apply_quality_floor(r, extra.min_quality) for split, r in rows.items()}
        extra_train = _load_masked(kept["train"][0], cfg.size)
        val_sets[mix.EXTRA] = _load_masked(kept["val"][0], cfg.size)
        summary[mix.EXTRA] = {
            "folder": str(Path(extra.folder).resolve()), "fraction": extra.fraction, "min_quality": extra.min_quality,
            "samples_per_epoch": mix.epoch_sizes(n_base, len(extra_train), extra.fraction),
            **{split: mix.set_summary(rows[split], _masked(kept[split][0]), kept[split][1]) for split in ("train", "val")},
        }
        if len(extra_train.images) == 0:
            raise ValueError(f"no training cases with a mask in the extra set {extra.folder}"
                             + (f" (after --extra-min-quality {extra.min_quality})" if extra.min_quality > 0 else ""))
        if n_base == 0 and extra.fraction < 1:
            raise ValueError(f"no training cases with a mask in {cfg.data} (only --extra-fraction 1 trains on the extra set alone)")
    elif n_base == 0:
        raise ValueError(f"no training cases with a mask in {cfg.data}")
    net = (finetune.build_initial(init) if init is not None else networks.build_segmenter(cfg.arch)).to(device)
    ignore_maps, convention_summary = None, None
    if cfg.ignore_disputed:  # before a resume loads later weights: the yardstick is the initial network
        ignore_maps, convention_summary = disputed_maps(net, train_a, device)
        tqdm.write(f"--ignore-disputed: {convention_summary['masks_includes_retrocardiac']} of "
                   f"{convention_summary['masks']} training masks include the retrocardiac lung; their disputed "
                   f"region carries no loss", file=sys.stderr)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs), eta_min=cfg.lr * 0.01)
    ckpt, log = out / "checkpoint.pt", common.JsonlLog(out / "train_log.jsonl")
    start, best, best_state, best_epoch, best_report, initial_report = 0, -1.0, None, None, None, None
    if cfg.resume and ckpt.is_file():
        state = common.load_checkpoint(ckpt)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g.set_state(state["generator"])
        start, best, best_state = state["epoch"] + 1, state["best"], state["best_state"]
        best_epoch, best_report = state.get("best_epoch"), state.get("best_report")
        initial_report = state.get("initial_report")
    elif init is not None:  # the starting point, for comparison: the initial weights on the val sets
        vd0, initial_report = val_report(net, val_sets, device)
        log.write({"epoch": 0, "val_dice": vd0, "val": initial_report, "init": init.ref, "seconds": 0.0})
        tqdm.write(f"initial weights {init.ref}: val_dice {vd0:.4f}", file=sys.stderr)
    both = mix.concat(train_a, extra_train) if extra is not None else train_a
    images = torch.from_numpy(both.images)[:, None]
    masks = torch.from_numpy(both.masks)[:, None]
    ignore = None
    if ignore_maps is not None:  # extra-set masks (pseudo labels of an NLM segmenter) are never disputed
        ignore = torch.zeros_like(masks)
        ignore[: len(ignore_maps), 0] = torch.from_numpy(ignore_maps)
    n_extra = len(extra_train.images) if extra is not None else 0
    fraction = extra.fraction if extra is not None else 0.0
    timer = common.Timer()
    for epoch in range(start, cfg.epochs):
        net.train()
        order = mix.epoch_order(n_base, n_extra, fraction, g)
        losses = []
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"{cfg.arch} epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
        for i in bar:
            idx = order[i : i + cfg.batch_size]
            x, y = images[idx].to(device), masks[idx].to(device)
            if ignore is None:
                both_xy = common.random_affine(torch.cat([x, y], 1), aug, g)
                x, y = common.random_intensity(both_xy[:, :1], aug, g), both_xy[:, 1:].clamp(0, 1)
                loss = seg_loss(net(x), y)
            else:  # the ignore map moves with the mask
                both_xy = common.random_affine(torch.cat([x, y, ignore[idx].to(device)], 1), aug, g)
                x, y = common.random_intensity(both_xy[:, :1], aug, g), both_xy[:, 1:2].clamp(0, 1)
                loss = seg_loss(net(x), y, weight=1 - both_xy[:, 2:].clamp(0, 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        sched.step()
        vd, report = val_report(net, val_sets, device)
        if cfg.select == "last" or np.isnan(vd) or vd > best:  # without a val split the last epoch is kept
            best = vd if not np.isnan(vd) else best
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            best_epoch, best_report = epoch + 1, report
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": vd, "best_val_dice": best,
                  "lr": opt.param_groups[0]["lr"], "seconds": round(timer(), 1)}
        if extra is not None:
            record.update(val=report, drawn={mix.BASE: int((order < n_base).sum()), mix.EXTRA: int((order >= n_base).sum())})
        log.write(record)
        tqdm.write(f"epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f} val_dice {vd:.4f}", file=sys.stderr)
        common.save_checkpoint(ckpt, model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                               generator=g.get_state(), epoch=epoch, best=best, best_state=best_state, config=asdict(cfg),
                               best_epoch=best_epoch, best_report=best_report, initial_report=initial_report)
    if best_state is not None:
        net.load_state_dict(best_state)
    has_human = any(mix.human_labelled(a).any() for a in val_sets.values())
    meta = {
        "name": f"cxrnode-lung-{cfg.arch}", "version": cfg.version, "kind": "segmentation", "arch": cfg.arch,
        "network": {}, "input_size": cfg.size, "threshold": 0.5,
        "training": {"command": cfg.command, "config": asdict(cfg), "n_train": len(both.images),
                     "n_val": sum(len(a.images) for a in val_sets.values()),
                     "best_val_dice_network_size": best, "seconds": round(timer(), 1), "device": str(device)},
    }
    meta["training"].update(
        init=init.as_dict() if init is not None else None, data=summary, val=best_report, val_initial=initial_report,
        best_epoch=best_epoch,
        selection=("the last epoch (val chose nothing; its Dice is only logged)" if cfg.select == "last" else
                   "mean val Dice over the cases with a manual mask" if has_human else "mean val Dice over all val cases"),
        conventions=convention_summary,
    )
    return registry.save(net.cpu(), meta, registry.SEGMENTER_FILES[cfg.arch], out)
