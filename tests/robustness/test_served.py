"""Bad input against a real ``cxrnode serve`` process: it survives, and ``cxrnode jobs show``
tells what happened to each object. One node for the module (the networks load once).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from node.dicom import ANALYSED_SOP_CLASSES as ACCEPTED_SOP_CLASSES, VERIFICATION, Status
from tests.dicom_factory import make_cr, make_dx, montgomery_case
from tests.robustness.wire import Cut, cut_store, garbage_connection
from tests.servers import NodeProcess, dcmtk, free_port, wait_until

IMAGE, _ = montgomery_case()
SIZE = (512, 512)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path_factory.mktemp("served"), free_port(), destinations=[])
    try:
        yield node.start()
    finally:
        if node.proc is not None:
            assert node.stop() == 0, node.log_bytes()[-2000:].decode(errors="replace")


def associate(node: NodeProcess) -> Association:
    ae = AE(ae_title="ROBUSTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    return assoc


def send(node: NodeProcess, ds: Dataset) -> int:
    assoc = associate(node)
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def echo_with_dcmtk(node: NodeProcess) -> None:
    done = subprocess.run([dcmtk("echoscu"), "-aet", "DCMTKSCU", "-aec", node.ae_title,
                           "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def cli_json(node: NodeProcess, *args: str) -> Any:
    done = node.cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def settled_jobs(node: NodeProcess, uids: list[str]) -> dict[str, dict[str, Any]]:
    """``cxrnode jobs list`` rows of these objects, once each is done, discarded or failed."""
    def settled() -> dict[str, dict[str, Any]] | None:
        jobs = {j["sop_instance_uid"]: j for j in cli_json(node, "jobs", "list")}
        ready = {u: jobs[u] for u in uids
                 if u in jobs and jobs[u]["status"] in ("done", "discarded", "failed")}
        return ready if len(ready) == len(uids) else None

    return wait_until(settled, 120, 0.5, what="jobs settled")


def shown(node: NodeProcess, job_id: int) -> dict[str, Any]:
    return cli_json(node, "jobs", "show", str(job_id))


def test_truncated_streams_and_garbage_leave_the_node_running(served: NodeProcess) -> None:
    before = cli_json(served, "jobs", "list")
    for cut in Cut:
        cut_store(associate(served), make_dx(IMAGE, size=SIZE), cut)
    garbage_connection(served.port, b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16)
    echo_with_dcmtk(served)
    assert served.proc is not None and served.proc.poll() is None
    assert cli_json(served, "jobs", "list") == before  # nothing stored, no job


def test_each_bad_object_has_a_defined_outcome_in_jobs_show(served: NodeProcess) -> None:
    short = make_dx(IMAGE, size=SIZE)
    short.PixelData = bytes(short.PixelData)[:1000]
    lateral = make_dx(IMAGE, size=SIZE, view_position="LL")
    knee = make_dx(IMAGE, size=SIZE, body_part="KNEE")
    no_spacing = make_cr(IMAGE, size=SIZE, pixel_spacing=None)
    monochrome1 = make_dx(IMAGE, size=SIZE, photometric="MONOCHROME1", bits_stored=16)
    cases = [
        (short, "discarded", "unreadable pixel data"),
        (lateral, "discarded", "ViewPosition LL is not one of PA, AP"),
        (knee, "discarded", "BodyPartExamined KNEE is not one of"),
        (no_spacing, "done", None),
        (monochrome1, "done", None),
    ]
    for ds, _, _ in cases:
        assert send(served, ds) == Status.SUCCESS
    jobs = settled_jobs(served, [str(ds.SOPInstanceUID) for ds, _, _ in cases])
    for ds, status, reason in cases:
        job = jobs[str(ds.SOPInstanceUID)]
        assert job["status"] == status, job
        assert reason is None or reason in job["discard_reason"]
    # the operator's view of one of each
    lateral_job = shown(served, jobs[str(lateral.SOPInstanceUID)]["id"])
    assert ("select", "discarded", lateral_job["discard_reason"]) in [
        (s["step"], s["outcome"], s["message"]) for s in lateral_job["steps"]]
    assert lateral_job["results"] == []
    plain_job = shown(served, jobs[str(no_spacing.SOPInstanceUID)]["id"])
    assert ("encode", "ok") in [(s["step"], s["outcome"]) for s in plain_job["steps"]]
    assert [r["kind"] for r in plain_job["results"]] == ["seg", "sr"]
    echo_with_dcmtk(served)


def test_duplicate_with_different_content_is_versioned(served: NodeProcess) -> None:
    first = make_dx(IMAGE, size=SIZE)
    second = make_dx(IMAGE, size=SIZE, photometric="MONOCHROME1", sop_instance_uid=first.SOPInstanceUID,
                     study_instance_uid=first.StudyInstanceUID,
                     series_instance_uid=first.SeriesInstanceUID)
    assert send(served, first) == Status.SUCCESS
    job = settled_jobs(served, [str(first.SOPInstanceUID)])[str(first.SOPInstanceUID)]
    assert job["status"] == "done"
    assert send(served, second) == Status.SUCCESS
    assert send(served, first) == Status.SUCCESS
    history = shown(served, job["id"])
    receive = [(s["outcome"], s["message"]) for s in history["steps"] if s["step"] == "receive"]
    assert [o for o, _ in receive] == ["ok", "duplicate", "duplicate-different", "duplicate"]
    assert f"{first.SOPInstanceUID}.v2.dcm" in receive[2][1]
    assert [s["step"] for s in history["steps"]].count("infer") == 1  # not processed again
    assert history["status"] == "done"
    versions = list((served.data_dir / "archive" / "received").rglob(f"{first.SOPInstanceUID}*"))
    assert sorted(p.name for p in versions) == [f"{first.SOPInstanceUID}.dcm",
                                                f"{first.SOPInstanceUID}.v2.dcm"]
    echo_with_dcmtk(served)
