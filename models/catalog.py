"""The model registry: every trained version, its checksum, card, data and metrics, and which serves.

A folder outside the package (``[models] registry``, by default ``<data_dir>/models``)::

    <root>/state.json                  champions, shadows, the rollback stack of each slot, the history
    <root>/.lock                       fcntl.flock'd by every writer (state and entries)
    <root>/entries/<stem>@<version>/   one registered model, never changed once renamed into place:
        <stem>.pt, <stem>.json         the weights and sidecar exactly as models.registry.save wrote them
        SHA256SUMS                     "<sha256>  <stem>.pt": models.registry.load verifies it
        card.md, data.json, metrics.json, entry.json (ref, slot, stem, registered_at)

Two slots are served: ``segmenter`` (kind ``segmentation``) and ``tb``. The first
:class:`ModelRegistry` opened on an empty folder registers the shipped weights of
``models/weights`` and makes the ``initial_arch`` segmenter and the TB scorer the champions;
shipped models a later release adds are registered when the registry is next opened, but
nothing is put in service except by :meth:`ModelRegistry.promote` (or rollback).

Writes take the lock, re-read the state, and replace ``state.json`` atomically (temp file,
fsync, rename, fsync of the folder), so two processes never lose each other's update; readers
need no lock. :meth:`ModelRegistry.state_token` is one ``stat`` of ``state.json``, cheap enough
for the node to call before every job and reload the champions when it changes.

The gate (comparing a challenger with the champion) is :mod:`models.gate`; the registry only
records the report it is given.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models import registry
from models.identity import ModelIdentity
from node.archive import fsync_dir

log = logging.getLogger(__name__)

#: Served slots and the sidecar ``kind`` each takes.
SLOTS = {"segmenter": "segmentation", "tb": "tb"}
_SLOT_OF_KIND = {kind: slot for slot, kind in SLOTS.items()}
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
ENTRIES = "entries"
ENTRY_FILE = "entry.json"
CARD_FILE, DATA_FILE, METRICS_FILE = "card.md", "data.json", "metrics.json"
STATE_FORMAT = 1

_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: A version is written into every SEG and SR (Algorithm Version, a DICOM LO): 64 characters.
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
#: What :meth:`ModelRegistry.register` accepts as a version (public, for the training commands).
VERSION_PATTERN = _VERSION


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message is one readable line."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Entry:
    """One registered model version (its folder is never modified after registration)."""

    ref: str  # "<stem>@<version>", e.g. "lung-unet@1.0.0"
    slot: str  # "segmenter" or "tb"
    folder: Path
    stem: str
    meta: dict  # the sidecar
    identity: ModelIdentity
    registered_at: str  # ISO UTC

    @property
    def arch(self) -> str:
        return str(self.meta.get("arch", ""))

    @property
    def weights_path(self) -> Path:
        return self.folder / self.meta.get("weights_file", f"{self.stem}.pt")

    def card(self) -> str:
        """The model card (markdown)."""
        path = self.folder / CARD_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else ""

    def data_summary(self) -> dict[str, Any]:
        """What it was trained on (``data.json``)."""
        return _read_json(self.folder / DATA_FILE, {})

    def metrics(self) -> dict[str, Any]:
        """Its metrics as registered (``metrics.json``)."""
        return _read_json(self.folder / METRICS_FILE, {})

    def verify(self) -> None:
        """Check the weights against the sidecar and ``SHA256SUMS``; :class:`RegistryError` if not."""
        try:
            registry.verify(self.stem, self.folder)
        except registry.WeightsError as exc:
            raise RegistryError(f"{self.ref}: {exc}") from None


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from None


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=str) + "\n").encode("utf-8")


def _clean_json(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def generated_card(meta: dict[str, Any], data_summary: dict[str, Any], metrics: dict[str, Any]) -> str:
    """A model card made from the sidecar, the data summary and the metrics."""
    training = meta.get("training", {}) or {}
    lines = [
        f"# Model card: {meta['name']} {meta['version']}",
        "",
        "| | |",
        "|---|---|",
        f"| weights | `{meta.get('weights_file')}` ({meta.get('storage_dtype', 'float32')} storage, sha256 `{meta['sha256']}`) |",
        f"| task | {'lung segmentation' if meta['kind'] == 'segmentation' else 'TB score from the lung-cropped image and its lung mask'} |",
        f"| architecture | {meta.get('arch')} {json.dumps(meta.get('network', {}))}"
        + (f", {meta['members']} members" if int(meta.get("members", 1)) > 1 else "") + " |",
        f"| input size | {meta.get('input_size')} px |",
        f"| threshold | {meta.get('threshold')} |",
    ]
    if meta.get("segmenter_used_for_training"):
        lines.append(f"| lungs from | {meta['segmenter_used_for_training']} |")
    if meta.get("calibrated_on_lungs_of"):
        lines.append(f"| calibrated on lungs of | {meta['calibrated_on_lungs_of']} |")
    lines += ["", "## How it was trained", ""]
    if training.get("command"):
        lines += ["```", str(training["command"]), "```", ""]
    for key in ("device", "seconds", "n_train", "n_val"):
        if key in training:
            lines.append(f"- {key}: {training[key]}")
    lines += ["", "## Training data", "", "```json", json.dumps(_clean_json(data_summary), indent=2, sort_keys=True),
              "```", "", "## Metrics", "", "```json", json.dumps(_clean_json(metrics), indent=2, sort_keys=True), "```",
              "", "Research use only, not for diagnosis.", ""]
    return "\n".join(lines)


def _shipped_summaries(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data summary, metrics) of a shipped model, from its sidecar's training record."""
    t = meta.get("training", {}) or {}
    cfg = t.get("config", {}) or {}
    data = {"source": "shipped with cxrnode (models/weights)", "data": cfg.get("data"),
            "n_train": t.get("n_train"), "n_val": t.get("n_val"), "command": t.get("command")}
    if meta["kind"] == "segmentation":
        metrics = {"val_dice_network_size": t.get("best_val_dice_network_size")}
    else:
        metrics = {"val_auc": t.get("val_auc"), "val_sensitivity": t.get("val_sensitivity"),
                   "val_specificity": t.get("val_specificity"), "threshold": meta.get("threshold")}
    metrics["source"] = "sidecar training record; the full validation table is in the card"
    return data, metrics


class ModelRegistry:
    """The registry folder ``root``; see the module docstring."""

    def __init__(self, root: Path | str, *, initial_arch: str = "unet",
                 shipped_dir: Path | str = registry.WEIGHTS_DIR) -> None:
        if initial_arch not in registry.SEGMENTER_FILES:
            raise RegistryError(f"unknown segmentation arch {initial_arch!r}; "
                                f"choose from {', '.join(registry.SEGMENTER_FILES)}")
        self.root = Path(root)
        self.shipped_dir = Path(shipped_dir)
        self.initial_arch = initial_arch
        try:
            (self.root / ENTRIES).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the model registry {self.root}: {exc.strerror or exc}") from None
        self._seed()

    # ------------------------------------------------------------------ locking and state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / LOCK_FILE).open("a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def _read_state(self) -> dict[str, Any] | None:
        state = _read_json(self.state_path, None)
        if state is not None and state.get("format") != STATE_FORMAT:
            raise RegistryError(f"{self.state_path}: unknown format {state.get('format')!r}")
        return state

    def _state(self) -> dict[str, Any]:
        state = self._read_state()
        if state is None:
            raise RegistryError(f"{self.state_path} is missing: the registry was not seeded")
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.root / f".{STATE_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            _write_file(tmp, _json_bytes(_clean_json(state)))
            os.replace(tmp, self.state_path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)

    def state_token(self) -> str:
        """Changes whenever the state (champions, history) is rewritten: one ``stat``."""
        try:
            st = self.state_path.stat()
        except FileNotFoundError:
            return "none"
        return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    # ------------------------------------------------------------------ seeding

    def _shipped(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for stem in [*registry.SEGMENTER_FILES.values(), registry.TB_FILE]:
            try:
                out.append((stem, registry.read_meta(stem, self.shipped_dir)))
            except registry.WeightsError:
                continue  # not shipped in this build
        return out

    def _seed(self) -> None:
        shipped = self._shipped()
        missing = [(s, m) for s, m in shipped if not (self._entry_dir(f"{s}@{m['version']}") / ENTRY_FILE).is_file()]
        if not missing and self.state_path.is_file():
            return
        with self._locked():
            self._remove_stale_temps()
            for stem, meta in shipped:
                ref = f"{stem}@{meta['version']}"
                if (self._entry_dir(ref) / ENTRY_FILE).is_file():
                    continue
                data, metrics = _shipped_summaries(meta)
                card_path = Path(__file__).resolve().parent / "cards" / f"{stem}.md"
                card = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
                try:
                    self._register_locked(self.shipped_dir, stem, card=card, data_summary=data, metrics=metrics)
                except RegistryError as exc:
                    log.warning("shipped model %s not registered: %s", ref, exc)
            if self.state_path.is_file():
                return
            champions = {}
            for slot, stem in (("segmenter", registry.SEGMENTER_FILES[self.initial_arch]), ("tb", registry.TB_FILE)):
                candidates = [m for s, m in shipped if s == stem]
                if not candidates:
                    raise RegistryError(f"no shipped weights for {stem} in {self.shipped_dir} to seed the registry")
                champions[slot] = f"{stem}@{candidates[0]['version']}"
            when = _now()
            history = [{"action": "seed", "when": when, "by": "cxrnode", "slot": slot,
                        "why": "shipped weights, first start" + (f" ([worker] architecture = {self.initial_arch})"
                                                                 if slot == "segmenter" else ""),
                        "from": None, "to": ref, "forced": False, "gate": None}
                       for slot, ref in champions.items()]
            self._write_state({"format": STATE_FORMAT, "champions": champions,
                               "previous": {slot: [] for slot in SLOTS}, "history": history})
            log.info("model registry %s seeded: %s", self.root, ", ".join(champions.values()))

    def _remove_stale_temps(self) -> None:
        """Temp folders left by a crashed register (only called under the lock: none is in progress)."""
        for tmp in (self.root / ENTRIES).glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ entries

    def _entry_dir(self, ref: str) -> Path:
        return self.root / ENTRIES / ref

    def _load_entry(self, folder: Path) -> Entry:
        info = _read_json(folder / ENTRY_FILE, None)
        if info is None:
            raise RegistryError(f"{folder} is not a registry entry (no {ENTRY_FILE})")
        try:
            meta = registry.read_meta(info["stem"], folder)
        except registry.WeightsError as exc:
            raise RegistryError(str(exc)) from None
        return Entry(ref=info["ref"], slot=info["slot"], folder=folder, stem=info["stem"], meta=meta,
                     identity=registry.identity_of(meta), registered_at=info["registered_at"])

    def entries(self, slot: str | None = None) -> list[Entry]:
        """Registered models (of ``slot``), oldest registration first."""
        if slot is not None and slot not in SLOTS:
            raise RegistryError(f"unknown slot {slot!r}; choose from {', '.join(SLOTS)}")
        out = []
        for folder in sorted((self.root / ENTRIES).iterdir()):
            if folder.name.startswith(".") or not (folder / ENTRY_FILE).is_file():
                continue
            entry = self._load_entry(folder)
            if slot is None or entry.slot == slot:
                out.append(entry)
        return sorted(out, key=lambda e: (e.registered_at, e.ref))

    def entry(self, ref: str) -> Entry:
        """The entry ``ref`` names: exactly, as ``<name>@<version>``, by a unique prefix of its
        ref, or by 8+ hex digits of its sha256 (unique)."""
        ref = ref.strip()
        if ref and "/" not in ref and not ref.startswith(".") and (self._entry_dir(ref) / ENTRY_FILE).is_file():
            return self._load_entry(self._entry_dir(ref))
        every = self.entries()
        for test in (
            lambda e: f"{e.identity.name}@{e.identity.version}" == ref,
            lambda e: bool(ref) and e.ref.startswith(ref),
            lambda e: len(ref) >= 8 and e.identity.sha256.startswith(ref.lower()),
        ):
            found = [e for e in every if test(e)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise RegistryError(f"{ref!r} is ambiguous: {', '.join(e.ref for e in found)}")
        known = ", ".join(e.ref for e in every) or "none"
        raise RegistryError(f"no registered model {ref!r} (registered: {known})")

    def register(self, weights_dir: Path | str, stem: str, *, card: str | None = None,
                 data_summary: dict | None = None, metrics: dict | None = None) -> Entry:
        """Register ``weights_dir/<stem>.pt`` + ``<stem>.json`` (as :func:`models.registry.save`
        wrote them) as ``<stem>@<version>``.

        The weights must match the sidecar's sha256 and ``weights_dir/SHA256SUMS`` and fit the
        network the sidecar describes. The same ref with the same bytes returns the existing
        entry; with other bytes (or another model with the same name and version) it is refused.
        Atomic: everything is written to a temp folder, verified there, then renamed into place.
        """
        with self._locked():
            self._remove_stale_temps()
            return self._register_locked(Path(weights_dir), stem, card=card, data_summary=data_summary,
                                         metrics=metrics)

    def _register_locked(self, weights_dir: Path, stem: str, *, card: str | None, data_summary: dict | None,
                         metrics: dict | None) -> Entry:
        if not _STEM.match(stem or ""):
            raise RegistryError(f"bad model file stem {stem!r}: letters, digits, '.', '_' and '-' only")
        try:
            meta = registry.verify(stem, weights_dir)
        except registry.WeightsError as exc:
            raise RegistryError(f"refused: {exc}") from None
        _check_meta(meta, stem)
        slot = _SLOT_OF_KIND[meta["kind"]]
        ref = f"{stem}@{meta['version']}"
        final = self._entry_dir(ref)
        if (final / ENTRY_FILE).is_file():
            existing = self._load_entry(final)
            if existing.identity.sha256 == meta["sha256"]:
                return existing
            raise RegistryError(f"{ref} is already registered with other weights (sha256 "
                                f"{existing.identity.sha256[:12]}…, these are {meta['sha256'][:12]}…): "
                                "give the new model another version")
        for other in self.entries():
            if (other.identity.name, other.identity.version) == (meta["name"], str(meta["version"])) \
                    and other.identity.sha256 != meta["sha256"]:
                raise RegistryError(f"{other.ref} already is {meta['name']} {meta['version']} with other weights: "
                                    "give the new model another version")
        _check_loadable(weights_dir, stem, meta)
        data_summary = _clean_json(dict(data_summary or {}))
        metrics = _clean_json(dict(metrics or {}))
        tmp = self.root / ENTRIES / f".tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            weights_file = meta.get("weights_file", f"{stem}.pt")
            with (weights_dir / weights_file).open("rb") as src, (tmp / weights_file).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            _write_file(tmp / f"{stem}.json", (weights_dir / f"{stem}.json").read_bytes())
            _write_file(tmp / registry.SUMS_FILE, f"{meta['sha256']}  {weights_file}\n".encode())
            try:  # the copy, not just the source: a file changed or damaged on the way is refused
                copied = registry.verify(stem, tmp)
            except registry.WeightsError as exc:
                raise RegistryError(f"refused: the copy does not verify: {exc}") from None
            if copied != meta:
                raise RegistryError(f"refused: {weights_dir / f'{stem}.json'} changed while it was registered")
            _write_file(tmp / DATA_FILE, _json_bytes(data_summary))
            _write_file(tmp / METRICS_FILE, _json_bytes(metrics))
            text = card if card is not None else generated_card(meta, data_summary, metrics)
            _write_file(tmp / CARD_FILE, text.encode("utf-8"))
            _write_file(tmp / ENTRY_FILE, _json_bytes({"ref": ref, "slot": slot, "stem": stem,
                                                       "registered_at": _now(),
                                                       "registered_from": str(Path(weights_dir).resolve())}))
            fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root / ENTRIES)
        log.info("registered %s (%s, sha256 %s)", ref, slot, meta["sha256"][:12])
        return self._load_entry(final)

    def next_version(self, stem: str) -> str:
        """A version no entry of ``stem`` has: the highest ``X.Y.Z`` registered with Y + 1, Z = 0
        (``1.1.0`` after ``1.0.0``); ``1.0.0`` when there is none."""
        best: tuple[int, int, int] | None = None
        for e in self.entries():
            m = re.match(r"^(\d+)\.(\d+)\.(\d+)", e.identity.version)
            if e.stem == stem and m:
                v = (int(m[1]), int(m[2]), int(m[3]))
                best = v if best is None or v > best else best
        return "1.0.0" if best is None else f"{best[0]}.{best[1] + 1}.0"

    # ------------------------------------------------------------------ champions

    def champion(self, slot: str) -> Entry:
        """The entry in service for ``slot``."""
        if slot not in SLOTS:
            raise RegistryError(f"unknown slot {slot!r}; choose from {', '.join(SLOTS)}")
        ref = self._state()["champions"].get(slot)
        if not ref:
            raise RegistryError(f"no {slot} champion in {self.state_path}")
        return self.entry_exact(ref)

    def champions(self) -> dict[str, Entry]:
        """Every slot's champion."""
        return {slot: self.champion(slot) for slot in SLOTS}

    def champion_refs(self) -> dict[str, str]:
        """{slot: ref} of the champions, from one read of the state."""
        return dict(self._state()["champions"])

    def entry_exact(self, ref: str) -> Entry:
        """The entry whose ref is exactly ``ref``."""
        folder = self._entry_dir(ref)
        if not (folder / ENTRY_FILE).is_file():
            raise RegistryError(f"registered model {ref} is missing from {self.root / ENTRIES}")
        return self._load_entry(folder)

    def promote(self, ref: str, *, by: str, why: str, force: bool = False, gate: dict | None = None) -> dict:
        """Put ``ref`` in service for its slot; returns the history record.

        ``gate`` is :func:`models.gate.compare`'s report (or None when forced without data): a
        report that did not pass refuses the promotion unless ``force``; a report made against
        another model than the current champion (it changed meanwhile) is refused always.
        """
        if not why or not why.strip():
            raise RegistryError("say why (--why): every promotion is recorded with its reason")
        target = self.entry(ref)
        target.verify()
        with self._locked():
            state = self._state()
            slot = target.slot
            current = state["champions"].get(slot)
            if current == target.ref:
                raise RegistryError(f"{target.ref} is already the {slot} in service")
            if gate is not None:
                against = (gate.get("against") or {}).get("ref")
                if against is not None and against != current:
                    raise RegistryError(f"the gate compared with {against}, but the {slot} in service is "
                                        f"{current}: compare again")
                if gate.get("challenger", {}).get("ref") not in (None, target.ref):
                    raise RegistryError(f"the gate report is about {gate['challenger']['ref']}, not {target.ref}")
                if not gate.get("passed", False) and not force:
                    failed = ", ".join(gate.get("failed", [])) or "the gate"
                    raise RegistryError(f"refused: {target.ref} fails {failed} against {current}; --force to override")
            record = {"action": "promote", "when": _now(), "by": by, "why": why.strip(), "slot": slot,
                      "from": current, "to": target.ref, "forced": bool(force), "gate": gate}
            if current:
                state["previous"].setdefault(slot, []).append(current)
            state["champions"][slot] = target.ref
            if (state.get("shadows") or {}).get(slot) == target.ref:  # the shadow now serves: no longer one
                del state["shadows"][slot]
            state["history"].append(record)
            self._write_state(state)
        log.info("promoted %s to %s (was %s) by %s: %s", target.ref, slot, current, by, why)
        return _clean_json(record)

    def rollback(self, slot: str, *, by: str, why: str) -> dict:
        """Put the previous champion of ``slot`` back in service; returns the history record."""
        if slot not in SLOTS:
            raise RegistryError(f"unknown slot {slot!r}; choose from {', '.join(SLOTS)}")
        if not why or not why.strip():
            raise RegistryError("say why (--why): every rollback is recorded with its reason")
        with self._locked():
            state = self._state()
            stack = state["previous"].setdefault(slot, [])
            if not stack:
                raise RegistryError(f"no previous {slot} champion to roll back to "
                                    f"({state['champions'].get(slot)} has been in service since the start)")
            previous = stack[-1]
            self.entry_exact(previous).verify()
            stack.pop()
            current = state["champions"].get(slot)
            record = {"action": "rollback", "when": _now(), "by": by, "why": why.strip(), "slot": slot,
                      "from": current, "to": previous, "forced": False, "gate": None}
            state["champions"][slot] = previous
            state["history"].append(record)
            self._write_state(state)
        log.info("rolled %s back to %s (was %s) by %s: %s", slot, previous, current, by, why)
        return record

    def history(self) -> list[dict]:
        """Every seed, promotion, rollback and shadow change, oldest first."""
        return list(self._state()["history"])

    # ------------------------------------------------------------------ shadows

    def shadow_refs(self) -> dict[str, str]:
        """{slot: ref} of the shadows (challengers run beside the champion, never sent), one read."""
        return dict(self._state().get("shadows") or {})

    def shadow(self, slot: str) -> Entry | None:
        """The entry running in shadow for ``slot``, or None."""
        if slot not in SLOTS:
            raise RegistryError(f"unknown slot {slot!r}; choose from {', '.join(SLOTS)}")
        ref = self.shadow_refs().get(slot)
        return self.entry_exact(ref) if ref else None

    def set_shadow(self, ref: str | None, *, by: str, why: str = "", slot: str | None = None) -> list[dict]:
        """Run ``ref`` in shadow for its slot (replacing that slot's shadow), or with ``ref`` None
        stop the shadow of ``slot`` (of every slot when ``slot`` is None). Returns the history
        records (none when nothing changed). The state is rewritten, so a running node notices at
        its next job (:meth:`state_token`)."""
        target = None
        if ref is not None:
            target = self.entry(ref)
            target.verify()
            if slot is not None and slot != target.slot:
                raise RegistryError(f"{target.ref} is a {target.slot} model, not a {slot}")
        elif slot is not None and slot not in SLOTS:
            raise RegistryError(f"unknown slot {slot!r}; choose from {', '.join(SLOTS)}")
        records = []
        with self._locked():
            state = self._state()
            shadows = state.setdefault("shadows", {})
            if target is not None:
                if state["champions"].get(target.slot) == target.ref:
                    raise RegistryError(f"{target.ref} is the {target.slot} in service: it cannot be its own shadow")
                changes = {target.slot: target.ref}
            else:
                changes = {s: None for s in ([slot] if slot else SLOTS) if shadows.get(s)}
            for s, new in changes.items():
                current = shadows.get(s)
                if current == new:
                    continue
                records.append({"action": "shadow" if new else "shadow-off", "when": _now(), "by": by,
                                "why": (why or "").strip(), "slot": s, "from": current, "to": new,
                                "forced": False, "gate": None})
                if new:
                    shadows[s] = new
                else:
                    shadows.pop(s, None)
            if records:
                state["history"].extend(records)
                self._write_state(state)
        for r in records:
            log.info("shadow for %s: %s (was %s) by %s", r["slot"], r["to"], r["from"], by)
        return records


def _check_meta(meta: dict[str, Any], stem: str) -> None:
    kind = meta.get("kind")
    if kind not in _SLOT_OF_KIND:
        raise RegistryError(f"refused: {stem}.json has kind {kind!r}; a registry entry is a "
                            f"{' or '.join(_SLOT_OF_KIND)} model")
    version = str(meta.get("version", ""))
    if not _VERSION.match(version):
        raise RegistryError(f"refused: version {version!r} of {stem}: 1-64 letters, digits, '.', '_', '+', '-' "
                            "(it is written into every SEG and SR)")
    name = str(meta.get("name", ""))
    if not name or len(name) > 64:
        raise RegistryError(f"refused: {stem}.json needs a name of 1-64 characters")
    if "input_size" not in meta or (kind == "tb" and "threshold" not in meta):
        raise RegistryError(f"refused: {stem}.json lacks input_size" + (" or threshold" if kind == "tb" else ""))


def _check_loadable(weights_dir: Path, stem: str, meta: dict[str, Any]) -> None:
    """The state dict fits the network the sidecar describes (on the CPU, not cached)."""
    import torch

    path = weights_dir / meta.get("weights_file", f"{stem}.pt")
    try:
        registry.calibration_of(meta)
        net = registry.build_from_meta(meta)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    except (registry.WeightsError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RegistryError(f"refused: {path} does not load into the network its sidecar describes: {first}") from None
