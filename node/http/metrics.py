"""The node's Prometheus metrics: the metric objects, the hooks that feed them, the collectors read at
scrape time.

Metrics are ``prometheus_client`` objects in its default registry (which also carries the library's
``process_*`` and ``python_*`` metrics); :func:`exposition` adds what only a serving process knows
(its role, the queue). Every name starts with ``cxrnode_``:

- ``cxrnode_stage_duration_seconds{stage}`` (histogram): ``receive`` (the C-STORE handler:
  decode, archive with fsync, enqueue; every C-STORE, whatever its status), ``queue_wait`` (from
  due, i.e. received or due again after a retry, to claimed by a worker), ``inference`` (read,
  pixels, networks), ``encoding`` (SEG/SR/SC built and re-read), ``sending`` (one successful
  C-STORE association to one destination), ``end_to_end`` (received to results at every
  destination);
- ``cxrnode_cstore_total{status}``: C-STOREs answered, by DIMSE status (``0x0000``, ``0xA700``,
  ``0xA900``, ``0xC210``; ``exception`` if the handler raised);
- ``cxrnode_associations_total{result}``: associations ``accepted`` / ``rejected`` (allow-list,
  too many; a failed TLS handshake never becomes an association and is only audited);
- ``cxrnode_send_attempts_total{destination}``, ``cxrnode_send_failures_total{destination}``:
  C-STORE rounds of results to each destination, and those that failed;
- ``cxrnode_lung_segmentations_total{plausibility}``: radiographs analysed, by whether their lung
  segmentation passed the anatomical plausibility check (:mod:`models.plausibility`): ``plausible``
  or ``implausible`` (a missing or misplaced lung, fragments, the whole image: an overlay a person
  must not trust; the job's ``infer`` step says so too);
- ``cxrnode_model_info{architecture,device,runtime,segmenter,segmenter_version,segmenter_sha256,
  tb_model,tb_model_version,tb_model_sha256,tb_threshold}``: the loaded networks, how they run
  (``torch`` or ``onnx``) and the TB operating threshold in use (the model's own, or
  ``[worker] tb_threshold``) (processes that work, once loaded);
- ``cxrnode_build_info{version,role}``: role ``serve``, ``listener`` or ``worker``;
- read at scrape time, by listening processes only: ``cxrnode_jobs{state}`` (jobs per state),
  ``cxrnode_oldest_waiting_job_age_seconds`` (oldest job not finished; 0: none),
  ``cxrnode_queue_up`` (1 if the queue answered the scrape), ``cxrnode_data_disk_free_bytes``
  and ``cxrnode_data_disk_min_free_bytes`` (``node.min_free_disk_mb``: below it C-STOREs are
  refused with 0xA700).

Each process exports its own figures (see ``docs/ARCHITECTURE.md``, "Decisions"): the counters
and histograms count what this process did; the queue's gauges, computed from the shared
database, are exported by listening processes only, so that a ``cxrnode worker`` beside a
``cxrnode serve`` does not report the same jobs twice.

The hooks (:func:`instrument_store`, :func:`job_claimed`, :func:`observe_stage`, ...) are called
from where the work happens and never raise: a metric must not break a C-STORE or a job.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from node.queue.db import Database
    from node.queue.tables import Job

log = logging.getLogger(__name__)

# The ``*_created`` timestamps double the output for no use here.
disable_created_metrics()

#: The stages of :data:`STAGE_SECONDS`, in the order a radiograph goes through them.
STAGES = ("receive", "queue_wait", "inference", "encoding", "sending", "end_to_end")
#: Stages observed by a process that listens, and by one that works.
LISTENER_STAGES = ("receive",)
WORKER_STAGES = ("queue_wait", "inference", "encoding", "sending", "end_to_end")
#: Those of :data:`WORKER_STAGES` the sender observes.
SENDER_STAGES = ("sending", "end_to_end")
#: From a fast C-STORE (a few ms) to a job that waited behind a long queue or a PACS down for hours.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
             300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)

STAGE_SECONDS = Histogram("cxrnode_stage_duration_seconds",
                          "Time a radiograph spends in each stage of the node, seconds",
                          ["stage"], buckets=BUCKETS_S)
CSTORES = Counter("cxrnode_cstore", "C-STORE requests answered by the listener, by DIMSE status",
                  ["status"])
ASSOCIATIONS = Counter("cxrnode_associations", "Associations requested of the listener, by result",
                       ["result"])
SEND_ATTEMPTS = Counter("cxrnode_send_attempts", "C-STORE rounds of results to a destination",
                        ["destination"])
SEND_FAILURES = Counter("cxrnode_send_failures", "C-STORE rounds to a destination that failed",
                        ["destination"])
LUNG_SEGMENTATIONS = Counter("cxrnode_lung_segmentations",
                             "Radiographs analysed, by the anatomical plausibility of their lung segmentation",
                             ["plausibility"])
#: The values of :data:`LUNG_SEGMENTATIONS`'s label.
PLAUSIBILITY_LABELS = ("plausible", "implausible")


def _never_raises(hook: Callable[..., None]) -> Callable[..., None]:
    """A hook whose failure is logged (once per call) and swallowed."""
    @functools.wraps(hook)
    def safe(*args: Any, **kwargs: Any) -> None:
        try:
            hook(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a metric never breaks the work it measures
            log.warning("metrics: %s failed", hook.__name__, exc_info=True)
    return safe


# ----- hooks -----

def now() -> float:
    """A start time for :func:`send_attempted` (monotonic seconds)."""
    return time.monotonic()


@_never_raises
def observe_stage(stage: str, seconds: float) -> None:
    """Record ``seconds`` spent in ``stage`` (one of :data:`STAGES`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    STAGE_SECONDS.labels(stage).observe(max(0.0, seconds))


@_never_raises
def lung_segmentation_checked(plausible: bool) -> None:
    """Count one analysed radiograph as ``plausible`` or ``implausible`` (:data:`LUNG_SEGMENTATIONS`)."""
    LUNG_SEGMENTATIONS.labels(PLAUSIBILITY_LABELS[0] if plausible else PLAUSIBILITY_LABELS[1]).inc()


def _status_label(status: Any) -> str:
    code = getattr(status, "Status", status)  # a pydicom Dataset with Status, or an int
    return f"0x{int(code):04X}"


def instrument_store(handler: Callable[..., Any]) -> Callable[..., Any]:
    """The C-STORE handler ``handler`` (``EVT_C_STORE``), counting each answer by status and
    timing it as the ``receive`` stage. An exception (pynetdicom then answers 0xC211) counts as
    status ``exception``."""
    @functools.wraps(handler)
    def handle(event: Any, *args: Any) -> Any:
        started = time.perf_counter()
        label = "exception"
        try:
            status = handler(event, *args)
            label = _status_label(status)
            return status
        finally:
            _count_store(label, time.perf_counter() - started)
    return handle


@_never_raises
def _count_store(label: str, seconds: float) -> None:
    CSTORES.labels(label).inc()
    STAGE_SECONDS.labels("receive").observe(seconds)


@_never_raises
def _association(result: str, _event: Any) -> None:
    ASSOCIATIONS.labels(result).inc()


def association_handlers() -> list[tuple[Any, Callable[[Any], None]]]:
    """``evt_handlers`` entries counting accepted and rejected associations."""
    from pynetdicom import evt

    return [(evt.EVT_ACCEPTED, functools.partial(_association, "accepted")),
            (evt.EVT_REJECTED, functools.partial(_association, "rejected"))]


@_never_raises
def job_claimed(db: Database, job_id: int) -> None:
    """A worker claimed ``job_id``: record how long it waited since it became due (its reception,
    or its retry time), from the job row the claim just wrote."""
    from node.queue.tables import Job

    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.next_attempt_at is None or job.updated_at is None:
            return
        waited = (job.updated_at - job.next_attempt_at).total_seconds()
    STAGE_SECONDS.labels("queue_wait").observe(max(0.0, waited))


@_never_raises
def send_attempted(destination: str, error: str | None, started: float) -> None:
    """One C-STORE round to ``destination`` ended (``error`` None: stored), begun at ``started``
    (:func:`now`)."""
    SEND_ATTEMPTS.labels(destination).inc()
    if error is None:
        STAGE_SECONDS.labels("sending").observe(max(0.0, time.monotonic() - started))
    else:
        SEND_FAILURES.labels(destination).inc()


@_never_raises
def job_sent(job: Job, status: str) -> None:
    """The send round of ``job`` (loaded with its instance) ended in ``status``: when done, record
    the time from its reception to now."""
    if str(status) != "done":
        return
    received = job.instance.received_at
    STAGE_SECONDS.labels("end_to_end").observe(
        max(0.0, (datetime.now(UTC) - received).total_seconds()))


# ----- model identity -----

class _ModelInfo(Collector):
    """``cxrnode_model_info``: set by :func:`models_loaded`; absent until then (and in processes
    that do not work)."""

    def __init__(self) -> None:
        self.labels: dict[str, str] | None = None

    def describe(self) -> Iterable[Metric]:
        return [InfoMetricFamily("cxrnode_model", "Models this process analyses with")]

    def collect(self) -> Iterable[Metric]:
        if self.labels is not None:
            yield InfoMetricFamily("cxrnode_model", "Models this process analyses with", value=self.labels)


MODEL_INFO = _ModelInfo()
REGISTRY.register(MODEL_INFO)


@_never_raises
def models_loaded(architecture: str, analyzer: Any, tb_threshold: float) -> None:
    """The worker loaded ``analyzer`` (a :class:`models.inference.LungAnalyzer`) for ``architecture``
    and calls a TB score abnormal from ``tb_threshold`` (written as the SR's parameter is)."""
    seg, tb = analyzer.segmenter_identity, analyzer.tb_identity
    MODEL_INFO.labels = {
        "architecture": architecture, "device": str(analyzer.device), "runtime": str(analyzer.runtime),
        "segmenter": seg.name, "segmenter_version": seg.version, "segmenter_sha256": seg.sha256,
        "tb_model": tb.name, "tb_model_version": tb.version, "tb_model_sha256": tb.sha256,
        "tb_threshold": f"{tb_threshold:g}",
    }


def loaded_models() -> dict[str, str] | None:
    """The labels of ``cxrnode_model_info``, None before the models are loaded."""
    return MODEL_INFO.labels


# ----- per-process exposition -----

class QueueCollector(Collector):
    """Jobs per state and disk space, read when scraped: one query, one ``statvfs``."""

    def __init__(self, db: Database, data_path: Path, min_free_bytes: int) -> None:
        self.db, self.data_path, self.min_free_bytes = db, data_path, min_free_bytes

    #: The gauges :meth:`collect` yields.
    FAMILIES = ("cxrnode_jobs", "cxrnode_oldest_waiting_job_age_seconds", "cxrnode_queue_up",
                "cxrnode_data_disk_free_bytes", "cxrnode_data_disk_min_free_bytes")

    def describe(self) -> Iterable[Metric]:
        """The families :meth:`collect` yields, without samples (and without reading anything)."""
        return [GaugeMetricFamily(name, "") for name in self.FAMILIES]

    def collect(self) -> Iterator[Metric]:
        from node.queue import repository

        up = GaugeMetricFamily("cxrnode_queue_up", "1 if the queue database answered this scrape")
        try:
            status = repository.queue_status(self.db)
        except Exception as exc:  # noqa: BLE001 - the scrape still reports the rest
            log.warning("metrics: cannot read the queue: %s", type(exc).__name__)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            jobs = GaugeMetricFamily("cxrnode_jobs", "Jobs in the queue, by state", labels=["state"])
            for state, count in sorted(status.counts.items()):
                jobs.add_metric([state], count)
            yield jobs
            age = 0.0
            if status.oldest_waiting_at is not None:
                age = max(0.0, (datetime.now(UTC) - status.oldest_waiting_at).total_seconds())
            yield GaugeMetricFamily("cxrnode_oldest_waiting_job_age_seconds",
                                    "Age of the oldest job not finished yet (queued, processing, "
                                    "encoded or sending), seconds; 0 when there is none", value=age)
        yield up
        try:
            free = shutil.disk_usage(self.data_path).free
        except OSError:
            pass
        else:
            yield GaugeMetricFamily("cxrnode_data_disk_free_bytes",
                                    "Free space of the file system holding the data folder, bytes",
                                    value=free)
        yield GaugeMetricFamily("cxrnode_data_disk_min_free_bytes",
                                "node.min_free_disk_mb in bytes: below it C-STOREs are refused",
                                value=self.min_free_bytes)


class _BuildInfo(Collector):
    def __init__(self, role: str) -> None:
        self.role = role

    def describe(self) -> Iterable[Metric]:
        return [InfoMetricFamily("cxrnode_build", "")]

    def collect(self) -> Iterator[Metric]:
        from node import __version__

        yield InfoMetricFamily("cxrnode_build", "cxrnode version and this process's role",
                               value={"version": __version__, "role": self.role})


class Exposition:
    """What ``/metrics`` of one process shows: the default registry plus its own collectors.

    It has the ``collect()`` that ``prometheus_client``'s encoders call, like a registry.
    """

    def __init__(self, *collectors: Collector) -> None:
        self.collectors = (REGISTRY, *collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def exposition(role: str, *, db: Database | None = None, data_path: Path | None = None,
               min_free_bytes: int = 0) -> Exposition:
    """The exposition of a process in ``role``; with ``db`` (listening processes) the queue's
    and the disk's gauges too."""
    collectors: list[Collector] = [_BuildInfo(role)]
    if db is not None and data_path is not None:
        collectors.append(QueueCollector(db, data_path, min_free_bytes))
    return Exposition(*collectors)


def prepare(*, listen: bool, work: bool, destinations: Iterable[str], send: bool | None = None) -> None:
    """Show the series this process will report, at 0, before the first event (so that a rate
    or an alert on them has data from the start). ``send`` defaults to ``work``."""
    send = work if send is None else send
    if listen:
        for stage in LISTENER_STAGES:
            STAGE_SECONDS.labels(stage)
        CSTORES.labels("0x0000")
        for result in ("accepted", "rejected"):
            ASSOCIATIONS.labels(result)
    for stage in WORKER_STAGES:
        if (work and stage not in SENDER_STAGES) or (send and stage in SENDER_STAGES):
            STAGE_SECONDS.labels(stage)
    if work:
        for label in PLAUSIBILITY_LABELS:
            LUNG_SEGMENTATIONS.labels(label)
    if send:
        for name in destinations:
            SEND_ATTEMPTS.labels(name)
            SEND_FAILURES.labels(name)


#: The names a sample of each metric type adds to its family's name.
_SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "info": ("_info",), "gauge": ("",)}


def metric_names() -> frozenset[str]:
    """Every ``cxrnode_*`` name ``/metrics`` can show: each family's name and its samples' names
    (``cxrnode_cstore`` and ``cxrnode_cstore_total``, ``..._bucket``, ...), for dashboards, alert
    rules and their tests. Reads nothing."""
    families = [family for collector in (STAGE_SECONDS, CSTORES, ASSOCIATIONS, SEND_ATTEMPTS,
                                         SEND_FAILURES, LUNG_SEGMENTATIONS, MODEL_INFO, _BuildInfo(""))
                for family in collector.describe()]
    families += [GaugeMetricFamily(name, "") for name in QueueCollector.FAMILIES]
    return frozenset({family.name for family in families}
                     | {family.name + suffix for family in families
                        for suffix in _SAMPLE_SUFFIXES[family.type]})
