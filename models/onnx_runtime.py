"""The networks as ONNX, run by onnxruntime on the CPU (``[worker] runtime = "onnx"``).

:func:`network_for` turns a loaded network (:attr:`models.registry.LoadedModel.net`, whatever
module it is: a UNet, an ensemble, a network wrapped later, e.g. by a calibration layer) into an
:class:`OnnxNetwork` that returns what the module returns (logits), as float32 numpy arrays; the
caller applies the same sigmoid as on the torch path (:mod:`models.inference`).

Exported once per network, with torch's TorchScript-based exporter (``dynamo=False``: it works
offline with the ``onnx`` package alone; the torch.export-based one also needs ``onnxscript``),
in eval mode, float32, opset :data:`OPSET`, batch axis dynamic. The file is cached in a folder
the caller names (the node: ``<data_dir>/cache/onnx``; ``cxrnode evaluate``:
:func:`default_cache_dir`) under a content key: the weights' sha256 from the sidecar, torch's
version, the opset, the input shape and a digest of the module itself (its structure and every
tensor of its state dict), so different weights, a wrapped module or another torch never reuse a
stale export. Each export is checked before it is kept (``onnx.checker``, and onnxruntime's
output against torch's on a fixed input, :data:`EXPORT_TOLERANCE`), written atomically (temporary
file, fsync, rename; its ``.json`` record last) under a per-key file lock, so concurrent processes
do not interleave. On load the file's sha256 must match its record: a damaged or partial file is
exported again (with a warning in the log). Nothing is downloaded.

Sessions are shared within a process (per cache folder and key) and are thread-safe: the worker's
``concurrency`` threads run the same session. They use onnxruntime's CPU provider only (the GPU
build is not installed), ``intra_op_num_threads`` = ``torch.get_num_threads()`` (the threads the
torch path would use), one inter-op thread, and no spinning of idle pool threads, which would
take the cores the other worker threads encode results on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.registry import sha256_file

log = logging.getLogger(__name__)

#: The inference runtimes (``[worker] runtime``, ``cxrnode evaluate --runtime``).
RUNTIMES = ("torch", "onnx")
#: ONNX opset of the exports.
OPSET = 17
#: Bump when the way a network is exported changes: old cache files are then not reused.
EXPORT_FORMAT = 1
#: Largest difference of the logits between torch and onnxruntime on the export's check input, relative
#: to the largest logit (at least 1), for the export to be kept. Measured on the shipped networks: below
#: 1e-4 absolute; a wrongly exported layer (a norm in its training form, dropout) is off by far more.
EXPORT_TOLERANCE = 1e-3
INPUT_NAME, OUTPUT_NAME = "x", "logits"


class OnnxError(RuntimeError):
    """A network could not be exported to ONNX, or its export does not reproduce it."""


def default_cache_dir() -> Path:
    """Where commands without a data folder keep their exports: ``$XDG_CACHE_HOME/cxrnode/onnx``
    (``~/.cache/cxrnode/onnx``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cxrnode" / "onnx"


def session_options() -> Any:
    """onnxruntime session options for a CPU worker (see the module's docstring)."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: the optimiser's notes are not the operator's business
    return so


@dataclass(frozen=True)
class OnnxNetwork:
    """One exported network in an onnxruntime session; call it like the module (numpy in and out)."""

    session: Any  # onnxruntime.InferenceSession
    path: Path
    key: str
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The module's output for the float32 batch ``x`` (N, C, H, W), as a float32 array."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


_sessions: dict[tuple[str, str], OnnxNetwork] = {}
_lock = threading.Lock()
_exports = 0


def export_count() -> int:
    """Exports made by this process (tests: a cached file is reused, not exported again)."""
    return _exports


def clear_cache() -> None:
    """Forget the sessions of this process (tests); the files stay."""
    with _lock:
        _sessions.clear()


def module_digest(net: Any) -> str:
    """sha256 of a module's class, structure (``repr``) and every tensor of its state dict."""
    import torch

    h = hashlib.sha256()
    h.update(f"{type(net).__module__}.{type(net).__qualname__}\n{net!r}\n".encode())
    for name, tensor in net.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def cache_key(model: Any, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """What an export depends on (``model`` a :class:`models.registry.LoadedModel`); its ``key`` is the
    sha256 of the rest."""
    import torch

    parts = {"format": EXPORT_FORMAT, "weights_sha256": str(model.meta.get("sha256", "")),
             "torch": torch.__version__, "opset": OPSET, "input_shape": [int(n) for n in input_shape],
             "module_sha256": module_digest(model.net)}
    parts["key"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return parts


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(target: Path, write: Any) -> None:
    """``write(tmp_path)`` into a temporary sibling of ``target``, fsync, rename over ``target``."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_input(input_shape: tuple[int, ...]) -> np.ndarray:
    """The fixed input an export is checked on: values in 0..1 like the preprocessed images."""
    return np.random.default_rng(20240611).random(input_shape, dtype=np.float32)


def export(net: Any, input_shape: tuple[int, ...], path: Path) -> float:
    """Export ``net`` (as it is: eval mode, float32, on the CPU) to ``path`` and check the file;
    returns the largest absolute difference between torch's and onnxruntime's outputs on the
    check input. The file is written in place: :func:`network_for` passes a temporary one.

    Raises:
        OnnxError: the exporter failed, the file is not valid ONNX, or its output differs from
            torch's by more than :data:`EXPORT_TOLERANCE`.
    """
    global _exports
    import onnx
    import onnxruntime as ort
    import torch

    x = _check_input(input_shape)
    xt = torch.from_numpy(x)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    if device.type != "cpu" or any(p.dtype != torch.float32 for p in net.parameters()):
        raise OnnxError(f"the ONNX export needs the network in float32 on the CPU, not on {device}")
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            expected = net(xt).float().numpy()
        with warnings.catch_warnings():
            # The TorchScript exporter's notes (deprecation, tracer warnings about MONAI's shape checks,
            # instance norm exported in its training form, which is the same computation without running
            # statistics): the check below is what decides whether the export is right.
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (xt,), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except OnnxError:
        raise
    except Exception as exc:  # any exporter failure: one error naming the cause
        raise OnnxError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        net.train(was_training)
    _exports += 1
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker raises its own types
        raise OnnxError(f"the ONNX export is not valid: {exc}") from exc
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    if got.shape != expected.shape:
        raise OnnxError(f"the ONNX export returns shape {got.shape}, torch {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    tolerance = EXPORT_TOLERANCE * max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    if not diff <= tolerance:
        raise OnnxError(f"the ONNX export does not reproduce the network: logits differ by up to {diff:.3g} "
                        f"(tolerance {tolerance:.3g})")
    return diff


def _load_cached(onnx_path: Path, record_path: Path, key: str) -> tuple[Any | None, str]:
    """(session, "") for a cached export that matches its record, else (None, why not)."""
    import onnxruntime as ort

    if not onnx_path.is_file() or not record_path.is_file():
        return None, "not cached"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"its record {record_path.name} cannot be read ({exc})"
    if not isinstance(record, dict) or record.get("key") != key:
        return None, f"its record {record_path.name} is for another key"
    actual = sha256_file(onnx_path)
    if actual != record.get("onnx_sha256"):
        return None, f"{onnx_path.name} has sha256 {actual[:12]}…, its record says {str(record.get('onnx_sha256'))[:12]}…"
    try:
        return ort.InferenceSession(str(onnx_path), session_options(), providers=["CPUExecutionProvider"]), ""
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        return None, f"onnxruntime cannot load {onnx_path.name} ({str(exc).splitlines()[0][:200]})"


def network_for(model: Any, input_shape: tuple[int, ...], cache_dir: str | os.PathLike[str] | None = None) -> OnnxNetwork:
    """The onnxruntime session of ``model`` (a :class:`models.registry.LoadedModel` on the CPU) for
    inputs of ``input_shape`` (N, C, H, W; N may differ at run time): from this process's sessions,
    else from ``cache_dir`` (default :func:`default_cache_dir`), else exported there now.

    Raises:
        OnnxError: the export failed or does not reproduce the network; OSError: the cache folder
            cannot be written.
    """
    import onnxruntime as ort

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parts = cache_key(model, tuple(input_shape))
    key = parts["key"]
    name = str(model.meta.get("name", "network"))
    with _lock:
        cached = _sessions.get((str(folder.resolve()), key))
        if cached is not None:
            return cached
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{name}-{parts['weights_sha256'][:12] or 'unversioned'}-{key[:16]}"
        onnx_path, record_path = folder / f"{stem}.onnx", folder / f"{stem}.json"
        with _file_lock(folder / f"{stem}.lock"):
            session, why = _load_cached(onnx_path, record_path, key)
            if session is None:
                if why != "not cached":
                    log.warning("ONNX cache: %s; exporting %s again", why, name)
                diff: list[float] = []
                _write_atomically(onnx_path, lambda tmp: diff.append(export(model.net, tuple(input_shape), tmp)))
                record = dict(parts, name=name, onnx_file=onnx_path.name, onnx_sha256=sha256_file(onnx_path),
                              onnxruntime=ort.__version__, check_max_abs_diff=diff[0])
                _write_atomically(record_path, lambda tmp: tmp.write_text(
                    json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8"))
                log.info("ONNX: exported %s to %s (logits within %.2g of torch)", name, onnx_path, diff[0])
                session = ort.InferenceSession(str(onnx_path), session_options(), providers=["CPUExecutionProvider"])
        network = OnnxNetwork(session=session, path=onnx_path, key=key, name=name)
        _sessions[(str(folder.resolve()), key)] = network
        return network
