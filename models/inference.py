"""The inference API the node calls: :class:`LungAnalyzer` -> :class:`LungAnalysis`.

Evaluation (:mod:`models.evaluation`) uses exactly this class and the same shipped
weights, so the reported metrics are the node's metrics.

The networks run in torch (the default) or, with ``runtime="onnx"``, as ONNX exports in
onnxruntime on the CPU (:mod:`models.onnx_runtime`); the pre- and post-processing around them is
the same code either way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models import registry, transforms
from models.identity import ModelIdentity
from models.onnx_runtime import RUNTIMES

if TYPE_CHECKING:
    from models.catalog import Entry
    from models.onnx_runtime import OnnxNetwork

log = logging.getLogger(__name__)

def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES`, else ValueError."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; use {' or '.join(RUNTIMES)}")
    return runtime


@dataclass(frozen=True)
class LungAnalysis:
    """Result for one radiograph, in the input image's geometry."""

    lung_mask: np.ndarray  # bool, same HxW as the input image, post-processed
    image_left: np.ndarray  # bool HxW, the lung on the image's left half (patient's right on a PA view)
    image_right: np.ndarray  # bool HxW, the lung on the image's right half
    tb_score: float  # 0..1
    segmenter: ModelIdentity
    tb_model: ModelIdentity


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def _runtime_device(runtime: str, device: str, onnx_cache: str | os.PathLike[str] | None
                    ) -> tuple[str, str, Path | None]:
    """(runtime, resolved device, ONNX cache folder) for a load. ONNX runs on the CPU (onnxruntime's
    CPU provider): ``auto`` means ``cpu`` there, and a GPU asked for by name is an error."""
    runtime = check_runtime(runtime)
    cache = Path(onnx_cache) if onnx_cache is not None else None
    if runtime == "torch":
        return runtime, resolve_device(device), cache
    if device != "auto" and device != "cpu":
        raise ValueError(f"runtime 'onnx' runs on the CPU (onnxruntime's CPU provider); device {device!r} "
                         "needs runtime 'torch'")
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            log.info("runtime onnx: the networks run on the CPU (onnxruntime's CPU provider), not on the GPU "
                     "torch sees; use runtime 'torch' for the GPU")
    return runtime, "cpu", cache


class LungAnalyzer:
    """Lung segmentation plus TB scoring with the shipped (checksummed) weights."""

    def __init__(self, segmenter: registry.LoadedModel, tb_model: registry.LoadedModel, runtime: str = "torch",
                 onnx_cache: str | os.PathLike[str] | None = None) -> None:
        self._seg = segmenter
        self._tb = tb_model
        self.device: str = segmenter.device
        self.seg_size: int = int(segmenter.meta["input_size"])
        self.seg_threshold: float = float(segmenter.meta.get("threshold", transforms.MASK_THRESHOLD))
        self.tb_size: int = int(tb_model.meta["input_size"])
        #: the shipped operating threshold (score >= threshold = "TB suspected")
        self.tb_threshold: float = float(tb_model.meta["threshold"])
        #: (segmenter ref, TB ref) in the model registry when loaded by :meth:`from_entries`, else None
        self.refs: tuple[str, str] | None = None
        #: ``torch`` or ``onnx`` (:mod:`models.onnx_runtime`: the same networks exported, run by onnxruntime)
        self.runtime: str = check_runtime(runtime)
        self._seg_onnx: OnnxNetwork | None = None
        self._tb_onnx: OnnxNetwork | None = None
        if runtime == "onnx":
            from models import onnx_runtime

            seg_shape = (1, 1, self.seg_size, self.seg_size)
            # the TB scorer's input as analyze() makes it: (channels, size, size) from the shared transform
            tb_shape = (1, *transforms.tb_input_for_lungs(np.zeros(seg_shape[2:], np.float32),
                                                          np.ones(seg_shape[2:], bool), self.tb_size).shape)
            self._seg_onnx = onnx_runtime.network_for(segmenter, seg_shape, onnx_cache)
            self._tb_onnx = onnx_runtime.network_for(tb_model, tb_shape, onnx_cache)

    @classmethod
    def load(
        cls, arch: str = "unet", device: str = "auto", weights_dir: str | Path | None = None,
        runtime: str = "torch", onnx_cache: str | os.PathLike[str] | None = None,
    ) -> LungAnalyzer:
        """Load (and checksum) the segmenter for ``arch`` and the TB scorer, once per process.

        ``runtime``: ``torch`` (default) or ``onnx``
        (on the CPU; exported once into ``onnx_cache``, default
        :func:`models.onnx_runtime.default_cache_dir`)."""
        if arch not in registry.SEGMENTER_FILES:
            raise ValueError(f"unknown segmentation arch {arch!r}; choose from {', '.join(registry.SEGMENTER_FILES)}")
        wd = Path(weights_dir) if weights_dir is not None else registry.WEIGHTS_DIR
        runtime, dev, cache = _runtime_device(runtime, device, onnx_cache)
        seg = registry.load(registry.SEGMENTER_FILES[arch], dev, wd)
        tb = registry.load(registry.TB_FILE, dev, wd)
        return cls(seg, tb, runtime, cache)

    @classmethod
    def from_entries(cls, segmenter: Entry, tb: Entry, device: str = "auto", runtime: str = "torch",
                     onnx_cache: str | os.PathLike[str] | None = None) -> LungAnalyzer:
        """Load two registry entries (:class:`models.catalog.Entry`), checksummed exactly as the
        shipped weights are (:func:`models.registry.load` on the entry's folder), once per process;
        ``runtime`` and ``onnx_cache`` as for :meth:`load`."""
        if segmenter.slot != "segmenter" or tb.slot != "tb":
            raise ValueError(f"need a segmenter and a TB scorer, got {segmenter.ref} ({segmenter.slot}) "
                             f"and {tb.ref} ({tb.slot})")
        runtime, dev, cache = _runtime_device(runtime, device, onnx_cache)
        analyzer = cls(registry.load(segmenter.stem, dev, segmenter.folder), registry.load(tb.stem, dev, tb.folder),
                       runtime, cache)
        analyzer.refs = (segmenter.ref, tb.ref)
        return analyzer

    @property
    def segmenter_identity(self) -> ModelIdentity:
        """Identity of the segmentation weights."""
        return self._seg.identity

    @property
    def segmenter_arch(self) -> str:
        """Architecture of the segmenter (``unet``, ``resunet``), from its sidecar."""
        return str(self._seg.meta.get("arch", ""))

    @property
    def tb_identity(self) -> ModelIdentity:
        """Identity of the TB-scorer weights."""
        return self._tb.identity

    def lung_probabilities(self, net_image: np.ndarray) -> np.ndarray:
        """Segmenter probabilities for a preprocessed ``seg_size`` image; float32."""
        import torch

        if self._seg_onnx is not None:
            logits = self._seg_onnx(np.ascontiguousarray(net_image, dtype=np.float32)[None, None])
            return torch.sigmoid(torch.from_numpy(logits))[0, 0].numpy()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(net_image, dtype=np.float32))[None, None].to(self.device)
            return torch.sigmoid(self._seg.net(x))[0, 0].float().cpu().numpy()

    def tb_probability(self, net_image: np.ndarray, lung_prob: np.ndarray) -> float:
        """TB score for a preprocessed image and its lung probabilities."""
        return self._tb_score(transforms.tb_input(net_image, lung_prob, self.tb_size))

    def _tb_score(self, x: np.ndarray) -> float:
        """The TB scorer's output for its input (:func:`models.transforms.tb_input`)."""
        import torch

        if self._tb_onnx is not None:
            return float(torch.sigmoid(torch.from_numpy(self._tb_onnx(x[None]))).reshape(-1)[0].item())
        with torch.inference_mode():
            t = torch.from_numpy(x)[None].to(self.device)
            return float(torch.sigmoid(self._tb.net(t)).reshape(-1)[0].item())

    def analyze(self, image: np.ndarray, out_shape: tuple[int, int] | None = None) -> LungAnalysis:
        """Segment the lungs and score TB on a 2-D display-oriented image of any size/range.

        The masks come back in the image's geometry, or in ``out_shape`` (H, W) if given
        (evaluation uses this when a data set's masks are larger than its images).
        """
        image = np.asarray(image)
        net_image = transforms.preprocess(image, self.seg_size)
        prob = self.lung_probabilities(net_image)
        shape = tuple(out_shape) if out_shape is not None else image.shape
        # Split once at network size: the masks and the TB scorer's crop both start from it
        # (the TB input is always cut at MASK_THRESHOLD, the shipped segmenters' threshold).
        small = transforms.split_lungs(prob >= self.seg_threshold)
        lungs = transforms.resample_lungs(prob, small, shape, self.seg_threshold)
        tb_lungs = (small.lung if self.seg_threshold == transforms.MASK_THRESHOLD
                    else transforms.split_lungs(prob >= transforms.MASK_THRESHOLD).lung)
        return LungAnalysis(
            lung_mask=lungs.lung,
            image_left=lungs.image_left,
            image_right=lungs.image_right,
            tb_score=self._tb_score(transforms.tb_input_for_lungs(net_image, tb_lungs, self.tb_size)),
            segmenter=self._seg.identity,
            tb_model=self._tb.identity,
        )
