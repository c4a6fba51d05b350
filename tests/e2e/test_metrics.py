"""Metrics and health of a served node, scraped as Prometheus would and parsed by prometheus_client's
own parser: every count must equal what happened, exactly once, also when ``cxrnode serve`` (the
listener) and ``cxrnode worker`` run as two processes on one data folder.

Real pieces only: ``cxrnode serve`` / ``cxrnode worker`` subprocesses with the real networks on the
CPU, Orthanc as the destination, dcmtk's ``storescu`` and pynetdicom as senders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset

from models import registry
from tests.dicom_factory import make_ct_slice, make_dx, nema_chest_cr_path
from tests.servers import (
    REPO,
    NodeProcess,
    Orthanc,
    c_store,
    dcmtk,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.e2e

DATA = Path(__file__).resolve().parents[1] / "data"
TIMEOUT_S = 300
WORKER_STAGES = ("queue_wait", "inference", "encoding", "sending", "end_to_end")
STATES = ("queued", "processing", "encoded", "sending", "done", "discarded", "failed")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """(every sample by name and labels, every family's type) of ``/metrics``, parsed by
    ``prometheus_client.parser``."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    found: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"{key} exported twice"
            found[key] = sample.value
    return found, types


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def stage_count(found: Samples, stage: str) -> float:
    count = value(found, "cxrnode_stage_duration_seconds_count", stage=stage) or 0.0
    # a real histogram: its +Inf bucket holds every observation
    assert (value(found, "cxrnode_stage_duration_seconds_bucket", stage=stage, le="+Inf") or 0.0) == count
    return count


def radiograph(index: int) -> Dataset:
    return make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024),
                   sop_instance_uid=f"1.2.826.0.1.3680043.8.498.4711.{index}")


def without_study_uid() -> Dataset:
    """A DX with no Study Instance UID: the listener answers 0xA900 and keeps nothing."""
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256))
    del ds.StudyInstanceUID
    return ds


def send(port: int, datasets: list[Dataset], calling: str = "MODALITY") -> list[int] | None:
    """C-STORE ``datasets`` on one association; their statuses, or None if it was rejected."""
    return c_store(port, datasets, calling=calling)


def expected_model_labels() -> dict[str, str]:
    seg = registry.identity_of(registry.read_meta(registry.SEGMENTER_FILES["unet"]))
    tb_meta = registry.read_meta(registry.TB_FILE)
    tb = registry.identity_of(tb_meta)
    return {"architecture": "unet", "device": "cpu", "runtime": "torch",
            "segmenter": seg.name, "segmenter_version": seg.version, "segmenter_sha256": seg.sha256,
            "tb_model": tb.name, "tb_model_version": tb.version, "tb_model_sha256": tb.sha256,
            "tb_threshold": f"{float(tb_meta['threshold']):g}"}  # the shipped scorer's own: no tb_threshold set


def model_info(found: Samples) -> list[dict[str, str]]:
    return [dict(labels) for (name, labels) in found if name == "cxrnode_model_info"]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port()).start()
    yield pacs
    pacs.stop()


def destination(orthanc: Orthanc) -> dict[str, object]:
    return {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}


@pytest.fixture(scope="module")
def served(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory):
    """``cxrnode serve`` (listener, worker and sender in one process) with its HTTP server."""
    http_port = free_port()
    node = NodeProcess(tmp_path_factory.mktemp("node"), free_port(), destinations=[destination(orthanc)],
                       extra={"http": {"port": http_port},
                              "node": {"allowed_calling_ae_titles": ["DCMTKSCU", "MODALITY"]}})
    node.start()
    try:
        yield node, http_port
    finally:
        node.stop()


def test_counts_equal_what_happened(served) -> None:  # type: ignore[no-untyped-def]
    node, http_port = served
    assert b"http: /metrics, /healthz, /readyz on http://127.0.0.1:%d (serve)" % http_port in node.log_bytes()

    sent = subprocess.run([dcmtk("storescu"), "-xw", "-aet", "DCMTKSCU", "-aec", node.ae_title,
                           "127.0.0.1", str(node.port), str(nema_chest_cr_path())],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    statuses = send(node.port, [radiograph(1), radiograph(2), make_ct_slice(), without_study_uid()])
    assert statuses == [0x0000, 0x0000, 0x0000, 0xA900]
    assert send(node.port, [radiograph(3)], calling="INTRUDER") is None  # not on the allow-list
    n = 3  # radiographs analysed and sent: the NEMA CR and two DX

    def finished() -> Samples | None:
        found, _ = scrape(http_port)
        done = value(found, "cxrnode_jobs", state="done") == n
        return found if done and stage_count(found, "end_to_end") == n else None
    found = wait_until(finished, TIMEOUT_S, interval_s=1.0, what="every radiograph done")
    found, types = scrape(http_port)  # once more: nothing moves any more

    assert value(found, "cxrnode_cstore_total", status="0x0000") == n + 1  # + the CT, acknowledged
    assert value(found, "cxrnode_cstore_total", status="0xA900") == 1
    assert sum(v for (name, _), v in found.items() if name == "cxrnode_cstore_total") == n + 2
    assert stage_count(found, "receive") == n + 2
    for stage in WORKER_STAGES:
        assert stage_count(found, stage) == n, stage
    assert types["cxrnode_stage_duration_seconds"] == "histogram"
    assert value(found, "cxrnode_associations_total", result="accepted") == 2
    assert value(found, "cxrnode_associations_total", result="rejected") == 1
    assert {state: value(found, "cxrnode_jobs", state=state) for state in STATES} == \
        {**dict.fromkeys(STATES, 0.0), "done": n, "discarded": 1}
    assert value(found, "cxrnode_send_attempts_total", destination="pacs") == n
    assert value(found, "cxrnode_send_failures_total", destination="pacs") == 0
    assert model_info(found) == [expected_model_labels()]
    assert value(found, "cxrnode_build_info", role="serve", version="0.1.0") == 1
    assert value(found, "cxrnode_queue_up") == 1
    assert value(found, "cxrnode_oldest_waiting_job_age_seconds") == 0
    assert value(found, "cxrnode_data_disk_free_bytes") == pytest.approx(
        shutil.disk_usage(node.data_dir).free, rel=0.05)
    assert value(found, "cxrnode_data_disk_min_free_bytes") == 2**20  # min_free_disk_mb = 1
    assert value(found, "process_start_time_seconds") is not None  # prometheus_client's own


def test_health_and_readiness(served) -> None:  # type: ignore[no-untyped-def]
    node, http_port = served
    status, body = get(http_port, "/healthz")
    assert status == 200 and json.loads(body)["threads"] == {"worker": "alive", "sender": "alive"}
    status, body = get(http_port, "/readyz")
    answer = json.loads(body)
    assert status == 200 and answer["failed"] == [], body
    assert answer["checks"]["models"] == {"ok": True, "detail": "unet on cpu"}
    assert set(answer["checks"]) == {"started", "models", "database", "archive", "disk"}

    # The archive not writable: its tmp folder, where every archived object starts, replaced by a
    # file (chmod would not stop root).
    tmp = node.data_dir / "archive" / "tmp"
    shutil.rmtree(tmp)
    tmp.write_text("not a folder")
    try:
        status, body = get(http_port, "/readyz")
        answer = json.loads(body)
        assert status == 503 and answer["failed"] == ["archive"], body
        assert answer["status"] == "not ready" and not answer["checks"]["archive"]["ok"]
        assert get(http_port, "/healthz")[0] == 200  # alive all the same
    finally:
        tmp.unlink()
        tmp.mkdir(mode=0o700)
    assert get(http_port, "/readyz")[0] == 200


def start_worker(node: NodeProcess) -> subprocess.Popen:
    """``cxrnode worker`` on ``node``'s configuration file (so on its data folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    log = open(node.workdir / "worker.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "node", "worker", "--config", str(node.config_file)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def test_listener_and_worker_processes_count_each_event_once(orthanc: Orthanc, tmp_path: Path) -> None:
    """``cxrnode serve`` with the worker disabled plus a ``cxrnode worker`` process, one data folder
    and one configuration file: each serves its own /metrics, and the two together count every
    C-STORE, every stage and every job exactly once."""
    listener_port, worker_port = free_port(), free_port()
    node = NodeProcess(tmp_path / "node", free_port(), destinations=[destination(orthanc)],
                       extra={"worker": {"enabled": False},
                              "http": {"port": listener_port, "worker_port": worker_port}})
    node.start()
    worker = start_worker(node)
    try:
        def worker_ready() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"cxrnode worker exited with {worker.returncode}: "
                                     f"{(node.workdir / 'worker.log').read_text()[-2000:]}")
            try:
                return get(worker_port, "/readyz")[0] == 200
            except OSError:
                return False
        wait_until(worker_ready, 180, interval_s=0.5, what="cxrnode worker ready")
        assert get(listener_port, "/readyz")[0] == 200

        n = 2
        statuses = send(node.port, [radiograph(11), radiograph(12), make_ct_slice(), without_study_uid()])
        assert statuses == [0x0000, 0x0000, 0x0000, 0xA900]

        def finished() -> bool:
            at_listener, _ = scrape(listener_port)
            at_worker, _ = scrape(worker_port)
            return (value(at_listener, "cxrnode_jobs", state="done") == n
                    and stage_count(at_worker, "end_to_end") == n)
        wait_until(finished, TIMEOUT_S, interval_s=1.0, what="both radiographs done")
        at_listener, _ = scrape(listener_port)
        at_worker, _ = scrape(worker_port)
    finally:
        worker.terminate()
        worker_exit = worker.wait(60)
        node.stop()
    assert worker_exit == 0

    # The listener: what it received, and the queue (which only it exports).
    assert value(at_listener, "cxrnode_build_info", role="listener", version="0.1.0") == 1
    assert value(at_listener, "cxrnode_cstore_total", status="0x0000") == n + 1
    assert value(at_listener, "cxrnode_cstore_total", status="0xA900") == 1
    assert stage_count(at_listener, "receive") == n + 2
    assert {state: value(at_listener, "cxrnode_jobs", state=state) for state in STATES} == \
        {**dict.fromkeys(STATES, 0.0), "done": n, "discarded": 1}
    assert model_info(at_listener) == []  # it loaded no models
    # The worker: what it analysed and sent, its models; no queue gauges, no C-STOREs.
    assert value(at_worker, "cxrnode_build_info", role="worker", version="0.1.0") == 1
    assert model_info(at_worker) == [expected_model_labels()]
    assert not [key for key in at_worker if key[0] in {"cxrnode_jobs", "cxrnode_queue_up", "cxrnode_cstore_total"}]
    assert value(at_worker, "cxrnode_send_attempts_total", destination="pacs") == n
    assert value(at_worker, "cxrnode_send_failures_total", destination="pacs") == 0
    # Summed over both processes, as `sum(...)` in Prometheus does: each event exactly once.
    expected = {"receive": n + 2, **dict.fromkeys(WORKER_STAGES, n)}
    for stage, count in expected.items():
        assert stage_count(at_listener, stage) + stage_count(at_worker, stage) == count, stage
        assert 0 in (stage_count(at_listener, stage), stage_count(at_worker, stage)), stage
