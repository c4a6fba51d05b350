"""The PACS is down: results wait in the archive, are retried with backoff, fail visibly after the
configured attempts, and arrive once the PACS is back (by itself, or by `cxrnode jobs retry`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dicom_factory import make_dx
from tests.servers import NodeProcess, Orthanc, c_store, free_port, wait_until

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[1] / "data"


def send(node: NodeProcess, ds) -> int:  # type: ignore[no-untyped-def]
    statuses = c_store(node.port, [ds], called=node.ae_title)
    assert statuses is not None, "association rejected"
    return statuses[0]


def job(node: NodeProcess) -> dict:
    out = node.cli("jobs", "list", "--json")
    assert out.returncode == 0, out.stderr
    (only,) = json.loads(out.stdout)
    return only


def test_results_wait_for_the_pacs_then_arrive(tmp_path: Path) -> None:
    node_port, http_port, dicom_port = free_port(), free_port(), free_port()
    node = NodeProcess(tmp_path / "node", node_port, destinations=[
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
        extra={"send": {"max_attempts": 10, "backoff_s": [1.0, 3.0]}})
    orthanc = Orthanc(tmp_path / "orthanc", http_port, dicom_port)
    node.start()
    try:
        echo = node.cli("echo", "pacs")
        assert echo.returncode != 0 and "no association" in echo.stderr

        ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024))
        assert send(node, ds) == 0x0000
        # First attempt fails (PACS down), the job waits in `encoded` with the error recorded.
        waiting = wait_until(lambda: (j := job(node))["status"] == "encoded" and j["last_error"] and j,
                             120, what="a failed first send")
        assert waiting["attempts"] == 1 and "pacs" in waiting["last_error"]

        orthanc.start()
        assert node.cli("echo", "pacs").returncode == 0
        wait_until(lambda: job(node)["status"] == "done", 60, what="delivery after the PACS is back")
        assert orthanc.series_of_study(ds.StudyInstanceUID, "SEG")
        assert orthanc.series_of_study(ds.StudyInstanceUID, "SR")
        shown = json.loads(node.cli("jobs", "show", str(job(node)["id"]), "--json").stdout)
        (delivery,) = shown["deliveries"]
        assert delivery["attempts"] >= 2 and delivery["delivered_at"]  # failed first, then arrived
    finally:
        node.stop()
        orthanc.stop()


def test_send_fails_after_its_attempts_and_jobs_retry_delivers(tmp_path: Path) -> None:
    node_port, http_port, dicom_port = free_port(), free_port(), free_port()
    node = NodeProcess(tmp_path / "node", node_port, destinations=[
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
        extra={"send": {"max_attempts": 2, "backoff_s": [0.5]}})
    orthanc = Orthanc(tmp_path / "orthanc", http_port, dicom_port)
    node.start()
    try:
        ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024))
        assert send(node, ds) == 0x0000
        wait_until(lambda: job(node)["status"] == "failed", 120, what="the job to fail")
        failed = job(node)
        assert failed["fail_stage"] == "send" and failed["attempts"] == 1  # analysed once only
        status = json.loads(node.cli("status", "--json").stdout)
        assert status["counts"]["failed"] == 1 and "pacs" in status["last_error"]
        listed = node.cli("jobs", "list", "--state", "failed")
        assert listed.returncode == 0 and "failed" in listed.stdout

        orthanc.start()
        retried = node.cli("jobs", "retry", "--all-failed", "--json")
        assert retried.returncode == 0, retried.stderr
        assert json.loads(retried.stdout) == {str(failed["id"]): "encoded"}
        wait_until(lambda: job(node)["status"] == "done", 60, what="delivery after retry")
        assert orthanc.series_of_study(ds.StudyInstanceUID, "SR")
        again = node.cli("jobs", "retry", str(failed["id"]))
        assert again.returncode == 2 and "cannot go from done" in again.stderr
    finally:
        node.stop()
        orthanc.stop()
