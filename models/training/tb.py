"""Train the TB scorer on lung-cropped images with the lung mask as a second channel.

The lungs come from a trained segmenter (by default the shipped ``lung-unet``) run through
the same code as the node (:meth:`models.inference.LungAnalyzer.lung_probabilities` and
:func:`models.transforms.tb_input`), so the scorer sees at training time exactly what it
sees in service. ``members`` > 1 trains an ensemble of identically configured networks
with different seeds (their logits are averaged).

The shipped operating threshold is the highest score that still gives sensitivity >= 0.90
on the validation split (the WHO screening target); with no validation split it is 0.5.
Out folder: ``checkpoint.pt``, ``train_log.jsonl``, and the exported ``tb-scorer.*``.
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

from models import metrics, networks, registry, transforms
from models.training import common
from models.training.segmentation import predict_probs


@dataclass
class TBConfig:
    """Settings of one TB-scorer run (defaults: about an hour on a 2-core CPU)."""

    data: str
    arch: str = "smallcnn"
    members: int = 1
    epochs: int = 40
    size: int = 224
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-3
    seed: int = 20240611
    device: str = "auto"
    out: str = "runs/tb"
    resume: bool = False
    limit: int | None = None
    segmenter_arch: str = "unet"
    segmenter_dir: str | None = None  # folder with lung-<arch>.pt/.json/SHA256SUMS; None = shipped
    target_sensitivity: float = 0.90
    version: str = "1.0.0"
    command: str = ""
    network: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] = field(
        default_factory=lambda: asdict(common.AugmentConfig(rotate_deg=10.0, scale=0.1, translate=0.06, noise_std=0.02))
    )


def build_inputs(arrays: common.CaseArrays, seg_net: torch.nn.Module, device: torch.device, size: int) -> np.ndarray:
    """(N, 2, size, size) TB inputs from preprocessed images via the segmenter."""
    if len(arrays.images) == 0:
        return np.zeros((0, 2, size, size), np.float32)
    probs = predict_probs(seg_net, arrays.images, device)
    return np.stack([transforms.tb_input(im, p, size) for im, p in zip(arrays.images, probs)])


@torch.no_grad()
def predict_logits(net: torch.nn.Module, x: np.ndarray, device: torch.device, batch: int = 32) -> np.ndarray:
    """Logits of ``net`` for (N, 2, S, S) inputs."""
    net.eval()
    out = [net(torch.from_numpy(x[i : i + batch]).to(device)).reshape(-1).float().cpu().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _auc(labels: np.ndarray, logits: np.ndarray) -> float:
    return metrics.roc_auc(labels, logits) if len(labels) and 0 < labels.sum() < len(labels) else float("nan")


def train(cfg: TBConfig) -> dict[str, Any]:
    """Train (or resume) the TB scorer; return the exported sidecar."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    seg = registry.load(
        registry.SEGMENTER_FILES[cfg.segmenter_arch], str(device),
        Path(cfg.segmenter_dir) if cfg.segmenter_dir else registry.WEIGHTS_DIR,
    )
    seg_size = int(seg.meta["input_size"])
    split_train = "train" if common.has_split(cfg.data, "train") else None
    tr = common.load_arrays(cfg.data, split_train, seg_size, cfg.limit)
    keep = tr.labels >= 0
    x_tr, y_tr = build_inputs(tr, seg.net, device, cfg.size)[keep], tr.labels[keep]
    if common.has_split(cfg.data, "val"):
        va = common.load_arrays(cfg.data, "val", seg_size, cfg.limit)
        k = va.labels >= 0
        x_va, y_va = build_inputs(va, seg.net, device, cfg.size)[k], va.labels[k]
    else:
        x_va, y_va = np.zeros((0, 2, cfg.size, cfg.size), np.float32), np.zeros(0, np.int64)
    if len(y_tr) == 0:
        raise ValueError(f"no labelled training cases in {cfg.data}")
    aug = common.AugmentConfig(**cfg.augment)
    ckpt, log = out / "checkpoint.pt", common.JsonlLog(out / "train_log.jsonl")
    done: list[dict[str, torch.Tensor]] = []
    member, start, resume_state = 0, 0, None
    if cfg.resume and ckpt.is_file():
        resume_state = common.load_checkpoint(ckpt)
        done, member, start = resume_state["done"], resume_state["member"], resume_state["epoch"] + 1
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).float()
    timer = common.Timer()
    while member < cfg.members:
        g = common.seed_everything(cfg.seed + member)
        net = networks.build_tb_scorer(cfg.arch, **cfg.network).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=cfg.epochs * ((len(yt) + cfg.batch_size - 1) // cfg.batch_size), pct_start=0.15
        )
        if resume_state is not None and start > 0:
            net.load_state_dict(resume_state["model"])
            opt.load_state_dict(resume_state["optimizer"])
            sched.load_state_dict(resume_state["scheduler"])
            g.set_state(resume_state["generator"])
        resume_state = None
        for epoch in range(start, cfg.epochs):
            net.train()
            order = torch.randperm(len(yt), generator=g)
            losses = []
            bar = tqdm(range(0, len(yt), cfg.batch_size), desc=f"tb member {member + 1}/{cfg.members} epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, file=sys.stderr)
            for i in bar:
                idx = order[i : i + cfg.batch_size]
                if len(idx) < 2:
                    continue  # batch norm needs more than one sample
                x = common.random_affine(xt[idx].to(device), aug, g)
                x = torch.cat([common.random_intensity(x[:, :1], aug, g), x[:, 1:]], 1)
                loss = F.binary_cross_entropy_with_logits(net(x).reshape(-1), yt[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            auc = _auc(y_va, predict_logits(net, x_va, device))
            rec = {"member": member + 1, "epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "val_auc": auc, "lr": opt.param_groups[0]["lr"], "seconds": round(timer(), 1)}
            log.write(rec)
            tqdm.write(f"member {member + 1} epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} val_auc {auc:.4f}", file=sys.stderr)
            common.save_checkpoint(ckpt, model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                   generator=g.get_state(), epoch=epoch, member=member, done=done, config=asdict(cfg))
        done.append({k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        member, start = member + 1, 0
        common.save_checkpoint(ckpt, model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                               generator=g.get_state(), epoch=-1, member=member, done=done, config=asdict(cfg))
    members = []
    for state in done:
        m = networks.build_tb_scorer(cfg.arch, **cfg.network)
        m.load_state_dict(state)
        members.append(m)
    final = members[0] if len(members) == 1 else networks.Ensemble(members)
    final.to(device)
    val_logits = predict_logits(final, x_va, device)
    val_scores = 1 / (1 + np.exp(-val_logits))
    if len(y_va) and y_va.sum() > 0:
        threshold = metrics.threshold_for_sensitivity(y_va, val_scores, cfg.target_sensitivity)
        sens, spec = metrics.sensitivity_specificity(y_va, val_scores, threshold)
    else:
        threshold, sens, spec = 0.5, float("nan"), float("nan")
    meta = {
        "name": "cxrnode-tb-scorer", "version": cfg.version, "kind": "tb", "arch": cfg.arch, "network": cfg.network,
        "members": len(members), "input_size": cfg.size, "threshold": threshold,
        "input": "lung-cropped image + lung mask (models.transforms.tb_input)",
        "segmenter_used_for_training": seg.identity.name + " " + seg.identity.version,
        "training": {"command": cfg.command, "config": asdict(cfg), "n_train": int(len(y_tr)), "n_val": int(len(y_va)),
                     "val_auc": _auc(y_va, val_logits), "val_sensitivity": sens, "val_specificity": spec,
                     "threshold_rule": f"highest threshold with val sensitivity >= {cfg.target_sensitivity}",
                     "seconds": round(timer(), 1), "device": str(device)},
    }
    return registry.save(final.cpu(), meta, registry.TB_FILE, out)
