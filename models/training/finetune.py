"""Fine-tuning: start ``cxrnode train`` from existing weights, name the result, register it.

``--init`` takes

* ``shipped``: the weights in ``models/weights`` (the segmenter of ``--arch``, default unet; the TB scorer);
* ``champion``: the model registry's model in service for that slot;
* a registry reference (``lung-unet@1.0.0``, a unique prefix, or 8+ hex digits of its sha256);
* a folder holding ``<stem>.pt``, ``<stem>.json`` and ``SHA256SUMS`` (a training ``--out`` folder, a
  registry entry's folder, ``models/weights``), or the ``.json``/``.pt`` file itself.

The weights are verified (sha256 against the sidecar and ``SHA256SUMS``) and loaded into a fresh
network, never into the node's cached copy. Fine-tuning keeps the architecture, the network
settings and (TB) the input size and the number of ensemble members of the initial weights: a
different ``--arch``, ``--members`` or TB ``--size`` is refused. A segmenter may change its input
size (``--size``; the networks are fully convolutional, so the same weights apply at another
resolution and fine-tuning adapts them: a multi-scale start for a larger network size). Unless given, epochs and learning
rate take the fine-tune defaults (:data:`FINETUNE_EPOCHS`, :data:`FINETUNE_LR`): a tenth of the
from-scratch learning rate and a few epochs (each member of a TB ensemble starts from its own
initial member).

A fine-tuned model is named ``<base version>+ft.<UTC yyyymmddHHMM>`` (the initial weights'
version without an earlier ``+ft…`` part, e.g. ``1.0.0+ft.202406111530``; ``.2``, ``.3`` … are
appended if the registry already holds that version) unless ``--version`` says otherwise; its
sidecar carries that version, so every SEG and SR it makes names it. ``--register`` then copies
the weights into the model registry (:mod:`models.catalog`) with a model card
(:func:`model_card`), ``data.json`` (:func:`data_summary`) and ``metrics.json`` (:func:`metrics_of`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models import registry

#: Fine-tune default epochs: segmenter per arch, TB scorer per member (about 5 min for the unet,
#: 15 min for the resunet, 20 min for the shipped 5-member TB ensemble on a 2-core CPU with the
#: 624-case base data; longer with a large extra set).
FINETUNE_EPOCHS = {"unet": 10, "resunet": 4, "tb": 8}
#: Fine-tune default peak learning rates: a tenth of training from scratch (2e-3, 1e-3).
FINETUNE_LR = {"segmentation": 2e-4, "tb": 1e-4}
#: Registry slot of each sidecar kind.
SLOT_OF_KIND = {"segmentation": "segmenter", "tb": "tb"}
#: What the registry accepts as a version (it goes into every SEG and SR: a DICOM LO).
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
KEYWORDS = ("shipped", "champion")


class InitError(ValueError):
    """``--init`` names no usable weights, or weights that do not fit the requested run."""


@dataclass(frozen=True)
class InitWeights:
    """Verified initial weights: where they are and what they are."""

    spec: str  # as given to --init
    origin: str  # "shipped", "registry" or "folder"
    folder: Path
    stem: str
    meta: dict[str, Any]
    ref: str  # "<stem>@<version>"

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def arch(self) -> str:
        return str(self.meta["arch"])

    @property
    def size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def members(self) -> int:
        return int(self.meta.get("members", 1))

    @property
    def network(self) -> dict[str, Any]:
        return dict(self.meta.get("network", {}) or {})

    def as_dict(self) -> dict[str, Any]:
        """What the sidecar, data.json and the card record about the initial weights."""
        return {"spec": self.spec, "origin": self.origin, "ref": self.ref, "name": self.meta["name"],
                "version": str(self.meta["version"]), "sha256": self.meta["sha256"], "arch": self.arch,
                "input_size": self.size, "members": self.members, "folder": str(self.folder.resolve()),
                "stem": self.stem}

    def describe(self) -> str:
        """One line for the card: ``lung-unet@1.0.0 (shipped weights, sha256 08d29c8d41a9…)``."""
        what = {"shipped": "shipped weights", "registry": "model registry", "folder": f"folder {self.folder}"}
        return f"{self.ref} ({what[self.origin]}, {self.meta['name']} {self.meta['version']}, sha256 {self.meta['sha256'][:12]}…)"


def needs_registry(spec: str | None) -> bool:
    """Whether ``--init spec`` is looked up in the model registry."""
    return spec is not None and spec not in ("shipped",) and not _looks_like_path(spec)


def _looks_like_path(spec: str) -> bool:
    return spec != "champion" and ("/" in spec or spec.endswith((".json", ".pt")) or spec in (".", "..")
                                   or Path(spec).is_dir())


def _stems_in(folder: Path, kind: str) -> list[str]:
    stems = []
    for sidecar in sorted(folder.glob("*.json")):
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("kind") == kind and "sha256" in meta:
            stems.append(sidecar.stem)
    return stems


def _verified(spec: str, origin: str, folder: Path, stem: str) -> InitWeights:
    meta = registry.verify(stem, folder)
    return InitWeights(spec=spec, origin=origin, folder=folder, stem=stem, meta=meta, ref=f"{stem}@{meta['version']}")


def resolve_init(spec: str, kind: str, *, arch: str | None = None, registry_: Any = None) -> InitWeights:
    """The verified weights ``--init spec`` names for a ``kind`` (``segmentation``/``tb``) run.

    ``arch`` picks the shipped segmenter (default unet) or the file in a folder holding several;
    ``registry_`` is a :class:`models.catalog.ModelRegistry` (needed for ``champion`` and references).
    """
    if kind not in SLOT_OF_KIND:
        raise InitError(f"unknown model kind {kind!r}")
    spec = spec.strip()
    if spec == "shipped":
        stem = registry.SEGMENTER_FILES[arch or "unet"] if kind == "segmentation" else registry.TB_FILE
        init = _verified(spec, "shipped", registry.WEIGHTS_DIR, stem)
    elif _looks_like_path(spec):
        path = Path(spec)
        if path.is_file() and path.suffix in (".json", ".pt"):
            folder, stem = path.parent, path.stem
        elif path.is_dir():
            folder = path
            stems = _stems_in(folder, kind)
            if kind == "segmentation" and arch is not None and registry.SEGMENTER_FILES[arch] in stems:
                stems = [registry.SEGMENTER_FILES[arch]]
            if not stems:
                raise InitError(f"--init {spec}: no {kind} weights (a <stem>.json sidecar with its .pt) in {folder}")
            if len(stems) > 1:
                raise InitError(f"--init {spec}: several {kind} models in {folder} ({', '.join(stems)}): "
                                "give the .json file of the one to start from")
            stem = stems[0]
        else:
            raise InitError(f"--init {spec}: no such folder or file")
        init = _verified(spec, "folder", folder, stem)
    else:
        if registry_ is None:
            raise InitError(f"--init {spec}: needs the model registry (--registry DIR or --config FILE)")
        entry = registry_.champion(SLOT_OF_KIND[kind]) if spec == "champion" else registry_.entry(spec)
        entry.verify()
        init = InitWeights(spec=spec, origin="registry", folder=entry.folder, stem=entry.stem, meta=entry.meta,
                           ref=entry.ref)
    if init.kind != kind:
        raise InitError(f"--init {spec}: {init.ref} is a {init.kind} model, not a {kind} model")
    return init


def init_from_config(init: dict[str, Any] | None) -> InitWeights | None:
    """The :class:`InitWeights` a training config's ``init`` record (:meth:`InitWeights.as_dict`) names,
    verified again (the file may have changed since the command resolved it)."""
    if not init:
        return None
    loaded = _verified(init.get("spec", ""), init.get("origin", "folder"), Path(init["folder"]), init["stem"])
    if loaded.meta["sha256"] != init["sha256"]:
        raise InitError(f"initial weights {loaded.ref} changed since the run was set up "
                        f"(sha256 {loaded.meta['sha256'][:12]}…, expected {init['sha256'][:12]}…)")
    return loaded


def check_compatible(init: InitWeights, *, arch: str | None = None, size: int | None = None,
                     members: int | None = None) -> None:
    """Refuse a run that would change the architecture, input size or member count of its initial weights.

    Pass ``size=None`` where the input size may change (segmenters: fully convolutional)."""
    why = "fine-tuning keeps the architecture and input size of its initial weights"
    if arch is not None and arch != init.arch:
        raise InitError(f"--arch {arch} does not match the initial weights {init.ref} ({init.arch}): {why}; "
                        "leave out --arch or start from other weights")
    if size is not None and int(size) != init.size:
        raise InitError(f"--size {size} does not match the initial weights {init.ref} ({init.size} px): {why}; "
                        "leave out --size or start from other weights")
    if members is not None and int(members) != init.members:
        raise InitError(f"--members {members} does not match the initial weights {init.ref} "
                        f"({init.members} member{'s' if init.members != 1 else ''}): {why}; leave out --members")


def load_state(init: InitWeights) -> dict[str, Any]:
    """The initial weights' state dict in float32 (verified again; a fresh copy on the CPU)."""
    import torch

    registry.verify(init.stem, init.folder)
    state = torch.load(init.folder / init.meta.get("weights_file", f"{init.stem}.pt"), map_location="cpu",
                       weights_only=True)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def build_initial(init: InitWeights) -> Any:
    """A new network of the initial weights' architecture holding those weights (train mode, CPU)."""
    net = registry.build_from_meta(init.meta)
    try:
        net.load_state_dict(load_state(init))
    except RuntimeError as exc:
        raise InitError(f"{init.ref} does not fit the network its sidecar describes: {str(exc).splitlines()[0]}") from None
    return net


def member_states(init: InitWeights) -> list[dict[str, Any]]:
    """The state dict of each ensemble member (one for a single network)."""
    state = load_state(init)
    if init.members == 1:
        return [state]
    out = []
    for i in range(init.members):
        prefix = f"members.{i}."
        out.append({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    if any(not s for s in out):
        raise InitError(f"{init.ref}: its weights do not hold {init.members} members")
    return out


# ------------------------------------------------------------------------------ versions


def check_version(version: str) -> str:
    """``version`` if the registry (and a DICOM LO) accepts it; else :class:`InitError`."""
    if not VERSION_PATTERN.match(version):
        raise InitError(f"--version {version!r}: 1-64 letters, digits, '.', '_', '+', '-', starting with a "
                        "letter or digit (it is written into every SEG and SR)")
    return version


def finetune_version(base: str, now: datetime | None = None) -> str:
    """``<base>+ft.<UTC yyyymmddHHMM>``; an earlier ``+ft…`` part of ``base`` is replaced."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M")
    return check_version(f"{str(base).split('+ft.')[0]}+ft.{stamp}")


def unique_version(registry_: Any, stem: str, version: str) -> str:
    """``version``, or ``version.2``, ``.3`` … when the registry already holds ``<stem>@<version>``."""
    taken = {e.identity.version for e in registry_.entries() if e.stem == stem}
    candidate, k = version, 1
    while candidate in taken:
        k += 1
        candidate = f"{version}.{k}"
    return check_version(candidate)


def open_registry(root: Path | str, initial_arch: str = "unet") -> Any:
    """The :class:`models.catalog.ModelRegistry` at ``root`` (created and seeded from the shipped weights)."""
    from models.catalog import ModelRegistry

    return ModelRegistry(Path(root), initial_arch=initial_arch)


# ------------------------------------------------------------------------------ registration


def data_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """``data.json``: the base folder with its case counts per split and source, the extra folder with
    its counts by label source, the fraction, the quality floor, the seed and the initial weights."""
    t = meta.get("training", {}) or {}
    cfg = t.get("config", {}) or {}
    out = dict(t.get("data", {}) or {})
    out.update(seed=cfg.get("seed"), command=t.get("command"), init=t.get("init"), n_train=t.get("n_train"),
               n_val=t.get("n_val"))
    return out


def metrics_of(meta: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json``: validation metrics at network size, per source (base, extra, all).

    Segmenter: mean Dice (``val_dice_network_size`` is the figure the best epoch was chosen by);
    TB scorer: AUC, sensitivity and specificity at its operating threshold.
    """
    t = meta.get("training", {}) or {}
    out: dict[str, Any]
    if meta["kind"] == "segmentation":
        out = {"val_dice_network_size": t.get("best_val_dice_network_size"), "best_epoch": t.get("best_epoch"),
               "selection": t.get("selection")}
    else:
        out = {"val_auc": t.get("val_auc"), "val_sensitivity": t.get("val_sensitivity"),
               "val_specificity": t.get("val_specificity"), "threshold": meta.get("threshold"),
               "threshold_rule": t.get("threshold_rule")}
    out["per_source"] = t.get("val", {})
    if t.get("val_initial") is not None:
        out["initial_weights_per_source"] = t["val_initial"]
    out["note"] = "validation split at network size, from training; measure on a reference set with cxrnode evaluate"
    return out


def _card_sections(stem: str, titles: tuple[str, ...]) -> str:
    """Sections (heading and body) of the shipped card of ``stem`` (else of any shipped card)."""
    cards = Path(__file__).resolve().parent.parent / "cards"
    candidates = [cards / f"{stem}.md", *sorted(cards.glob("*.md"))]
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        parts = re.split(r"(?m)^(?=## )", text)
        found = [p.rstrip() + "\n" for p in parts if p.startswith("## ") and p[3:].split("\n")[0].strip() in titles]
        if len(found) == len(titles):
            return "\n".join(found)
    raise FileNotFoundError(f"no model card in {cards} with the sections {', '.join(titles)}")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _data_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["| set | folder | split | rows | used | used by source | by label source |", "|---|---|---|---|---|---|---|"]
    for name in ("base", "extra"):
        block = summary.get(name)
        if not block:
            continue
        for split in ("train", "val"):
            s = block.get(split) or {}
            by_source = ", ".join(f"{k} {v}" for k, v in (s.get("used_by_source") or {}).items()) or "-"
            by_label = ", ".join(f"{k} {v}" for k, v in (s.get("by_label_source") or {}).items()) or "-"
            lines.append(f"| {name} | `{block.get('folder')}` | {split} | {s.get('rows', 0)} | {s.get('used', 0)} | "
                         f"{by_source} | {by_label} |")
    extra = summary.get("extra")
    if extra:
        dropped = sum(int((extra.get(s) or {}).get("pseudo_masks_below_quality") or 0) for s in ("train", "val"))
        lines += ["", (f"Extra set: {_fmt(extra.get('fraction'), 2)} of each epoch's samples "
                       f"(`--extra-fraction`), pseudo-label floor {_fmt(extra.get('min_quality'), 2)} "
                       f"(`--extra-min-quality`: {dropped} pseudo-label mask(s) dropped; manual masks always kept); "
                       f"samples per epoch: {(extra.get('samples_per_epoch') or {}).get('base')} base + "
                       f"{(extra.get('samples_per_epoch') or {}).get('extra')} extra.")]
    return lines


def _metric_lines(meta: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    per = metrics.get("per_source") or {}
    initial = metrics.get("initial_weights_per_source") or {}
    if meta["kind"] == "segmentation":
        lines = ["| set | cases | Dice mean | by source | initial weights' Dice |", "|---|---|---|---|---|"]
        for name, m in per.items():
            by = ", ".join(f"{k} {_fmt(v)}" for k, v in (m.get("by_source") or {}).items()) or "-"
            lines.append(f"| {name} | {m.get('n')} | {_fmt(m.get('dice'))} | {by} | "
                         f"{_fmt((initial.get(name) or {}).get('dice'))} |")
        lines += ["", (f"Best epoch {metrics.get('best_epoch')} by {metrics.get('selection')}; Dice at network size "
                       f"({meta.get('input_size')} px, thresholded at 0.5).")]
    else:
        lines = [f"At the operating threshold {_fmt(meta.get('threshold'))} ({metrics.get('threshold_rule')}):", "",
                 "| set | cases | TB | AUC | sensitivity | specificity | initial weights' AUC |",
                 "|---|---|---|---|---|---|---|"]
        for name, m in per.items():
            lines.append(f"| {name} | {m.get('n')} | {m.get('n_tb')} | {_fmt(m.get('auc'), 3)} | "
                         f"{_fmt(m.get('sensitivity'), 3)} | {_fmt(m.get('specificity'), 3)} | "
                         f"{_fmt((initial.get(name) or {}).get('auc'), 3)} |")
    return lines


def model_card(meta: dict[str, Any], summary: dict[str, Any], metrics: dict[str, Any], stem: str) -> str:
    """The model card of a trained model, in the layout of ``models/cards/*.md``."""
    t = meta.get("training", {}) or {}
    cfg = t.get("config", {}) or {}
    init = t.get("init")
    seg = meta["kind"] == "segmentation"
    members = int(meta.get("members", 1))
    size = meta.get("input_size")
    arch = f"`{meta.get('arch')}` {json.dumps(meta.get('network', {}))}" + (f", ensemble of {members}" if members > 1 else "")
    if init:
        what = {"shipped": "shipped weights", "registry": "model registry", "folder": f"folder `{init.get('folder')}`"}
        started = (f"`{init['ref']}` ({what.get(init.get('origin'), init.get('origin'))}: {init['name']} "
                   f"{init['version']}, sha256 `{init['sha256']}`)")
    else:
        started = "random initialisation (trained from scratch)"
    lines = [
        f"# Model card: {meta['name']} {meta['version']}",
        "",
        "| | |",
        "|---|---|",
        f"| registry ref | `{stem}@{meta['version']}` |",
        f"| file | `{meta.get('weights_file')}` ({meta.get('storage_dtype', 'float32')} storage, sha256 `{meta['sha256']}`) |",
        "| task | " + ("lung segmentation of a chest radiograph (one merged lung mask)" if seg else
                       "image-level TB score 0..1 for a chest radiograph (screening triage research)") + " |",
        "| input | " + (f"`models.transforms.preprocess(image, {size})`" if seg else
                        f"`models.transforms.tb_input` at {size} px: the lung-cropped image and the lung mask "
                        f"(lungs from {meta.get('segmenter_used_for_training')})") + " |",
        "| output | " + ("one logit map; sigmoid >= 0.5" if seg else
                         f"{'mean logit of ' + str(members) + ' members' if members > 1 else 'logit'} -> sigmoid; "
                         f"operating threshold **{_fmt(meta.get('threshold'))}**") + " |",
        f"| architecture | {arch} |",
        f"| initialised from | {started} |",
        "",
        "## How it was trained",
        "",
        "```",
        str(t.get("command") or ""),
        "```",
        "",
        (f"Fine-tuned from {started}, keeping its architecture"
         + (f" (its input size was {init.get('input_size')} px). " if init.get("input_size") not in (None, meta.get("input_size"))
            else " and input size. ") if init else "")
        + f"{cfg.get('epochs')} epoch(s){' per member' if not seg else ''}, batch {cfg.get('batch_size')}, AdamW "
        f"lr {cfg.get('lr')} ({'cosine' if seg else 'one-cycle'}), weight decay {cfg.get('weight_decay')}, "
        f"seed {cfg.get('seed')}, the augmentation of the shipped recipe (no flips). "
        f"Device {t.get('device')}, {t.get('seconds')} s wall time; {t.get('n_train')} training and "
        f"{t.get('n_val')} validation cases.",
        "",
        "## Training data",
        "",
        *_data_lines(summary),
        "",
        "Full counts: `data.json` next to this card.",
        "",
        "## Validation metrics",
        "",
        *_metric_lines(meta, metrics),
        "",
        ("These are training-time figures on the validation split(s) at network size, and the split was used to "
         "choose the " + ("epoch" if seg else "threshold") + ": measure on a reference set "
         "(`cxrnode evaluate`, `cxrnode models compare`) before putting it in service."),
        "",
        "## Intended use",
        "",
        ("**Research use only, not for diagnosis.** Adult PA chest radiographs, display orientation. "
         "Not validated beyond the sources named above; a model fine-tuned on a site's archive is checked on "
         "that site's reference set before it serves."),
        "",
    ]
    lines.append(_card_sections(stem, ("Licence caveat", "Data citations")).rstrip())
    if summary.get("extra"):
        lines.append("* Extra set: de-identified studies from this site's archive (`cxrnode dataset export`); "
                     "they stay at the site and are not redistributed with the model.")
    return "\n".join(lines) + "\n"


def register_trained(registry_: Any, out_dir: Path | str, stem: str, meta: dict[str, Any]) -> Any:
    """Register the weights ``train`` exported to ``out_dir`` with their card, data summary and metrics."""
    summary = data_summary(meta)
    metrics = metrics_of(meta)
    card = model_card(meta, summary, metrics, stem)
    return registry_.register(Path(out_dir), stem, card=card, data_summary=summary, metrics=metrics)
