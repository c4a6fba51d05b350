"""Nothing acknowledged is lost, and nothing is delivered twice: real SIGKILLs of a real node.

Each test runs ``cxrnode serve`` as a subprocess against a real Orthanc, holds it at a named
fault point (``CXRNODE_FAULT_PAUSE``, see node/faults.py), kills it with SIGKILL or signals it,
restarts it on the same data folder and checks what the PACS ends up holding.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dicom import DX_FOR_PRESENTATION
from tests.dicom_factory import make_dx, new_instance
from tests.servers import NodeProcess, Orthanc, free_port, wait_until

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[1] / "data"
PAUSE_S = "60"


@pytest.fixture(scope="module")
def base_image() -> Dataset:
    return make_dx(DATA / "MCUCXR_0017_0.png", size=(768, 768))


def variant(base: Dataset, n: int) -> Dataset:
    return new_instance(base, f"CRASH-{n:03d}")


@pytest.fixture
def pacs(tmp_path: Path):
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture
def node(tmp_path: Path, pacs: Orthanc):
    proc = NodeProcess(tmp_path / "node", free_port(), destinations=[
        {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
        extra={"send": {"backoff_s": [0.5], "max_attempts": 20}})
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.kill()


def store(node: NodeProcess, datasets: list[Dataset], statuses: list[int] | None = None) -> list[int]:
    """C-STORE ``datasets`` on one association; the status of each (-1: no answer)."""
    statuses = [] if statuses is None else statuses
    ae = AE(ae_title="CRASHSCU")
    ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    for ds in datasets:
        answer = assoc.send_c_store(ds) if assoc.is_established else None
        statuses.append(int(answer.Status) if answer and "Status" in answer else -1)
    if assoc.is_established:
        assoc.release()
    return statuses


def echo_ok(node: NodeProcess) -> bool:
    ae = AE(ae_title="CRASHSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    ok = assoc.is_established and int(assoc.send_c_echo().Status) == 0
    if assoc.is_established:
        assoc.release()
    return ok


def jobs(node: NodeProcess) -> list[dict]:
    out = node.cli("jobs", "list", "--json", "--limit", "1000")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def instances_in_pacs(orthanc: Orthanc, study_uid: str, modality: str) -> list[str]:
    found = orthanc.post("/tools/find", {"Level": "Instance", "Expand": True, "Query": {
        "StudyInstanceUID": study_uid, "Modality": modality}})
    return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in found)


def wait_all_done(node: NodeProcess, n: int, timeout_s: float = 180) -> list[dict]:
    return wait_until(lambda: (js := jobs(node)) and len(js) == n
                      and all(j["status"] == "done" for j in js) and js, timeout_s,
                      what=f"{n} job(s) done")


def assert_delivered_once(orthanc: Orthanc, datasets: list[Dataset]) -> None:
    for ds in datasets:
        assert len(instances_in_pacs(orthanc, ds.StudyInstanceUID, "SEG")) == 1
        assert len(instances_in_pacs(orthanc, ds.StudyInstanceUID, "SR")) == 1


def paused_at(node: NodeProcess, point: str, count: int = 1) -> bool:
    text = node.log_bytes().rpartition(b"----- start -----")[2]
    return text.count(f"at '{point}'".encode()) >= count


def test_kill_mid_inference_and_while_queued_loses_nothing(node, pacs, base_image) -> None:
    images = [variant(base_image, n) for n in range(2)]
    node.start(env={"CXRNODE_FAULT_PAUSE": f"infer={PAUSE_S}"})
    assert store(node, images) == [0, 0]
    wait_until(lambda: paused_at(node, "infer"), 60, what="the worker mid-inference")
    assert sorted(j["status"] for j in jobs(node)) == ["processing", "queued"]
    node.kill()

    node.start()  # no fault: a normal restart on the same data folder
    done = wait_all_done(node, 2)
    assert_delivered_once(pacs, images)
    first = json.loads(node.cli("jobs", "show", str(min(j["id"] for j in done)), "--json").stdout)
    assert ("recover", "retry") in [(s["step"], s["outcome"]) for s in first["steps"]]


def test_kill_mid_send_resends_the_same_objects_without_duplicates(node, pacs, base_image) -> None:
    (image,) = [variant(base_image, 10)]
    node.start(env={"CXRNODE_FAULT_PAUSE": f"send={PAUSE_S}"})
    assert store(node, [image]) == [0]
    wait_until(lambda: paused_at(node, "send"), 120, what="the sender between SEG and SR")
    seg_before = instances_in_pacs(pacs, image.StudyInstanceUID, "SEG")
    assert len(seg_before) == 1 and not instances_in_pacs(pacs, image.StudyInstanceUID, "SR")
    node.kill()

    node.start()
    wait_all_done(node, 1)
    assert instances_in_pacs(pacs, image.StudyInstanceUID, "SEG") == seg_before  # same object
    assert_delivered_once(pacs, [image])


def test_kill_mid_association_every_acknowledged_image_is_processed(node, pacs, base_image) -> None:
    images = [variant(base_image, 20 + n) for n in range(40)]
    node.start(env={"CXRNODE_FAULT_PAUSE": f"infer={PAUSE_S}"})
    statuses: list[int] = []
    sender = threading.Thread(target=store, args=(node, images, statuses), daemon=True)
    sender.start()
    wait_until(lambda: len(statuses) >= 3, 60, interval_s=0.01, what="a few acknowledged stores")
    node.kill()
    sender.join(30)
    acknowledged = [ds for ds, status in zip(images, statuses, strict=False) if status == 0]
    assert 3 <= len(acknowledged) < len(images), statuses

    node.start()
    done = wait_all_done(node, len(jobs(node)), timeout_s=300)
    assert {ds.SOPInstanceUID for ds in acknowledged} <= {j["sop_instance_uid"] for j in done}
    assert_delivered_once(pacs, acknowledged)


def test_first_signal_drains_the_job_in_flight(node, pacs, base_image) -> None:
    image = variant(base_image, 40)
    node.start(env={"CXRNODE_FAULT_PAUSE": "infer=3"})
    assert store(node, [image]) == [0]
    wait_until(lambda: paused_at(node, "infer"), 60, what="the worker mid-inference")
    started = time.monotonic()
    assert node.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started >= 1.5  # it waited for the job, it did not drop it
    (job,) = jobs(node)
    assert job["status"] in {"encoded", "done"}  # analysed before exiting
    node.start()
    wait_all_done(node, 1)
    assert_delivered_once(pacs, [image])


def test_second_signal_stops_at_once_and_restart_picks_up(node, pacs, base_image) -> None:
    image = variant(base_image, 50)
    node.start(env={"CXRNODE_FAULT_PAUSE": f"infer={PAUSE_S}"})
    assert store(node, [image]) == [0]
    wait_until(lambda: paused_at(node, "infer"), 60, what="the worker mid-inference")
    assert node.proc is not None
    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert node.stop(signal.SIGINT, timeout_s=10) == 130
    assert time.monotonic() - started < 10
    assert jobs(node)[0]["status"] == "processing"  # interrupted, still leased

    node.start()
    wait_all_done(node, 1)
    assert_delivered_once(pacs, [image])
    assert echo_ok(node)


def test_nearly_full_disk_refuses_with_out_of_resources(tmp_path: Path, base_image) -> None:
    node = NodeProcess(tmp_path / "full", free_port(), destinations=[],
                       extra={"node": {"min_free_disk_mb": 1_000_000_000}})
    node.start()
    try:
        assert store(node, [base_image]) == [0xA700]
        assert jobs(node) == []
        received = node.data_dir / "archive" / "received"
        assert not received.exists() or not any(received.rglob("*.dcm"))
        assert echo_ok(node)
    finally:
        node.stop()
