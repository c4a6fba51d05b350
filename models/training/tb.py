"""Train the TB scorer on lung-cropped images with the lung mask as a second channel.

The lungs come from a trained segmenter (by default the shipped ``lung-unet``) run through
the same code as the node (:meth:`models.inference.LungAnalyzer.lung_probabilities` and
:func:`models.transforms.tb_input`), so the scorer sees at training time exactly what it
sees in service. ``members`` > 1 trains an ensemble of identically configured networks
with different seeds (their logits are averaged).

The operating threshold is the highest score that still gives sensitivity >= 0.90 (the WHO
screening target). Without cross-fitting it is chosen on the validation split (with no
validation split it is 0.5), so the val figures at it are optimistic.

Cross-fitting (``folds`` = K >= 2) chooses it without the validation split: the labelled
training cases are dealt into K folds stratified by source x label, member k of the K-member
ensemble trains without fold k, and each training case gets an out-of-fold logit from the one
member that never saw it. Platt scaling (:func:`models.metrics.fit_platt`) is fitted on those
out-of-fold logits, so the score means a probability (:func:`models.registry.calibrate`; the
sidecar's ``calibration``), and the threshold is chosen on the calibrated out-of-fold scores.
The validation split then chooses nothing, and its figures at that threshold are an honest
check. (Calibration and threshold come from single members' logits and are applied to the
ensemble's mean logit, which is a little less extreme; the val ECE shows what that costs.)

Acquisition shifts (``shifts``, ``shift_copies``, ``p_shift``): before training, each training
case gets ``shift_copies`` extra versions of its *raw* image, each under one randomly drawn
shift of :mod:`models.shifts` (other detectors' LUTs, blur, noise, borders, burned-in text,
cropping, inverted polarity, digitised film), run through preprocessing, the segmenter and the
TB crop exactly as the node would see it, so the lungs and the crop follow the shift. In each
batch a sample is replaced by one of its shifted versions with probability ``p_shift``. Off
unless asked; the draws are seeded by ``seed`` and the case id.
Out folder: ``checkpoint.pt``, ``train_log.jsonl``, and the exported ``tb-scorer.*``.

Fine-tuning (``init``) starts each member from the same member of the initial weights (same
architecture, input size and member count). An extra set (``extra``) is mixed into every epoch in
the given proportion; the threshold is then chosen on the base and extra val cases together, and
AUC, sensitivity and specificity are reported for each set and for both.
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

from models import data, metrics, networks, registry, transforms
from models.training import common, finetune, mix
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
    #: K >= 2: cross-fitting (see the module doc; ``members`` must equal K); 0 = off
    folds: int = 0
    #: acquisition shifts drawn from (:mod:`models.shifts` names); () = all of them when shift_copies > 0
    shifts: tuple[str, ...] = ()
    #: shifted versions precomputed per training case (0 = no shift augmentation)
    shift_copies: int = 0
    #: probability that a training sample is replaced by one of its shifted versions
    p_shift: float = 0.0
    version: str = "1.0.0"
    command: str = ""
    #: initial weights (:meth:`models.training.finetune.InitWeights.as_dict`); None = from scratch
    init: dict[str, Any] | None = None
    #: extra training set mixed in (:mod:`models.training.mix`); None = base data only
    extra: str | None = None
    extra_fraction: float = mix.DEFAULT_FRACTION
    extra_min_quality: float = mix.DEFAULT_MIN_QUALITY
    #: more segmenters (a shipped arch name or a weights folder) whose lungs a training sample is drawn
    #: from, uniformly with the main one's: the scorer learns not to hang on one segmenter's outline
    #: (validation, out-of-fold scores and the node use the main segmenter's lungs)
    also_lungs: tuple[str, ...] = ()
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


def _labelled(cases: list) -> list:
    return [c for c in cases if c.tb_label is not None]


def shifted_inputs(cases: list, seg: Any, seg_size: int, device: torch.device, size: int, names: tuple[str, ...],
                   copies: int, seed: int) -> tuple[np.ndarray, list[list[str]]]:
    """(N, copies, 2, size, size) TB inputs of the labelled ``cases``, each copy from the raw image under
    one shift drawn from ``names`` (seeded by ``seed``, the case id and the copy number), through the
    same preprocessing, segmenter and crop as :func:`build_inputs`; and the shift names drawn."""
    from models import shifts

    labelled = _labelled(cases)
    out = np.zeros((len(labelled), copies, 2, size, size), np.float32)
    drawn: list[list[str]] = []
    for i, case in enumerate(labelled):
        raw = data.load_image(case.image_path)
        images, names_i = [], []
        for c in range(copies):
            rng = shifts.case_rng(seed, case.case_id, f"train-copy-{c}")
            name = names[int(rng.integers(len(names)))]
            images.append(transforms.preprocess(shifts.apply(name, raw, rng), seg_size))
            names_i.append(name)
        probs = predict_probs(seg.net, np.stack(images).astype(np.float32), device)
        out[i] = np.stack([transforms.tb_input(im, p, size) for im, p in zip(images, probs)])
        drawn.append(names_i)
    return out, drawn


def _check_shifts(cfg: TBConfig) -> tuple[str, ...]:
    """The shift names to draw from (validated), or () when shift augmentation is off."""
    from models import shifts

    if cfg.shift_copies < 0 or not 0 <= cfg.p_shift <= 1:
        raise ValueError(f"shift_copies {cfg.shift_copies} must be >= 0 and p_shift {cfg.p_shift} in [0, 1]")
    if cfg.shift_copies == 0:
        if cfg.p_shift > 0 or cfg.shifts:
            raise ValueError("--p-shift and --shifts need --shift-copies >= 1")
        return ()
    names = tuple(cfg.shifts) or shifts.names()
    for name in names:
        shifts.get(name)
    return names


def segmenter_in(folder: Path, device: torch.device | str, what: str, arch: str | None = None) -> Any:
    """The segmenter in ``folder``: that of ``arch`` when given, else the only one there (refused,
    naming ``what``, when the folder holds none or several)."""
    if arch is None:
        found = [s for s in registry.SEGMENTER_FILES.values() if (Path(folder) / f"{s}.json").is_file()]
        if len(found) != 1:
            raise ValueError(f"{what}: {folder} must hold exactly one lung-<arch>.* (found {len(found)})")
        return registry.load(found[0], str(device), Path(folder))
    return registry.load(registry.SEGMENTER_FILES[arch], str(device), Path(folder))


def load_also_lungs(refs: tuple[str, ...] | list[str], main: Any, device: torch.device) -> list[Any]:
    """The segmenters of ``TBConfig.also_lungs``: a shipped arch name or a folder of weights; refuses
    the main segmenter itself and repeats (they would only weight its lungs more)."""
    out, seen = [], {main.identity.sha256}
    for ref in refs:
        if ref in registry.SEGMENTER_FILES:
            seg = segmenter_in(registry.WEIGHTS_DIR, device, "--also-lungs-from", arch=ref)
        else:
            seg = segmenter_in(Path(ref), device, f"--also-lungs-from {ref} (not a shipped segmenter: "
                                                  f"{', '.join(registry.SEGMENTER_FILES)})")
        if seg.identity.sha256 in seen:
            raise ValueError(f"--also-lungs-from {ref}: {seg.identity.name} {seg.identity.version} is already "
                             "a source of lungs (the main segmenter or named twice)")
        seen.add(seg.identity.sha256)
        out.append(seg)
    return out


def _inputs(cases: list, seg: Any, seg_size: int, device: torch.device, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(TB inputs, labels) of the cases with a TB label (rows without one are skipped)."""
    arrays = common.load_cases(_labelled(cases), seg_size)
    return build_inputs(arrays, seg.net, device, size), arrays.labels


def tb_report(net: torch.nn.Module, sets: dict[str, tuple[np.ndarray, np.ndarray]], device: torch.device,
              threshold: float | None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Per validation set (and ``all`` when several): cases, TB cases, AUC, and at ``threshold``
    sensitivity and specificity. Also returns the pooled labels and scores."""
    report: dict[str, Any] = {}
    labels, scores = [], []
    for name, (x, y) in sets.items():
        s = 1 / (1 + np.exp(-predict_logits(net, x, device)))
        labels.append(y)
        scores.append(s)
    if len(sets) > 1:
        sets = {**sets, "all": (None, np.concatenate(labels))}
        scores.append(np.concatenate(scores))
        labels.append(sets["all"][1])
    for (name, _), y, s in zip(sets.items(), labels, scores):
        auc = _auc(y, s)
        sens = spec = None
        if threshold is not None and len(y):
            se, sp = metrics.sensitivity_specificity(y, s, threshold)
            sens = se if y.sum() > 0 else None
            spec = sp if (y == 0).sum() > 0 else None
        report[name] = {"n": len(y), "n_tb": int(y.sum()), "auc": None if np.isnan(auc) else auc,
                        "sensitivity": sens, "specificity": spec}
    return report, labels[-1], scores[-1]


def folds_of(cases: list, labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """:func:`assign_folds` of the labelled ``cases`` (``labels`` in their order), as training deals
    them; the refit and the experiments call this too, so they re-deal exactly the same folds."""
    return assign_folds(labels, [c.source for c in _labelled(cases)], k, seed)


def assign_folds(labels: np.ndarray, sources: list[str], k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each case, dealt round-robin within each source x label stratum
    after a seeded shuffle, so every fold holds each stratum in proportion."""
    if k < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, not {k}")
    labels = np.asarray(labels)
    if len(labels) != len(sources):
        raise ValueError("labels and sources differ in length")
    folds = np.full(len(labels), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for key in sorted(set(zip(sources, labels.tolist()))):
        idx = np.array([i for i, (s, y) in enumerate(zip(sources, labels.tolist())) if (s, y) == key])
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # the next stratum starts where this one stopped, so fold sizes stay even
    return folds


def check_folds(cfg: TBConfig) -> None:
    """Refuse cross-fitting settings that cannot give honest out-of-fold scores."""
    if cfg.folds == 0:
        return
    if cfg.folds < 2:
        raise ValueError(f"--folds {cfg.folds}: cross-fitting needs at least 2 folds (0 turns it off)")
    if cfg.members != cfg.folds:
        raise ValueError(f"--folds {cfg.folds} trains one member per fold; --members {cfg.members} does not match")
    if cfg.init is not None:
        raise ValueError("--folds cannot start from --init weights: they have seen every training case, "
                         "so no score would be out of fold")


def cross_fit_calibration(labels: np.ndarray, oof_logits: np.ndarray, target: float) -> dict[str, Any]:
    """From out-of-fold logits: the Platt calibration, the threshold on the calibrated scores, and
    the out-of-fold figures before and after calibration (sidecar ``training.cross_fit``)."""
    slope, intercept = metrics.fit_platt(labels, oof_logits)
    raw = 1 / (1 + np.exp(-oof_logits))
    cal = 1 / (1 + np.exp(-(slope * oof_logits + intercept)))
    threshold = metrics.threshold_for_sensitivity(labels, cal, target)
    sens, spec = metrics.sensitivity_specificity(labels, cal, threshold)
    before, after = metrics.calibration(labels, raw), metrics.calibration(labels, cal)
    return {"slope": slope, "intercept": intercept, "threshold": threshold,
            "oof": {"n": len(labels), "n_tb": int(labels.sum()), "auc": _auc(labels, oof_logits),
                    "sensitivity": sens, "specificity": spec,
                    "ece_uncalibrated": before["ece"], "brier_uncalibrated": before["brier"],
                    "ece": after["ece"], "brier": after["brier"]}}


def train(cfg: TBConfig) -> dict[str, Any]:
    """Train (or resume) the TB scorer; return the exported sidecar."""
    check_folds(cfg)
    shift_names = _check_shifts(cfg)
    init = finetune.init_from_config(cfg.init)
    states: list[dict[str, torch.Tensor]] | None = None
    if init is not None:
        finetune.check_compatible(init, arch=cfg.arch, size=cfg.size, members=cfg.members)
        if cfg.network != init.network:
            raise ValueError(f"network settings {cfg.network} do not match the initial weights {init.ref} ({init.network})")
        states = finetune.member_states(init)
    extra = mix.ExtraSpec(cfg.extra, cfg.extra_fraction, cfg.extra_min_quality) if cfg.extra else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    seg = registry.load(
        registry.SEGMENTER_FILES[cfg.segmenter_arch], str(device),
        Path(cfg.segmenter_dir) if cfg.segmenter_dir else registry.WEIGHTS_DIR,
    )
    seg_size = int(seg.meta["input_size"])
    base_rows = {split: mix.read_split(cfg.data, split, cfg.limit) for split in ("train", "val")}
    x_tr, y_tr = _inputs(base_rows["train"], seg, seg_size, device, cfg.size)
    also = load_also_lungs(cfg.also_lungs, seg, device)
    x_also = np.stack([_inputs(base_rows["train"], s, int(s.meta["input_size"]), device, cfg.size)[0]
                       for s in also], 1) if also else None  # (N, len(also), 2, S, S); base training cases only
    fold = folds_of(base_rows["train"], y_tr, cfg.folds, cfg.seed) if cfg.folds else None
    x_shift, shift_counts = None, None
    if shift_names:  # only the base training cases get shifted copies
        x_shift, drawn = shifted_inputs(base_rows["train"], seg, seg_size, device, cfg.size, shift_names,
                                        cfg.shift_copies, cfg.seed)
        shift_counts = {n: sum(d.count(n) for d in drawn) for n in shift_names}
    val_sets = {mix.BASE: _inputs(base_rows["val"], seg, seg_size, device, cfg.size)}
    summary: dict[str, Any] = {mix.BASE: {"folder": str(Path(cfg.data).resolve()),
                                          **{split: mix.set_summary(r, _labelled(r)) for split, r in base_rows.items()}}}
    n_base, n_extra = len(y_tr), 0
    if extra is not None:
        rows = {split: mix.read_split(extra.folder, split, cfg.limit) for split in ("train", "val")}
        kept = {split: mix.apply_quality_floor(r, extra.min_quality) for split, r in rows.items()}
        x_ex, y_ex = _inputs(kept["train"][0], seg, seg_size, device, cfg.size)
        val_sets[mix.EXTRA] = _inputs(kept["val"][0], seg, seg_size, device, cfg.size)
        n_extra = len(y_ex)
        summary[mix.EXTRA] = {
            "folder": str(Path(extra.folder).resolve()), "fraction": extra.fraction, "min_quality": extra.min_quality,
            "samples_per_epoch": mix.epoch_sizes(n_base, n_extra, extra.fraction),
            "note": "the pseudo-label floor applies to masks; TB labels come from a CSV or a verified report",
            **{split: mix.set_summary(rows[split], _labelled(kept[split][0]), kept[split][1]) for split in ("train", "val")},
        }
        if n_extra == 0:
            raise ValueError(f"no cases with a TB label in the training rows of the extra set {extra.folder}")
        if n_base == 0 and extra.fraction < 1:
            raise ValueError(f"no labelled training cases in {cfg.data} (only --extra-fraction 1 trains on the extra set alone)")
        x_tr, y_tr = np.concatenate([x_tr, x_ex]), np.concatenate([y_tr, y_ex])
    elif n_base == 0:
        raise ValueError(f"no labelled training cases in {cfg.data}")
    fraction = extra.fraction if extra is not None else 0.0
    x_va = np.concatenate([x for x, _ in val_sets.values()])
    y_va = np.concatenate([y for _, y in val_sets.values()])
    aug = common.AugmentConfig(**cfg.augment)
    ckpt, log = out / "checkpoint.pt", common.JsonlLog(out / "train_log.jsonl")
    done: list[dict[str, torch.Tensor]] = []
    member, start, resume_state, initial_report = 0, 0, None, None
    if cfg.resume and ckpt.is_file():
        resume_state = common.load_checkpoint(ckpt)
        done, member, start = resume_state["done"], resume_state["member"], resume_state["epoch"] + 1
        initial_report = resume_state.get("initial_report")
    elif init is not None:  # the starting point, for comparison: the initial ensemble on the val sets
        initial = registry.calibrate(finetune.build_initial(init), init.meta).to(device)  # as the node scores it
        initial_report, _, _ = tb_report(initial, val_sets, device, float(init.meta["threshold"]))
        log.write({"member": 0, "epoch": 0, "val": initial_report, "init": init.ref, "seconds": 0.0})
        tqdm.write(f"initial weights {init.ref}: val AUC {initial_report[mix.BASE]['auc']}", file=sys.stderr)
        del initial
    x_all, y_all = torch.from_numpy(x_tr), torch.from_numpy(y_tr).float()
    xs_all = torch.from_numpy(x_shift) if x_shift is not None else None
    xa_all = torch.from_numpy(x_also) if x_also is not None else None
    timer = common.Timer()
    while member < cfg.members:
        g = common.seed_everything(cfg.seed + member)
        if fold is None:
            xt, yt, n_member, xs, xa = x_all, y_all, n_base, xs_all, xa_all
        else:  # this member never sees its fold of the base training cases (extra cases: always)
            mine = np.flatnonzero(fold != member)
            keep = torch.from_numpy(np.concatenate([mine, np.arange(n_base, len(y_all))]))
            xt, yt, n_member = x_all[keep], y_all[keep], len(mine)
            xs = xs_all[torch.from_numpy(mine)] if xs_all is not None else None
            xa = xa_all[torch.from_numpy(mine)] if xa_all is not None else None
        epoch_len = sum(mix.epoch_sizes(n_member, n_extra, fraction).values())
        net = networks.build_tb_scorer(cfg.arch, **cfg.network).to(device)
        if states is not None:
            net.load_state_dict(states[member])
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=cfg.epochs * ((epoch_len + cfg.batch_size - 1) // cfg.batch_size), pct_start=0.15
        )
        if resume_state is not None and start > 0:
            net.load_state_dict(resume_state["model"])
            opt.load_state_dict(resume_state["optimizer"])
            sched.load_state_dict(resume_state["scheduler"])
            g.set_state(resume_state["generator"])
        resume_state = None
        for epoch in range(start, cfg.epochs):
            net.train()
            order = mix.epoch_order(n_member, n_extra, fraction, g)
            losses = []
            bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"tb member {member + 1}/{cfg.members} epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, file=sys.stderr)
            for i in bar:
                idx = order[i : i + cfg.batch_size]
                if len(idx) < 2:
                    continue  # batch norm needs more than one sample
                x = xt[idx]
                if xa is not None:  # base cases take the lungs of a segmenter drawn uniformly (0 = the main one)
                    pick = torch.randint(xa.shape[1] + 1, (len(idx),), generator=g)
                    rows = torch.nonzero((pick > 0) & (idx < n_member)).reshape(-1)
                    if len(rows):
                        x = x.clone()
                        x[rows] = xa[idx[rows], pick[rows] - 1]
                if xs is not None:  # base cases (index < n_member) may be swapped for a shifted version
                    swap = (torch.rand(len(idx), generator=g) < cfg.p_shift) & (idx < n_member)
                    if swap.any():
                        copy = torch.randint(cfg.shift_copies, (len(idx),), generator=g)
                        rows = torch.nonzero(swap).reshape(-1)
                        x = x.clone()
                        x[rows] = xs[idx[rows], copy[rows]]
                x = common.random_affine(x.to(device), aug, g)
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
            if extra is not None:
                rec["drawn"] = {mix.BASE: int((order < n_member).sum()), mix.EXTRA: int((order >= n_member).sum())}
            log.write(rec)
            tqdm.write(f"member {member + 1} epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} val_auc {auc:.4f}", file=sys.stderr)
            common.save_checkpoint(ckpt, model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                   generator=g.get_state(), epoch=epoch, member=member, done=done, config=asdict(cfg),
                                   initial_report=initial_report)
        done.append({k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        member, start = member + 1, 0
        common.save_checkpoint(ckpt, model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                               generator=g.get_state(), epoch=-1, member=member, done=done, config=asdict(cfg),
                               initial_report=initial_report)
    members = []
    for state in done:
        m = networks.build_tb_scorer(cfg.arch, **cfg.network)
        m.load_state_dict(state)
        members.append(m)
    final = members[0] if len(members) == 1 else networks.Ensemble(members)
    final.to(device)
    cross_fit, calibration, scored = None, None, final
    if fold is not None:
        oof = np.zeros(n_base, np.float32)
        for k, m in enumerate(members):
            m.to(device)
            oof[fold == k] = predict_logits(m, x_tr[:n_base][fold == k], device)
        cross_fit = cross_fit_calibration(y_tr[:n_base], oof, cfg.target_sensitivity)
        calibration = {"method": "platt", "slope": cross_fit.pop("slope"), "intercept": cross_fit.pop("intercept"),
                       "fitted_on": f"out-of-fold logits of the {n_base} labelled training cases "
                                    f"({cfg.folds}-fold cross-fitting), applied to the ensemble's mean logit"}
        scored = networks.Calibrated(final, calibration["slope"], calibration["intercept"])
    val_logits = predict_logits(scored, x_va, device)
    val_scores = 1 / (1 + np.exp(-val_logits))
    if cross_fit is not None:
        threshold = cross_fit.pop("threshold")
        sens, spec = (metrics.sensitivity_specificity(y_va, val_scores, threshold) if len(y_va)
                      else (float("nan"), float("nan")))
        rule = (f"highest threshold with out-of-fold sensitivity >= {cfg.target_sensitivity} on the calibrated "
                f"scores of the training split ({cfg.folds}-fold cross-fitting; the val split chose nothing)")
    elif len(y_va) and y_va.sum() > 0:
        threshold = metrics.threshold_for_sensitivity(y_va, val_scores, cfg.target_sensitivity)
        sens, spec = metrics.sensitivity_specificity(y_va, val_scores, threshold)
        rule = f"highest threshold with val sensitivity >= {cfg.target_sensitivity}"
    else:
        threshold, sens, spec = 0.5, float("nan"), float("nan")
        rule = f"highest threshold with val sensitivity >= {cfg.target_sensitivity}"
    if cross_fit is not None and len(y_va) and 0 < y_va.sum() < len(y_va):
        val_cal = metrics.calibration(y_va, val_scores)
        cross_fit["val_ece"], cross_fit["val_brier"] = val_cal["ece"], val_cal["brier"]
    report, _, _ = tb_report(scored, val_sets, device, threshold)
    meta = {
        "name": "cxrnode-tb-scorer", "version": cfg.version, "kind": "tb", "arch": cfg.arch, "network": cfg.network,
        "members": len(members), "input_size": cfg.size, "threshold": threshold,
        "input": "lung-cropped image + lung mask (models.transforms.tb_input)",
        "segmenter_used_for_training": seg.identity.name + " " + seg.identity.version,
        **({"also_lungs_of": [s.identity.name + " " + s.identity.version for s in also]} if also else {}),
        **({"calibration": calibration} if calibration is not None else {}),
        "training": {"command": cfg.command, "config": asdict(cfg), "n_train": len(y_tr), "n_val": len(y_va),
                     "val_auc": _auc(y_va, val_logits), "val_sensitivity": sens, "val_specificity": spec,
                     "threshold_rule": rule + (" (base and extra val cases together)"
                                               if extra is not None and cross_fit is None else ""),
                     "cross_fit": cross_fit, "shift_copies_drawn": shift_counts,
                     "seconds": round(timer(), 1), "device": str(device),
                     "init": init.as_dict() if init is not None else None, "data": summary, "val": report,
                     "val_initial": initial_report},
    }
    return registry.save(final.cpu(), meta, registry.TB_FILE, out)
