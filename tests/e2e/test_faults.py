"""The node never stops silently: faults injected into a served node (``CXRNODE_FAULT_RAISE``, see
node/faults.py) are recorded on the job they hit and the node goes on; a node that cannot work
stops with a non-zero exit code and a log line saying why, so that its supervisor restarts it.

Each test runs ``cxrnode serve`` as a subprocess with the real networks on the CPU against a real
Orthanc. For each fault: the faulty job ends done after a retry, with the reason in ``cxrnode jobs
show ID --json``; the node still answers C-ECHO; the next radiograph is processed and its SEG and
SR land in Orthanc; a SIGTERM still stops it warmly with exit code 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.dicom_factory import make_dx, new_instance
from tests.e2e.test_crash_safety import echo_ok, instances_in_pacs, store
from tests.servers import NodeProcess, Orthanc, free_port, wait_until

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def base_image() -> Dataset:
    return make_dx(DATA / "MCUCXR_0017_0.png", size=(768, 768))


def variant(base: Dataset, name: str) -> Dataset:
    return new_instance(base, f"FAULT-{name}")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port()).start()
    yield orthanc
    orthanc.stop()


def make_node(workdir: Path, pacs: Orthanc, **extra: dict) -> NodeProcess:
    sections: dict[str, dict] = {
        # a lease of 4 s (renewed every 1.3 s) and a reaper every second: a job whose worker
        # could not record anything is back in the queue within seconds
        "worker": {"retry_delay_s": 0.5, "lease_s": 4.0},
        "housekeeping": {"reap_interval_s": 1.0},
        "send": {"backoff_s": [0.5], "max_attempts": 5},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return NodeProcess(workdir, free_port(), destinations=[
        {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
        extra=sections)


def job_of(node: NodeProcess, ds: Dataset) -> dict | None:
    out = node.cli("jobs", "list", "--json", "--limit", "100")
    assert out.returncode == 0, out.stderr
    return next((j for j in json.loads(out.stdout) if j["sop_instance_uid"] == ds.SOPInstanceUID), None)


def wait_done(node: NodeProcess, ds: Dataset, timeout_s: float = 180) -> dict:
    job = wait_until(lambda: (j := job_of(node, ds)) and j["status"] in {"done", "failed"} and j,
                     timeout_s, what=f"the job of {ds.PatientID} finished")
    assert job["status"] == "done", job
    out = node.cli("jobs", "show", str(job["id"]), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def node_log(node: NodeProcess) -> str:
    return node.log_bytes().rpartition(b"----- start -----")[2].decode(errors="replace")


@dataclass(frozen=True)
class Fault:
    spec: str                     # CXRNODE_FAULT_RAISE
    step: tuple[str, str] | None  # (step, outcome) the faulty job records
    reason: str                   # in that step's message (or the node's log when step is None)
    log: str                      # in the node's log
    env: dict[str, str] = field(default_factory=dict)


FAULTS = {
    # the disk fills while the SEG is written: the attempt is retried
    "disk-full-writing-results": Fault(
        "result-write=ENOSPC:1", ("infer", "retry"),
        "writing the results: OSError: [Errno 28] No space left on device", "job 1: failed while writing the results"),
    # the database is locked past its busy timeout while the results are recorded
    "database-locked-recording-results": Fault(
        "db-record=locked:1", ("infer", "retry"),
        "recording the results: OperationalError: database is locked", "job 1: failed while recording the results"),
    # ... and still unavailable when the failure is recorded: the lease expires, the reaper returns the job
    "database-unavailable-recording-the-failure-too": Fault(
        "db-record=unavailable:2", ("reap", "retry"), "expired",
        "job 1: could not record its failure"),
    # the claims fail (worker and sender): no job is touched, the loops back off and go on
    "database-unavailable-at-the-claim": Fault(
        "db-claim=unavailable:3", None, "OperationalError: unable to open database file",
        "turn failed (1 in a row"),
    # the lease is lost mid-analysis (held there 2 s by a pause): results are not recorded
    "lease-lost-mid-job": Fault(
        "lease=lost:1", ("infer", "lease-lost"), "results not recorded", "job 1: lease lost",
        env={"CXRNODE_FAULT_PAUSE": "infer=2"}),
    # an exception the SCU did not expect: the delivery is retried after the backoff
    "exception-in-the-scu": Fault(
        "scu=RuntimeError:1", ("send", "error"), "pacs attempt 1: RuntimeError: fault injected at 'scu'",
        "job 1 -> pacs: RuntimeError"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_fault_is_recorded_on_its_job_and_the_node_goes_on(name: str, tmp_path: Path, pacs: Orthanc,
                                                             base_image: Dataset) -> None:
    fault = FAULTS[name]
    node = make_node(tmp_path / "node", pacs)
    node.start(env={"CXRNODE_FAULT_RAISE": fault.spec, **fault.env})
    try:
        faulty, following = variant(base_image, f"{name}-1"), variant(base_image, f"{name}-2")
        assert store(node, [faulty]) == [0]
        job = wait_done(node, faulty)
        if fault.step is not None:
            messages = [s["message"] for s in job["steps"] if (s["step"], s["outcome"]) == fault.step]
            assert any(fault.reason in m for m in messages), job["steps"]
        else:
            assert fault.reason in node_log(node)
        if fault.step is not None and fault.step[0] != "send":
            assert job["attempts"] == 2  # analysed again
        assert "fault injection: raising" in node_log(node) and fault.log in node_log(node)

        assert echo_ok(node)
        assert store(node, [following]) == [0]
        wait_done(node, following)
        for ds in (faulty, following):
            assert len(instances_in_pacs(pacs, ds.StudyInstanceUID, "SEG")) == 1
            assert len(instances_in_pacs(pacs, ds.StudyInstanceUID, "SR")) == 1
        assert "thread died" not in node_log(node) and "cannot work" not in node_log(node)
    finally:
        code = node.stop()
    assert code == 0  # a warm stop after faults is still a clean exit


@pytest.mark.parametrize(("spec", "code", "why"), [
    # the queue database stays unreachable: every turn fails for worker.give_up_after_s
    ("db-claim=unavailable:*", 75, "the node cannot work: "),
    # a loop thread dies of something no handler expects (a native crash's stand-in)
    ("db-claim=fatal:1", 70, " thread died: FatalFault: fault injected at 'db-claim'"),
])
def test_a_node_that_cannot_work_stops_with_a_non_zero_exit_and_says_why(
        spec: str, code: int, why: str, tmp_path: Path, pacs: Orthanc) -> None:
    node = make_node(tmp_path / "node", pacs, worker={"give_up_after_s": 2.0})
    node.start(env={"CXRNODE_FAULT_RAISE": spec})
    assert node.proc is not None
    try:
        assert node.proc.wait(60) == code
    finally:
        if node.proc.poll() is None:
            node.kill()
    log = node_log(node)
    assert why in log
    assert f"stopping with exit code {code} so that the supervisor restarts the node" in log
    assert f"cxrnode exits with code {code}: " in log
    if code == 75:
        assert "OperationalError: unable to open database file" in log.split("the node cannot work: ")[1]
