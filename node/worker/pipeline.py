"""One radiograph in, its result objects out: load → select → read pixels → analyse → encode → verify.

The result objects are those some destination receives (``outputs`` of each
``[[destinations]]``): the SEG, the SR (which references the SEG, so the SEG is built for it
even when no destination receives it) and the Secondary Capture.

Every failure caused by the input itself (unreadable file, outside the acceptance rules,
unusable header, unreadable pixels) is raised as :class:`RejectedInput`: the job is discarded
with that reason. Anything else is an error the runner records and retries.

Each step is a small function; the networks come from :mod:`models.inference`, the same code
path ``cxrnode evaluate`` measures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

from models import plausibility
from node.archive import check_uid
from node.errors import EncodingError, RejectedInput
from node.http import metrics
from node.imaging import UnreadablePixels, display_pixels, patient_left_on_image_right
from node.loop import describe
from node.results import verify
from node.results.algorithm import ResultAlgorithms
from node.results.device import NodeDevice, device_for
from node.results.measure import lung_areas_mm2
from node.results.sc import build_secondary_capture
from node.results.seg import build_segmentation
from node.results.source import encoding_source
from node.results.sr import build_report
from node.settings import Settings
from node.worker import shadow as shadow_mode
from node.worker.selection import rejection_reason

if TYPE_CHECKING:
    from models.catalog import ModelRegistry
    from models.inference import LungAnalysis, LungAnalyzer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedObject:
    """One result object, encoded and re-read: ``data`` is exactly what is archived and sent."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    data: bytes


@dataclass(frozen=True)
class Outcome:
    """Encoded results of one job, ready for the archive."""

    results: tuple[EncodedObject, ...]
    tb_score: float
    summary: str
    #: The anatomical plausibility of the lung segmentation (0..1, :mod:`models.plausibility`); below
    #: :data:`models.plausibility.PLAUSIBLE` the overlay and the TB score need a person's check.
    plausibility: float | None = None
    #: Shadow mode: the challenger's analysis of the same pixels and its comparison with the
    #: champion's, deferred: the runner calls it after the job's results are recorded and records
    #: what it returns (the columns of a ``shadow_results`` row; it never raises). None: no shadow.
    shadow: Callable[[], dict[str, Any]] | None = field(default=None, compare=False, repr=False)

    def result(self, kind: str) -> EncodedObject | None:
        return next((r for r in self.results if r.kind == kind), None)


def load(path: Path) -> Dataset:
    """Read an archived object; unreadable files are rejected, not retried.

    Raises:
        RejectedInput: the only exception for any file content (the parser raises many types:
            InvalidDicomError, EOFError, ValueError, struct.error, ...), or a missing file.
    """
    try:
        return dcmread(path)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, the input is at fault
        raise RejectedInput(
            f"cannot read the archived object: {type(exc).__name__}: {str(exc)[:200]}") from None


def prepare_source(ds: Dataset) -> None:
    """Make the header usable by the result encoders, or reject it with the reason (the rest of
    the mending, which cannot reject, is :func:`node.results.source.encoding_source`'s, once a job).

    * Study, Series and SOP Instance UID must be valid UIDs: the results reference the source
      and file into its study (the listener checks this too; an archive written by an older
      version or by hand may not have been).
    * An empty Specific Character Set means the default repertoire (PS3.3 C.12.1.1.2), the
      same as none, and an empty first value of a multi-valued one means ISO 2022 IR 6;
      highdicom refuses empty values, so they are written out (or the element removed).

    Raises:
        RejectedInput: a UID is missing or invalid; a Specific Character Set value is not a
            defined term.
    """
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        try:
            value = ds.get(keyword)
            check_uid(value if isinstance(value, str) else "")
        except Exception:  # noqa: BLE001 - UnsafeUID, or an element that cannot be decoded
            raise RejectedInput(f"{keyword} is missing or not a valid UID") from None
    if "SpecificCharacterSet" not in ds:
        return
    try:
        charset = ds.get("SpecificCharacterSet")
    except Exception:  # noqa: BLE001 - undecodable: treat as absent, like empty
        charset = ""
    values = [str(v).strip() for v in ([charset] if isinstance(charset, str) else charset or [])]
    unknown = [v for v in values if v and v not in python_encoding]
    if unknown:
        raise RejectedInput(f"Specific Character Set {unknown[0][:16]!r} is not a DICOM defined term")
    if not any(values):
        del ds.SpecificCharacterSet
    elif not values[0]:  # e.g. "\\ISO 2022 IR 87" (common in Japan): value 1 is the default
        ds.SpecificCharacterSet = ["ISO 2022 IR 6", *values[1:]]


def standard_view(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """The pixels as the networks were trained to see them: the patient's left on the image's right.

    An image whose Patient Orientation says it is mirrored (row direction R) is flipped left-right
    for the networks; :func:`patient_sides` flips the masks back onto the stored pixel grid.
    """
    return pixels if patient_left_on_image_right(ds) else pixels[:, ::-1]


def patient_sides(ds: Dataset, analysis: LungAnalysis) -> tuple[np.ndarray, np.ndarray]:
    """(patient's left lung, patient's right lung) on the stored pixel grid, from an analysis of
    :func:`standard_view` (where the patient's left lung is the one on the image's right)."""
    left, right = analysis.image_right, analysis.image_left
    if patient_left_on_image_right(ds):
        return left, right
    return np.ascontiguousarray(left[:, ::-1]), np.ascontiguousarray(right[:, ::-1])


@dataclass(frozen=True)
class _Serving:
    """The models one job is analysed with, taken together when it starts."""

    analyzer: LungAnalyzer
    tb_threshold: float
    shadow_setup: shadow_mode.ShadowSetup | None
    shadow: LungAnalyzer | None


def _load_champions(registry: ModelRegistry, device: str, settings: Settings) -> LungAnalyzer:
    """The registry's segmenter and TB champions, checksummed and loaded (once per process), in the
    ``worker.runtime`` (ONNX exports cached in ``<data_dir>/cache/onnx``)."""
    from models.inference import LungAnalyzer

    champions = registry.champions()
    return LungAnalyzer.from_entries(champions["segmenter"], champions["tb"], device, **_runtime(settings))


def _runtime(settings: Settings) -> dict[str, Any]:
    """The ``runtime`` and ``onnx_cache`` arguments of :class:`models.inference.LungAnalyzer`'s loaders."""
    return {"runtime": settings.worker.runtime, "onnx_cache": settings.onnx_cache_path}


class Pipeline:
    """Holds the loaded networks; ``run`` is called once per job.

    Built by :meth:`load`, it serves the model registry's champions (:mod:`models.catalog`) and,
    before each job, switches to new ones when ``cxrnode models promote``/``rollback`` changed
    them (:meth:`refresh`): a job is analysed by one pair of models from start to end, and no job
    waits for or is lost to a switch. Built with an ``analyzer`` and no ``registry``, it keeps it.

    Several worker threads (``worker.concurrency``) share one pipeline: a job takes the models in
    service, their threshold and the shadow together (:class:`_Serving`) when it starts, and
    only one thread at a time looks for (and loads) new ones.
    """

    def __init__(self, settings: Settings, analyzer: LungAnalyzer, device: NodeDevice | None = None,
                 registry: ModelRegistry | None = None, registry_token: str | None = None) -> None:
        self.settings = settings
        #: The node's identity in every result: ``[node]`` settings + this installation's defaults.
        self.device = device if device is not None else device_for(settings)
        self.output_kinds = settings.output_kinds
        self.registry = registry
        self._token = registry_token
        #: the shadow (``cxrnode models shadow``): which models, and their analyzer when loaded
        self.shadow_setup: shadow_mode.ShadowSetup | None = None
        self._shadow: LungAnalyzer | None = None
        self._switching = threading.Lock()
        self._use(analyzer)
        if registry is not None:
            self._load_shadow()

    def _use(self, analyzer: LungAnalyzer) -> None:
        self.analyzer = analyzer
        configured = self.settings.worker.tb_threshold
        self.tb_threshold = analyzer.tb_threshold if configured < 0 else configured

    @classmethod
    def load(cls, settings: Settings) -> Pipeline:
        from models.catalog import ModelRegistry

        device = device_for(settings)  # before the networks: a read-only data folder fails at once
        log.info("results made by station %s, serial %s, Device UID %s", device.station_name,
                 device.device_serial_number, device.device_uid)
        registry = ModelRegistry(settings.models_registry_path, initial_arch=settings.worker.architecture)
        token = registry.state_token()  # first: a change from here on is seen before the next job
        analyzer = _load_champions(registry, settings.worker.device, settings)
        seg, arch = analyzer.segmenter_identity, analyzer.segmenter_arch
        if arch != settings.worker.architecture:
            log.warning("worker.architecture is %s but the segmenter in service is %s (%s): the model registry "
                        "decides (cxrnode models list; promote another with cxrnode models promote)",
                        settings.worker.architecture, analyzer.refs[0], arch)
        log.info("models loaded on %s (%s): %s (%s %s) and %s from %s", analyzer.device,
                 "onnxruntime, CPU provider" if analyzer.runtime == "onnx" else "torch", analyzer.refs[0], seg.name,
                 seg.version, analyzer.refs[1], registry.root)
        pipeline = cls(settings, analyzer, device, registry=registry, registry_token=token)
        metrics.models_loaded(arch, analyzer, pipeline.tb_threshold)
        return pipeline

    def refresh(self) -> bool:
        """Between jobs: load the registry's champions if a promotion or rollback changed them.

        One ``stat`` when nothing changed. True when other models serve from now on. If the new
        champions cannot be loaded (their weights fail the checksum), the models in service stay,
        with an error in the log, until the registry changes again.
        """
        if self.registry is None:
            return False
        token = self.registry.state_token()
        if token == self._token:
            return False
        self._token = token
        switched = self._switch_champions()
        self._load_shadow()
        return switched

    def _switch_champions(self) -> bool:
        assert self.registry is not None
        try:
            refs = self.registry.champion_refs()
            if (refs.get("segmenter"), refs.get("tb")) == self.analyzer.refs:
                return False
            analyzer = _load_champions(self.registry, self.analyzer.device, self.settings)
        except Exception as exc:  # noqa: BLE001 - keep serving what is loaded; say why
            log.error("models: cannot load the new champions (%s); still serving %s",
                      describe(exc), ", ".join(self.analyzer.refs or ()))
            return False
        old = self.analyzer.refs or ("?", "?")
        for now, was in zip(analyzer.refs, old, strict=True):
            if now != was:
                log.info("models: now %s (was %s)", now, was)
        self._use(analyzer)
        metrics.models_loaded(analyzer.segmenter_arch, analyzer, self.tb_threshold)
        return True

    def _load_shadow(self) -> None:
        """Load the registry's shadows (a slot's shadow equal to its champion is none); a shadow that
        cannot be loaded is kept as a setup with its error, recorded with every job it misses."""
        from models.inference import LungAnalyzer

        assert self.registry is not None
        champions = dict(zip(("segmenter", "tb"), self.analyzer.refs or ("", ""), strict=True))
        try:
            shadows = {slot: ref for slot, ref in self.registry.shadow_refs().items()
                       if ref and ref != champions.get(slot)}
        except Exception as exc:  # noqa: BLE001 - shadows are optional: never stop serving for them
            log.error("models: cannot read the shadows (%s); none runs", describe(exc))
            shadows = {}
        if not shadows:
            if self.shadow_setup is not None:
                log.info("models: no shadow runs from now on (was %s)", self.shadow_setup.ref)
            self.shadow_setup, self._shadow = None, None
            return
        setup = shadow_mode.ShadowSetup(" + ".join(shadows[s] for s in ("segmenter", "tb") if s in shadows),
                                        shadows.get("segmenter", champions["segmenter"]),
                                        shadows.get("tb", champions["tb"]))
        if setup == self.shadow_setup and self._shadow is not None:
            return
        try:
            analyzer = LungAnalyzer.from_entries(self.registry.entry_exact(setup.segmenter),
                                                 self.registry.entry_exact(setup.tb), self.analyzer.device,
                                                 **_runtime(self.settings))
        except Exception as exc:  # noqa: BLE001 - recorded on each job's shadow row instead
            log.error("models: cannot load the shadow %s (%s); each job records the error", setup.ref,
                      describe(exc))
            self.shadow_setup = shadow_mode.ShadowSetup(setup.ref, setup.segmenter, setup.tb, error=describe(exc))
            self._shadow = None
            return
        log.info("models: %s runs in shadow beside %s (results recorded, never sent)", setup.ref,
                 ", ".join(self.analyzer.refs or ()))
        self.shadow_setup, self._shadow = setup, analyzer

    def _serving(self) -> _Serving:
        """What one job is analysed with, after switching to new champions if they changed."""
        with self._switching:
            self.refresh()
            return _Serving(self.analyzer, self.tb_threshold, self.shadow_setup, self._shadow)

    @staticmethod
    def _shadow_job(view: np.ndarray, champion: LungAnalysis, serving: _Serving) -> Callable[[], dict[str, Any]] | None:
        """The deferred shadow analysis of ``view`` (the champion's input) for :attr:`Outcome.shadow`."""
        setup, analyzer = serving.shadow_setup, serving.shadow
        if setup is None:
            return None
        refs = serving.analyzer.refs or ("", "")
        champion_threshold = serving.tb_threshold
        # its own operating point: the shadow TB scorer's threshold; the champion's TB scorer keeps the node's
        shadow_threshold = analyzer.tb_threshold if analyzer is not None and setup.tb != refs[1] else champion_threshold

        def run() -> dict[str, Any]:
            started = time.perf_counter()
            fields: dict[str, Any] = {"shadow_ref": setup.ref, "champion_segmenter": refs[0], "champion_tb": refs[1],
                                      "shadow_segmenter": setup.segmenter, "shadow_tb": setup.tb,
                                      "error": setup.error}
            if analyzer is not None:
                try:
                    fields.update(shadow_mode.compare(champion, analyzer.analyze(view), champion_threshold,
                                                      shadow_threshold))
                except Exception as exc:  # noqa: BLE001 - a shadow never fails a job
                    log.exception("shadow %s failed", setup.ref)
                    fields["error"] = describe(exc)
            fields["seconds"] = time.perf_counter() - started
            return fields

        return run

    def run(self, path: Path) -> Outcome:
        """Analyse the object at ``path`` (with the champions in service when it starts).

        Raises:
            RejectedInput: outside the acceptance rules, or the pixels cannot be read.
        """
        serving = self._serving()
        threshold = serving.tb_threshold
        started = time.perf_counter()
        ds = load(path)
        reason = rejection_reason(ds, self.settings.acceptance)
        if reason is not None:
            raise RejectedInput(reason)
        prepare_source(ds)
        try:
            pixels = display_pixels(ds)
        except UnreadablePixels as exc:
            raise RejectedInput(f"unreadable pixel data: {exc}") from None
        view = standard_view(ds, pixels)
        analysis = serving.analyzer.analyze(view)
        quality = plausibility.analysis_plausibility(analysis)  # on the standard view, as the networks saw it
        plausible = quality >= plausibility.PLAUSIBLE
        metrics.lung_segmentation_checked(plausible)
        # Not only failures: a real lung much smaller than the other (collapse, resection) scores low too
        # (2 of the 466 training reference masks), so the words ask for a look, not a verdict.
        warning = None if plausible else (
            f"lung segmentation implausible (plausibility {quality:.2f} < {plausibility.PLAUSIBLE}: a lung missing, "
            "much smaller than the other, fragmented or misplaced): check the lung outlines before relying on "
            "them or on the TB score")
        inferred = time.perf_counter()
        metrics.observe_stage("inference", inferred - started)
        left, right = patient_sides(ds, analysis)
        algorithms = ResultAlgorithms.from_model_identities(analysis.segmenter, analysis.tb_model)
        kinds = self.output_kinds
        try:
            source = encoding_source(ds)  # mended once: every result is encoded from this header
            spacing = source.spacing
            areas = lung_areas_mm2(left, right, spacing) if spacing is not None else None
            omission = None if spacing is not None else (
                "no usable Imager Pixel Spacing or Pixel Spacing in the source image")
            datasets = []
            if "seg" in kinds or "sr" in kinds:
                seg = build_segmentation(source, left, right, algorithms.segmenter, device=self.device)
                if "seg" in kinds:
                    datasets.append(("seg", seg))
                if "sr" in kinds:
                    datasets.append(("sr", build_report(
                        source, seg, tb_score=analysis.tb_score, threshold=threshold,
                        lung_masks={"left": left, "right": right}, areas_mm2=areas,
                        area_omission_reason=omission, algorithms=algorithms, device=self.device,
                        quality_warning=warning)))
            if "sc" in kinds:
                datasets.append(("sc", build_secondary_capture(
                    source, pixels, left, right, patient_left_on_image_right=patient_left_on_image_right(ds),
                    tb_score=analysis.tb_score, threshold=threshold, algorithms=algorithms,
                    device=self.device, quality_warning=warning)))
            results = tuple(EncodedObject(kind, str(obj.SOPClassUID), str(obj.SOPInstanceUID), verify.reread(obj))
                            for kind, obj in datasets)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            # The same header and masks give the same error every time: retrying cannot help.
            raise EncodingError(f"results could not be encoded: {type(exc).__name__}: {exc}") from exc
        done = time.perf_counter()
        metrics.observe_stage("encoding", done - inferred)
        check = "" if plausible else (
            f" < {plausibility.PLAUSIBLE}: IMPLAUSIBLE, check the overlay and the TB score")
        summary = (f"TB score {analysis.tb_score:.3f} (threshold {threshold:.3f}); "
                   f"lung plausibility {quality:.3f}{check}; "
                   f"inference {inferred - started:.2f} s, encoding {done - inferred:.2f} s")
        return Outcome(results, float(analysis.tb_score), summary, plausibility=quality,
                       shadow=self._shadow_job(view, analysis, serving))
