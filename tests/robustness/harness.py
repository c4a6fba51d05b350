"""An in-process node for the robustness tests: the real listener, queue, archive and worker.

The listener is :func:`node.scp.server.start` on a free loopback port; the worker is
:class:`node.worker.runner.InferenceWorker` around a :class:`Pipeline` that shares one
:class:`LungAnalyzer` (loaded once per test session) and is driven by :meth:`LocalNode.process`,
so a test decides when jobs run. Senders are real pynetdicom SCUs.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from node.archive import open_archive
from node.archive.folder import FolderArchive
from node.dicom import ANALYSED_SOP_CLASSES as ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES, VERIFICATION
from node.queue import repository
from node.queue.db import Database
from node.queue.tables import Job
from node.scp import server as scp_server
from node.settings import Settings, load_settings
from node.worker.pipeline import Pipeline
from node.worker.runner import InferenceWorker
from tests.servers import free_port

if TYPE_CHECKING:
    from models.inference import LungAnalyzer

CALLING_AE = "ROBUSTSCU"


def store(assoc: Association, ds: Dataset | Path) -> int:
    """C-STORE on an open association; returns the status, -1 when no answer came.

    A Path is sent as raw bytes (pynetdicom's chunked send), a Dataset is encoded.
    """
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = isinstance(ds, Path)
    try:
        status = assoc.send_c_store(ds)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    return int(status.Status) if "Status" in status else -1


def node_settings(data_dir: Path, port: int, **env: str) -> Settings:
    """Defaults plus a loopback port, a test data folder and CPU inference."""
    return load_settings(None, env={
        "CXRNODE_NODE_HOST": "127.0.0.1", "CXRNODE_NODE_PORT": str(port),
        "CXRNODE_NODE_DATA_DIR": str(data_dir), "CXRNODE_NODE_MIN_FREE_DISK_MB": "1",
        "CXRNODE_NODE_NETWORK_TIMEOUT_S": "10", "CXRNODE_WORKER_DEVICE": "cpu",
        "CXRNODE_WORKER_RETRY_DELAY_S": "0", **env})


@dataclass
class LocalNode:
    """Listener + worker in this process, against a fresh data folder."""

    settings: Settings
    db: Database
    archive: FolderArchive
    worker: InferenceWorker | None
    ae: AE
    port: int
    _assocs: list[Association] = field(default_factory=list)

    @classmethod
    def start(cls, data_dir: Path, analyzer: LungAnalyzer | None, **env: str) -> LocalNode:
        port = free_port()
        settings = node_settings(data_dir, port, **env)
        db, archive = Database(settings.data_path), open_archive(settings)
        assert isinstance(archive, FolderArchive)
        ae, _server = scp_server.start(settings, db, archive)
        worker = None
        if analyzer is not None:
            worker = InferenceWorker(settings, db, archive, Pipeline(settings, analyzer),
                                     threading.Event())
        return cls(settings, db, archive, worker, ae, port)

    def stop(self) -> None:
        for assoc in self._assocs:
            if assoc.is_established:
                assoc.abort()
        self.ae.shutdown()
        self.db.dispose()

    # --- sending ---
    def associate(self, transfer_syntaxes: list[str] | None = None) -> Association:
        """An association offering CR + DX in ``transfer_syntaxes`` (default: native) + echo."""
        ae = AE(ae_title=CALLING_AE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        syntaxes = transfer_syntaxes or [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_requested_context(sop_class, syntaxes)
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.settings.node.ae_title)
        assert assoc.is_established, "the node refused the association"
        self._assocs.append(assoc)
        return assoc

    def send(self, ds: Dataset | Path) -> int:
        """C-STORE one object on a new association; returns the DIMSE status.

        A :class:`Path` is sent as its bytes are, never decoded (pynetdicom's chunked send):
        the request's SOP Class / Instance UID come from the file meta, the dataset bytes
        follow unchanged. A :class:`Dataset` is encoded by pynetdicom.
        """
        if isinstance(ds, Dataset):
            syntax = str(ds.file_meta.TransferSyntaxUID)
        else:
            syntax = str(read_file_meta_info(ds).TransferSyntaxUID)
        assoc = self.associate([syntax] if syntax in ACCEPTED_TRANSFER_SYNTAXES else None)
        try:
            return store(assoc, ds)
        finally:
            assoc.release()

    def echo(self) -> bool:
        """True when the node answers C-ECHO with Success on a new association."""
        assoc = self.associate()
        try:
            return int(assoc.send_c_echo().Status) == 0
        finally:
            assoc.release()

    # --- the worker and the queue ---
    def process(self) -> int:
        """Run the worker until no job is due; returns how many it took."""
        assert self.worker is not None, "started without an analyzer"
        done = 0
        while self.worker.run_once():
            done += 1
        return done

    def jobs(self) -> list[Job]:
        return repository.list_jobs(self.db)

    def job(self, sop_instance_uid: str) -> Job:
        """The one job of ``sop_instance_uid``, with its instance and events loaded."""
        (job,) = [j for j in self.jobs() if j.instance.sop_instance_uid == sop_instance_uid]
        return repository.get_job(self.db, job.id)

    def received_files(self) -> list[Path]:
        return sorted(p for p in (self.archive.root / "received").rglob("*") if p.is_file()) \
            if (self.archive.root / "received").exists() else []

    def leftovers(self) -> list[Path]:
        """Partial writes left in the archive's tmp folder (must always be empty)."""
        return list(self.archive.tmp.iterdir())


class PeakRss:
    """Highest resident set size of this process while the block runs (sampled every 10 ms)."""

    def __init__(self) -> None:
        self.baseline = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        """Bytes above the RSS at entry."""
        return self.peak - self.baseline

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
