"""One typed, frozen settings object: TOML file, then ``CXRNODE_*`` environment variables.

Precedence (lowest first): the defaults written in the dataclasses below, the TOML file,
environment variables named ``CXRNODE_<SECTION>_<KEY>`` (for example
``CXRNODE_NODE_PORT=11113`` or ``CXRNODE_WORKER_DEVICE=cpu``). ``CXRNODE_CONFIG`` names the
file when ``--config`` is not given. Destinations come only from the file.

Everything is validated when it loads: an unknown key, a wrong type, an AE title over 16
characters or a port out of range raises :class:`SettingsError` whose message names the key,
so a bad config stops start-up before anything listens.

Secrets (``[web] token``, the password in ``[queue] url``, ``[archive] s3_secret_access_key``) are never shown: ``cxrnode config
check`` prints them withheld or masked, and their environment variables keep them out of the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import SettingsError

ENV_PREFIX = "CXRNODE_"
CONFIG_ENV = "CXRNODE_CONFIG"
FAULTS_ENV = "CXRNODE_FAULT_PAUSE"  # test-only fault injection, see node/faults.py
FAULT_RAISE_ENV = "CXRNODE_FAULT_RAISE"  # likewise

_AE_TITLE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]+$")  # default character repertoire, no backslash


def check_ae_title(key: str, value: str) -> str:
    """Return ``value`` if it is a valid AE title, else raise naming ``key``."""
    if not value.strip():
        raise SettingsError(f"{key}: an AE title may not be empty")
    if len(value) > 16:
        raise SettingsError(f"{key}: AE title {value!r} is longer than 16 characters")
    if not _AE_TITLE_CHARS.match(value):
        raise SettingsError(f"{key}: AE title {value!r} has characters DICOM does not allow")
    return value


def check_port(key: str, value: int, *, allow_zero: bool = False) -> int:
    """Return ``value`` if it is a TCP port, else raise naming ``key``."""
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise SettingsError(f"{key}: port {value} is outside {low}..65535")
    return value


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise SettingsError(f"{key}: must be greater than 0, got {value}")


_TEXT_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]*$")  # printable ASCII without backslash
#: Longest UID root (with its final dot): every generated UID (64 characters) keeps at least
#: 24 digits of its own hash, so results of different images never share a UID.
UID_ROOT_MAX_LENGTH = 40
_UID_ROOT = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+\.?$")


def check_text(key: str, value: str, max_length: int, vr: str) -> str:
    """``value`` without surrounding spaces if it fits DICOM ``vr`` (LO 64, SH 16 characters of
    the default repertoire, no backslash), else raise naming ``key``."""
    value = value.strip()
    if len(value) > max_length:
        raise SettingsError(f"{key}: {value!r} is longer than {max_length} characters (DICOM {vr})")
    if not _TEXT_CHARS.match(value):
        raise SettingsError(f"{key}: {value!r} may hold only printable ASCII characters without a backslash")
    return value


def check_uid_root(key: str, value: str) -> str:
    """A UID root completed by its final dot (``"1.2.3"`` → ``"1.2.3."``), ``""`` for none; else
    raise naming ``key``."""
    value = value.strip()
    if not value:
        return ""
    if not _UID_ROOT.match(value):
        raise SettingsError(f"{key}: {value!r} is not a DICOM UID root: digits in components separated by "
                            "dots, the first 0, 1 or 2, no leading zeros (e.g. \"1.2.826.0.1.3680043.10.543.\")")
    root = value if value.endswith(".") else value + "."
    if len(root) > UID_ROOT_MAX_LENGTH:
        raise SettingsError(f"{key}: {root!r} is {len(root)} characters; at most {UID_ROOT_MAX_LENGTH} leave "
                            "the generated UIDs (64 characters) enough digits of their own")
    return root


@dataclass(frozen=True)
class NodeSettings:
    """The DICOM listener: identity, address, storage."""

    ae_title: str = "CXRNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    data_dir: str = "var"
    allowed_calling_ae_titles: tuple[str, ...] = ()
    max_pdu_size: int = 1_048_576
    network_timeout_s: float = 60.0
    min_free_disk_mb: int = 1024
    log_level: str = "INFO"
    #: The node's identity in every SEG, SR and SC (General Equipment, the SR's Device Observer):
    #: empty station_name / device_serial_number are this installation's own, derived once from
    #: <data_dir>/installation.toml (node.results.device.device_for); empty institution names are
    #: left out; an empty uid_root keeps pydicom's root (node.results.uids.UID_PREFIX).
    institution_name: str = ""
    institution_department_name: str = ""
    station_name: str = ""
    device_serial_number: str = ""
    uid_root: str = ""
    #: This process's name in the queue's leases (``<instance_name>:<pid>:<role>``): empty = the
    #: host name. Several instances sharing one queue from one host (or from containers whose host
    #: names repeat) must each have their own; start-up recovery takes back at once only the
    #: leases of this instance's dead processes, and leaves other instances' to expire.
    instance_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "instance_name", check_instance_name("node.instance_name", self.instance_name))
        for name, length, vr in (("institution_name", 64, "LO"), ("institution_department_name", 64, "LO"),
                                 ("station_name", 16, "SH"), ("device_serial_number", 64, "LO")):
            object.__setattr__(self, name, check_text(f"node.{name}", getattr(self, name), length, vr))
        object.__setattr__(self, "uid_root", check_uid_root("node.uid_root", self.uid_root))
        check_ae_title("node.ae_title", self.ae_title)
        check_port("node.port", self.port, allow_zero=True)
        for title in self.allowed_calling_ae_titles:
            check_ae_title("node.allowed_calling_ae_titles", title)
        if self.max_pdu_size < 0:
            raise SettingsError("node.max_pdu_size: may not be negative")
        _positive("node.network_timeout_s", self.network_timeout_s)
        if self.min_free_disk_mb < 0:
            raise SettingsError("node.min_free_disk_mb: may not be negative")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"node.log_level: unknown level {self.log_level!r}")


#: The one database scheme ``[queue] url`` takes besides "" (SQLAlchemy's name for PostgreSQL via psycopg 3).
POSTGRESQL_SCHEME = "postgresql+psycopg"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for ``cxrnode config check`` and logs)."""
    return re.sub(r"^([^:/?#]+://[^:/@]*:).*@", r"\1***@", url)  # to the last @: rather too much than too little


@dataclass(frozen=True)
class QueueSettings:
    """Where the job queue lives (:mod:`node.queue.db`).

    Empty (the default): the SQLite file ``queue.sqlite3`` in ``node.data_dir``, embedded, for a
    node on one machine. ``postgresql+psycopg://user:password@host:port/database``: a PostgreSQL
    server shared by several processes or hosts (receivers, workers, senders); the schema is
    migrated at start-up and by ``cxrnode db upgrade``, and the stages wake each other across
    processes with ``LISTEN``/``NOTIFY`` (:mod:`node.wakeups`). The password is never printed
    (:func:`mask_url`); ``CXRNODE_QUEUE_URL`` keeps it out of the file.
    """

    url: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        url = self.url.strip()
        object.__setattr__(self, "url", url)
        if url:
            check_queue_url("queue.url", url)

    @property
    def masked_url(self) -> str:
        """The URL as it may be shown: without the password."""
        return mask_url(self.url)


def check_queue_url(key: str, url: str) -> str:
    """``url`` if it names a PostgreSQL database through psycopg 3, else raise naming ``key``
    (without quoting the URL: it may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    usage = f'use "" (SQLite in node.data_dir) or {POSTGRESQL_SCHEME}://user:password@host:port/database'
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise SettingsError(f"{key}: not a database URL; {usage}")
    if scheme != POSTGRESQL_SCHEME:
        raise SettingsError(f"{key}: scheme {scheme!r} is not supported; {usage}")
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise SettingsError(f"{key}: {mask_url(url)!r} cannot be parsed; {usage}") from None
    if not parsed.database:
        raise SettingsError(f"{key}: names no database; {usage}")
    return url


_INSTANCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_instance_name(key: str, value: str) -> str:
    """``value`` stripped if it can name an instance in a lease owner (letters, digits, ``.``,
    ``_``, ``-``; no ``:``; at most 63 characters), ``""`` for the host name; else raise naming ``key``."""
    value = value.strip()
    if value and not _INSTANCE_NAME.match(value):
        raise SettingsError(f"{key}: {value!r} may hold only letters, digits, '.', '_' and '-' "
                            "(at most 63, starting with a letter or digit)")
    return value


#: The schemes ``[archive] url`` takes besides a folder path.
ARCHIVE_S3_SCHEME = "s3"


@dataclass(frozen=True)
class ArchiveSettings:
    """Where received objects and results are kept (:mod:`node.archive`).

    ``url`` empty (the default): the ``archive`` folder in ``node.data_dir``. An absolute folder
    path (or ``file:///path``): a folder shared by every host of one node (NFS, a Kubernetes
    volume). ``s3://bucket/prefix``: an S3-compatible object store, reached at ``s3_endpoint_url``
    (empty: AWS's own) with the key pair below; ``CXRNODE_ARCHIVE_S3_SECRET_ACCESS_KEY`` keeps the
    secret out of the file, and it is never shown. Every host must name the same archive: the
    queue stores keys relative to it (``received/<study>/<sop>.dcm``), never host paths.
    """

    url: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = field(default="", repr=False)
    #: seconds for one S3 request (connect and read each) before it is retried, then failed
    s3_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        url = self.url.strip()
        object.__setattr__(self, "url", url)
        _positive("archive.s3_timeout_s", self.s3_timeout_s)
        scheme, sep, rest = url.partition("://")
        if not url:
            return
        if sep and scheme == ARCHIVE_S3_SCHEME:
            bucket = rest.partition("/")[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise SettingsError(f"archive.url: {bucket!r} is not an S3 bucket name (s3://bucket/prefix)")
            endpoint = self.s3_endpoint_url.strip()
            if endpoint and not re.match(r"^https?://[^/]+", endpoint):
                raise SettingsError(f"archive.s3_endpoint_url: {endpoint!r} is not an http(s) URL")
            return
        if sep and scheme != "file":
            raise SettingsError(f"archive.url: scheme {scheme!r} is not supported; use \"\" (the archive folder "
                                "in node.data_dir), an absolute folder path, file:///path or s3://bucket/prefix")
        path = rest if sep else url
        if not path.startswith("/"):
            raise SettingsError(f"archive.url: {path!r} is not an absolute folder path")

    @property
    def is_s3(self) -> bool:
        return self.url.startswith(f"{ARCHIVE_S3_SCHEME}://")

    def folder(self, data_dir: str | os.PathLike[str]) -> Path:
        """The archive folder (not for ``s3://``)."""
        if not self.url:
            return Path(data_dir) / "archive"
        return Path(self.url.removeprefix("file://"))

    def s3_location(self) -> tuple[str, str]:
        """(bucket, prefix) of an ``s3://`` url; the prefix without slashes at either end."""
        bucket, _, prefix = self.url.removeprefix(f"{ARCHIVE_S3_SCHEME}://").partition("/")
        return bucket, prefix.strip("/")


@dataclass(frozen=True)
class TlsSettings:
    """Optional DICOM TLS for the listener."""

    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    require_client_certificate: bool = True

    def __post_init__(self) -> None:
        if self.enabled and not (self.certificate and self.private_key):
            raise SettingsError("tls.certificate/tls.private_key: required when tls.enabled")
        if self.enabled and self.require_client_certificate and not self.ca_certificates:
            raise SettingsError("tls.ca_certificates: required when client certificates are required")


@dataclass(frozen=True)
class WorkerSettings:
    """Inference worker: model choice, device, leases and retries."""

    enabled: bool = True
    architecture: str = "unet"
    device: str = "auto"
    #: Jobs analysed at once by one process (one worker thread each, sharing the loaded models):
    #: while one job's results are encoded (Python, one core) the next one's networks run, so
    #: two keep two CPU cores busy (bench/RESULTS.md: +12 % radiographs/s on 2 cores).
    concurrency: int = 2
    poll_interval_s: float = 1.0
    lease_s: float = 600.0
    max_attempts: int = 3
    retry_delay_s: float = 30.0
    tb_threshold: float = -1.0
    #: The worker or sender loop failing on every turn this long (e.g. the queue database
    #: unreachable) stops the node with exit code 75 so that its supervisor restarts it.
    give_up_after_s: float = 300.0
    #: What runs the networks: "torch", or "onnx" (the same weights exported to ONNX once, cached in
    #: <data_dir>/cache/onnx, run by onnxruntime on the CPU; models/onnx_runtime.py). "onnx" runs on the
    #: CPU only: with device "auto" it uses the CPU even on a GPU host; device "cuda" is refused.
    runtime: str = "torch"

    def __post_init__(self) -> None:
        if self.architecture not in {"unet", "resunet"}:
            raise SettingsError(f"worker.architecture: {self.architecture!r} is not unet or resunet")
        if self.device not in {"auto", "cpu", "cuda"} and not self.device.startswith("cuda:"):
            raise SettingsError(f"worker.device: {self.device!r} is not auto, cpu or cuda[:N]")
        if self.runtime not in {"torch", "onnx"}:
            raise SettingsError(f"worker.runtime: {self.runtime!r} is not torch or onnx")
        if self.runtime == "onnx" and self.device not in {"auto", "cpu"}:
            raise SettingsError(f"worker.runtime: \"onnx\" runs on the CPU (onnxruntime's CPU provider), but "
                                f"worker.device is {self.device!r}; use device \"cpu\" or \"auto\" with "
                                "runtime \"onnx\", or runtime \"torch\" for the GPU")
        if not 1 <= self.concurrency <= 32:
            raise SettingsError(f"worker.concurrency: {self.concurrency} is not between 1 and 32")
        _positive("worker.poll_interval_s", self.poll_interval_s)
        _positive("worker.lease_s", self.lease_s)
        if self.max_attempts < 1:
            raise SettingsError("worker.max_attempts: must be at least 1")
        if self.retry_delay_s < 0:
            raise SettingsError("worker.retry_delay_s: may not be negative")
        if self.tb_threshold != -1.0 and not 0.0 <= self.tb_threshold <= 1.0:
            raise SettingsError("worker.tb_threshold: must be in 0..1, or -1 for the model's own")
        _positive("worker.give_up_after_s", self.give_up_after_s)


@dataclass(frozen=True)
class ModelsSettings:
    """The model registry (:mod:`models.catalog`) and the promotion gate (``cxrnode models ...``).

    The node serves the registry's champions (``cxrnode models promote``/``rollback`` change them
    while it runs: it switches between two jobs). ``[worker] architecture`` only chooses the
    segmenter put in service when the registry is created (seeded from the shipped weights).
    """

    #: The registry folder; "" = ``<node.data_dir>/models``. Relative paths are relative to the
    #: working directory, as ``node.data_dir``.
    registry: str = ""
    #: ``cxrnode models promote`` refuses a challenger whose point estimate (on ``--data``) is
    #: worse than the champion's by more than these (differences challenger - champion).
    max_dice_drop: float = 0.005
    max_auc_drop: float = 0.02
    max_sensitivity_drop: float = 0.02
    max_specificity_drop: float = 0.05
    #: Paired bootstrap resamples for the 95 % intervals of ``cxrnode models compare``.
    bootstrap_samples: int = 2000

    def __post_init__(self) -> None:
        for key in ("max_dice_drop", "max_auc_drop", "max_sensitivity_drop", "max_specificity_drop"):
            value = getattr(self, key)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise SettingsError(f"models.{key}: must be in 0..1, got {value}")
        if not 100 <= self.bootstrap_samples <= 100_000:
            raise SettingsError(f"models.bootstrap_samples: must be in 100..100000, got {self.bootstrap_samples}")

    def registry_path(self, data_dir: str | os.PathLike[str]) -> Path:
        """The registry folder for a node whose data folder is ``data_dir``."""
        return Path(self.registry) if self.registry.strip() else Path(data_dir) / "models"

    @property
    def margins(self) -> dict[str, float]:
        """The gate's margins by metric name (:data:`models.gate.METRICS`)."""
        return {"lung_dice": self.max_dice_drop, "tb_auc": self.max_auc_drop,
                "sensitivity": self.max_sensitivity_drop, "specificity": self.max_specificity_drop}


@dataclass(frozen=True)
class SendSettings:
    """C-STORE SCU of results: attempts and backoff."""

    max_attempts: int = 6
    backoff_s: tuple[float, ...] = (10.0, 30.0, 60.0, 300.0, 900.0)
    timeout_s: float = 30.0
    poll_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise SettingsError("send.max_attempts: must be at least 1")
        if not self.backoff_s:
            raise SettingsError("send.backoff_s: needs at least one delay")
        if any(d < 0 for d in self.backoff_s):
            raise SettingsError("send.backoff_s: delays may not be negative")
        _positive("send.timeout_s", self.timeout_s)
        _positive("send.poll_interval_s", self.poll_interval_s)

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return self.backoff_s[min(attempt, len(self.backoff_s)) - 1]


@dataclass(frozen=True)
class AcceptanceSettings:
    """Which received objects are analysed; the rest are archived and discarded with a reason."""

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG")
    allow_missing_body_part: bool = True
    view_positions: tuple[str, ...] = ("PA", "AP")
    allow_missing_view_position: bool = True
    min_rows: int = 256
    min_columns: int = 256
    allow_burned_in_annotation: bool = False
    allow_derived_secondary_capture: bool = False

    def __post_init__(self) -> None:
        if not self.modalities:
            raise SettingsError("acceptance.modalities: needs at least one modality")
        if self.min_rows < 1 or self.min_columns < 1:
            raise SettingsError("acceptance.min_rows/min_columns: must be at least 1")


@dataclass(frozen=True)
class HousekeepingSettings:
    """Scheduled jobs inside ``serve``."""

    reap_interval_s: float = 30.0

    def __post_init__(self) -> None:
        _positive("housekeeping.reap_interval_s", self.reap_interval_s)


@dataclass(frozen=True)
class HttpSettings:
    """The node's HTTP server: Prometheus ``/metrics``, ``/healthz``, ``/readyz`` (:mod:`node.http`).

    ``cxrnode serve`` binds ``port``, ``cxrnode worker`` binds ``worker_port``: each process serves
    its own figures, so both can run from one file on one host. 0 = any free port (tests).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8480
    worker_port: int = 8481

    def __post_init__(self) -> None:
        if not self.host.strip():
            raise SettingsError("http.host: may not be empty")
        check_port("http.port", self.port, allow_zero=True)
        check_port("http.worker_port", self.worker_port, allow_zero=True)
        if self.port and self.port == self.worker_port:
            raise SettingsError(f"http.worker_port: {self.worker_port} is http.port too; "
                                "cxrnode serve and cxrnode worker each need their own")


#: Shortest ``[web] token`` accepted: long enough that guessing it over HTTP is hopeless.
WEB_TOKEN_MIN_LENGTH = 16


@dataclass(frozen=True)
class WebSettings:
    """The admin pages at ``/`` of the HTTP server of the process that listens (``[http] host``
    and ``port``; :mod:`node.http.web`). Read-only unless ``token`` is set."""

    enabled: bool = True
    #: The secret an operator types into a failed job's page to retry it (or sends in the
    #: ``X-Cxrnode-Token`` header of the POST); empty: retrying from the pages is disabled.
    #: Never shown by ``cxrnode config check``; ``CXRNODE_WEB_TOKEN`` keeps it out of the file.
    token: str = field(default="", repr=False)
    #: Show Patient ID and Patient Name (read from the archived image) on a job's page.
    show_patient_data: bool = False
    #: How many jobs the overview lists (newest first).
    recent_jobs: int = 50

    def __post_init__(self) -> None:
        if self.token and (len(self.token) < WEB_TOKEN_MIN_LENGTH or self.token.strip() != self.token
                           or not self.token.isprintable()):
            raise SettingsError(f"web.token: use at least {WEB_TOKEN_MIN_LENGTH} printable characters without "
                                "surrounding spaces (e.g. the output of `openssl rand -hex 24`), or \"\" for none")
        if not 1 <= self.recent_jobs <= 1000:
            raise SettingsError(f"web.recent_jobs: must be in 1..1000, got {self.recent_jobs}")


@dataclass(frozen=True)
class RetentionSettings:
    """What the purge (``cxrnode archive purge``, and scheduled inside ``serve``) deletes, and when.

    Clocks start when a job ends (done or discarded). Nothing undelivered is ever deleted
    (queued, processing, encoded, sending, or a destination still without the results), nor a
    job an operator pinned, nor (``keep_failed``) a failed one. Days may be fractions; 0 keeps for ever.
    """

    #: Received images and the results made from them (patient data), days after the job ended.
    images_days: float = 30.0
    #: Job rows with their events, results rows and deliveries, days after the job ended; only
    #: once the job's files are gone (or were never kept).
    history_days: float = 365.0
    #: Association rows (``cxrnode audit``), days after the association started.
    audit_days: float = 365.0
    #: How often ``serve`` purges, seconds (the first run 10 minutes after start-up at most); 0 = never (cron the command).
    purge_interval_s: float = 3600.0
    #: Failed jobs are never deleted automatically (``cxrnode jobs retry`` needs their files);
    #: false: they follow ``images_days`` and ``history_days`` too, unless their results were never delivered.
    keep_failed: bool = True

    def __post_init__(self) -> None:
        for key in ("images_days", "history_days", "audit_days", "purge_interval_s"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise SettingsError(f"retention.{key}: must be 0 (for ever / never) or a positive number, "
                                    f"got {value}")


#: Names of the splits ``cxrnode dataset export`` assigns, in the order of ``[dataset] split_fractions``.
DATASET_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSettings:
    """``cxrnode dataset export``: a de-identified training set from the archive (:mod:`node.dataset`)."""

    #: The node's own masks (pseudo-labels) whose quality score (0..1, :func:`node.dataset.labels.pseudo_quality`)
    #: is below this are left out of the export; ``--min-quality`` overrides it. The default is
    #: :data:`models.plausibility.PLAUSIBLE`, the cut ``cxrnode evaluate`` counts implausible cases by.
    min_pseudo_quality: float = 0.5
    #: DICOMweb base URL of the PACS (e.g. ``http://pacs:8042/dicom-web``) where radiologist-corrected SEGs
    #: and verified reports are looked up; "" = only the node's own masks (``--pacs-url`` overrides it).
    dicomweb_url: str = ""
    #: Seconds one DICOMweb request may take.
    dicomweb_timeout_s: float = 30.0
    #: Shares of patients in the train, val and test splits (they add up to 1).
    split_fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
    #: Keep ``<data_dir>/exports/<export-id>.reid.csv`` (0600): case_id to the archived SOP Instance UID.
    keep_reid_map: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_pseudo_quality) and 0.0 <= self.min_pseudo_quality <= 1.0):
            raise SettingsError(f"dataset.min_pseudo_quality: must be in 0..1, got {self.min_pseudo_quality}")
        url = self.dicomweb_url.strip()
        if url and not re.match(r"^https?://[^\s/]+", url):
            raise SettingsError(f"dataset.dicomweb_url: {url!r} is not an http:// or https:// URL")
        object.__setattr__(self, "dicomweb_url", url.rstrip("/"))
        _positive("dataset.dicomweb_timeout_s", self.dicomweb_timeout_s)
        check_split_fractions("dataset.split_fractions", self.split_fractions)


def check_split_fractions(key: str, fractions: tuple[float, ...]) -> tuple[float, ...]:
    """``fractions`` if it is one share per :data:`DATASET_SPLITS`, each 0..1, adding up to 1; else raise."""
    if len(fractions) != len(DATASET_SPLITS):
        raise SettingsError(f"{key}: give {len(DATASET_SPLITS)} shares ({', '.join(DATASET_SPLITS)}), "
                            f"got {list(fractions)}")
    if any(not (math.isfinite(f) and 0.0 <= f <= 1.0) for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise SettingsError(f"{key}: shares must be in 0..1 and add up to 1, got {list(fractions)}")
    if fractions[0] <= 0:
        raise SettingsError(f"{key}: the train share must be greater than 0")
    return fractions


#: Result objects a destination can receive: the lung SEG, the TID 1500 SR, the RGB Secondary Capture.
OUTPUT_KINDS = ("seg", "sr", "sc")
DEFAULT_OUTPUTS = ("seg", "sr")


@dataclass(frozen=True)
class Destination:
    """A DICOM peer and the result objects it receives (``outputs``: any of :data:`OUTPUT_KINDS`)."""

    ae_title: str
    host: str
    port: int
    name: str = ""
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    #: True: this peer receives only the results of images it sent itself (its AE title was the
    #: calling AE title), e.g. each of several PACS gets back its own studies. Results never go
    #: to a peer that is not configured here.
    reply_to_caller: bool = False

    def __post_init__(self) -> None:
        outputs = tuple(self.outputs)
        unknown = [o for o in outputs if o not in OUTPUT_KINDS]
        if unknown or not outputs or len(set(outputs)) != len(outputs):
            raise SettingsError(f"destinations.outputs: give one or more of {list(OUTPUT_KINDS)}, each once "
                                f"(got {list(outputs)})")
        object.__setattr__(self, "outputs", outputs)
        check_ae_title("destinations.ae_title", self.ae_title)
        check_port("destinations.port", self.port)
        if not self.host:
            raise SettingsError("destinations.host: may not be empty")
        if not self.name:
            object.__setattr__(self, "name", self.ae_title)


@dataclass(frozen=True)
class Settings:
    """Everything the node needs, validated; handed down explicitly to each component."""

    node: NodeSettings = field(default_factory=NodeSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    send: SendSettings = field(default_factory=SendSettings)
    acceptance: AcceptanceSettings = field(default_factory=AcceptanceSettings)
    housekeeping: HousekeepingSettings = field(default_factory=HousekeepingSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    web: WebSettings = field(default_factory=WebSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    destinations: tuple[Destination, ...] = ()
    source: str = "<defaults>"

    def __post_init__(self) -> None:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise SettingsError("destinations.name: destination names must be unique")

    @property
    def data_path(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def models_registry_path(self) -> Path:
        """The model registry folder (``[models] registry``, default ``<data_dir>/models``)."""
        return self.models.registry_path(self.node.data_dir)

    @property
    def onnx_cache_path(self) -> Path:
        """Where ``worker.runtime = "onnx"`` keeps its exports: ``<data_dir>/cache/onnx``."""
        return Path(self.node.data_dir) / "cache" / "onnx"

    @property
    def output_kinds(self) -> tuple[str, ...]:
        """Every result kind some destination receives (the defaults when none is configured)."""
        if not self.destinations:
            return DEFAULT_OUTPUTS
        wanted = {kind for dest in self.destinations for kind in dest.outputs}
        return tuple(kind for kind in OUTPUT_KINDS if kind in wanted)

    def destinations_for(self, calling_ae_title: str) -> list[Destination]:
        """Where the results of an image sent by ``calling_ae_title`` go: every destination,
        except ``reply_to_caller`` ones that did not send it."""
        return [d for d in self.destinations
                if not d.reply_to_caller or d.ae_title == calling_ae_title.strip()]

    def destination(self, name: str) -> Destination:
        """The destination called ``name`` (or with that AE title)."""
        for dest in self.destinations:
            if name in (dest.name, dest.ae_title):
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise SettingsError(f"unknown destination {name!r} (known: {known})")


_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "queue": QueueSettings,
    "archive": ArchiveSettings,
    "tls": TlsSettings,
    "worker": WorkerSettings,
    "models": ModelsSettings,
    "send": SendSettings,
    "acceptance": AcceptanceSettings,
    "housekeeping": HousekeepingSettings,
    "retention": RetentionSettings,
    "http": HttpSettings,
    "web": WebSettings,
    "dataset": DatasetSettings,
}


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against a field annotation (str, int, float, bool, tuple[...])."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{key}: expected a list, got {value!r}")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_coerce(key, item_type, v) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise SettingsError(f"{key}: expected a string, got {value!r}")
        return value
    raise SettingsError(f"{key}: unsupported setting type {annotation!r}")  # pragma: no cover


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"{section}.{unknown[0]}: unknown setting")
    kwargs = {k: _coerce(f"{section}.{k}", hints[k], v) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise SettingsError(f"{section}: {exc}") from None


def _parse_env_value(key: str, annotation: Any, raw: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        return [_parse_env_value(key, item_type, s.strip()) for s in raw.split(",") if s.strip()]
    if annotation is bool:
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{key}: expected true or false, got {raw!r}")
    try:
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
    except ValueError:
        raise SettingsError(f"{key}: {raw!r} is not a number") from None
    return raw


def _env_overrides(env: typing.Mapping[str, str], raw: dict[str, Any]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in (CONFIG_ENV, FAULTS_ENV, FAULT_RAISE_ENV):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise SettingsError(f"{name}: unknown setting (expected CXRNODE_<SECTION>_<KEY>)")
        key = rest[len(section) + 1:]
        hints = typing.get_type_hints(_SECTIONS[section])
        if key not in hints:
            raise SettingsError(f"{name}: unknown setting {section}.{key}")
        raw.setdefault(section, {})[key] = _parse_env_value(name, hints[key], value)


def load_settings(path: str | os.PathLike[str] | None = None,
                  env: typing.Mapping[str, str] | None = None) -> Settings:
    """Load and validate settings from ``path`` (or ``$CXRNODE_CONFIG``) and the environment.

    Raises:
        SettingsError: the file is missing or malformed, or a value is invalid; the message
            names the offending key.
    """
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV)
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path:
        file = Path(path)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {file} is not valid TOML: {exc}") from None
        source = str(file)
    _env_overrides(env, raw)
    unknown = sorted(set(raw) - set(_SECTIONS) - {"destinations"})
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown section")
    sections = {name: _build(cls, name, raw.get(name, {})) for name, cls in _SECTIONS.items()}
    dest_items = raw.get("destinations", [])
    if not isinstance(dest_items, list):
        raise SettingsError("destinations: expected [[destinations]] tables")
    destinations = tuple(_build(Destination, "destinations", d) for d in dest_items)
    return Settings(**sections, destinations=destinations, source=source)


def describe(settings: Settings) -> dict[str, Any]:
    """A plain-dict view of the settings (for ``cxrnode config show``)."""
    out = dataclasses.asdict(settings)
    if out["web"]["token"]:
        out["web"]["token"] = "(set, not shown)"
    out["queue"]["url"] = settings.queue.masked_url
    if out["archive"]["s3_secret_access_key"]:
        out["archive"]["s3_secret_access_key"] = "(set, not shown)"
    return _tuples_to_lists(out)


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples_to_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(v) for v in value]
    return value


__all__ = [
    "AcceptanceSettings", "ArchiveSettings", "DatasetSettings", "Destination", "HousekeepingSettings", "HttpSettings", "ModelsSettings", "NodeSettings", "QueueSettings",
    "RetentionSettings",
    "SendSettings",
    "Settings", "SettingsError", "TlsSettings", "WebSettings", "WorkerSettings", "load_settings", "describe",
]
