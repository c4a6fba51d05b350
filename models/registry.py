"""Shipped weights: save, checksum, verify and load (once) from ``models/weights/``.

Each model is two files plus a line in ``SHA256SUMS``::

    models/weights/lung-unet.pt     state dict (float16 storage, cast back to float32 on load)
    models/weights/lung-unet.json   sidecar: name, version, kind, arch, network kwargs,
                                    input_size, threshold, sha256, training, metrics
    models/weights/SHA256SUMS       "<sha256>  lung-unet.pt" (sha256sum format)

On load the file's sha256 must equal both the sidecar's and ``SHA256SUMS``' entry, or
:class:`WeightsError` is raised with a message naming the file. Loaded networks are
cached per (folder, file, device), so the node reads and verifies each file once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.identity import ModelIdentity

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SUMS_FILE = "SHA256SUMS"

#: File stem of the shipped segmenter for each architecture, and of the TB scorer.
SEGMENTER_FILES = {"unet": "lung-unet", "resunet": "lung-resunet"}
TB_FILE = "tb-scorer"


class WeightsError(RuntimeError):
    """Weights are missing, do not match their checksum, or their sidecar is unusable."""


@dataclass(frozen=True)
class LoadedModel:
    """A network in eval mode on its device, with its sidecar metadata and identity."""

    net: Any  # torch.nn.Module; typed loosely so this module imports without torch
    meta: dict[str, Any]
    identity: ModelIdentity
    device: str


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(weights_dir: Path) -> dict[str, str]:
    """``SHA256SUMS`` as {file name: sha256}; empty if the file does not exist."""
    path = weights_dir / SUMS_FILE
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*").strip()] = digest.lower()
    return sums


def write_sums(weights_dir: Path, sums: dict[str, str]) -> None:
    """Write ``SHA256SUMS`` sorted by file name."""
    text = "".join(f"{sums[k]}  {k}\n" for k in sorted(sums))
    (weights_dir / SUMS_FILE).write_text(text, encoding="utf-8")


def read_meta(stem: str, weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """The sidecar JSON of ``stem`` (without verifying the weights)."""
    path = Path(weights_dir) / f"{stem}.json"
    if not path.is_file():
        raise WeightsError(f"model sidecar not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"model sidecar {path} is not valid JSON: {exc}") from exc


def verify(stem: str, weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """Check ``stem``'s weight file against its sidecar and ``SHA256SUMS``; return the sidecar."""
    weights_dir = Path(weights_dir)
    meta = read_meta(stem, weights_dir)
    file_name = meta.get("weights_file", f"{stem}.pt")
    path = weights_dir / file_name
    if not path.is_file():
        raise WeightsError(f"model weights not found: {path}")
    actual = sha256_file(path)
    listed = read_sums(weights_dir).get(file_name)
    if listed is None:
        raise WeightsError(f"{file_name} is not listed in {weights_dir / SUMS_FILE}")
    if actual != listed or actual != meta.get("sha256"):
        raise WeightsError(
            f"checksum mismatch for {path}: file has sha256 {actual}, "
            f"{SUMS_FILE} says {listed}, sidecar says {meta.get('sha256')}; "
            "the weights are corrupt or were replaced"
        )
    return meta


def identity_of(meta: dict[str, Any]) -> ModelIdentity:
    """The :class:`ModelIdentity` a sidecar describes."""
    return ModelIdentity(name=meta["name"], version=str(meta["version"]), sha256=meta["sha256"])


def build_from_meta(meta: dict[str, Any]) -> Any:
    """An untrained network of the architecture the sidecar names."""
    from models import networks

    kwargs = dict(meta.get("network", {}))
    members = int(meta.get("members", 1))
    if meta["kind"] == "segmentation":
        make = lambda: networks.build_segmenter(meta["arch"], **kwargs)  # noqa: E731
    elif meta["kind"] == "tb":
        make = lambda: networks.build_tb_scorer(meta["arch"], **kwargs)  # noqa: E731
    else:
        raise WeightsError(f"unknown model kind {meta['kind']!r} in sidecar of {meta.get('name')}")
    return make() if members == 1 else networks.Ensemble([make() for _ in range(members)])


def calibration_of(meta: dict[str, Any]) -> tuple[float, float] | None:
    """The sidecar's Platt calibration ``(slope, intercept)``, or None when it has none.

    ``calibration`` is ``{"method": "platt", "slope": a, "intercept": b, ...}``: the score is
    ``sigmoid(a * logit + b)`` and the sidecar's ``threshold`` applies to that score.
    """
    cal = meta.get("calibration")
    if cal is None:
        return None
    if not isinstance(cal, dict) or cal.get("method") != "platt":
        raise WeightsError(f"{meta.get('name')}: unknown calibration {cal!r} (only method 'platt' is known)")
    try:
        slope, intercept = float(cal["slope"]), float(cal["intercept"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{meta.get('name')}: calibration needs numeric slope and intercept ({exc})") from None
    if not slope > 0:
        raise WeightsError(f"{meta.get('name')}: calibration slope {slope} must be positive")
    return slope, intercept


def calibrate(net: Any, meta: dict[str, Any]) -> Any:
    """``net`` wrapped in its sidecar's calibration (:class:`models.networks.Calibrated`), or as it is."""
    cal = calibration_of(meta)
    if cal is None:
        return net
    from models import networks

    return networks.Calibrated(net, *cal)


_cache: dict[tuple[str, str, str], LoadedModel] = {}
_lock = threading.Lock()


def load(stem: str, device: str = "cpu", weights_dir: Path = WEIGHTS_DIR) -> LoadedModel:
    """Verify, build and load ``stem`` onto ``device`` once; later calls return the cached model."""
    import torch

    key = (str(Path(weights_dir).resolve()), stem, device)
    with _lock:
        if key in _cache:
            return _cache[key]
        meta = verify(stem, Path(weights_dir))
        net = build_from_meta(meta)
        path = Path(weights_dir) / meta.get("weights_file", f"{stem}.pt")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(f"{path} does not fit the network its sidecar describes: {exc}") from exc
        net = calibrate(net, meta)
        net.to(device).eval()
        model = LoadedModel(net=net, meta=meta, identity=identity_of(meta), device=device)
        _cache[key] = model
        return model


def clear_cache() -> None:
    """Forget loaded models (tests)."""
    with _lock:
        _cache.clear()


def save(net: Any, meta: dict[str, Any], stem: str, out_dir: Path) -> dict[str, Any]:
    """Write ``stem``.pt (float16 state dict), its sidecar and its ``SHA256SUMS`` line.

    ``meta`` needs at least name, version, kind, arch, network; the sha256, file name and
    storage dtype are filled in here. ``net`` is the uncalibrated network (a calibration lives in
    ``meta``, see :func:`calibrate`). Returns the sidecar as written.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()) for k, v in net.state_dict().items()}
    path = out_dir / f"{stem}.pt"
    torch.save(state, path)
    meta = dict(meta, weights_file=path.name, storage_dtype="float16", sha256=sha256_file(path))
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    sums = read_sums(out_dir)
    sums[path.name] = meta["sha256"]
    write_sums(out_dir, sums)
    return meta
