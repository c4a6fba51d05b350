"""A real ``cxrnode serve`` run: no patient identifiers in its logs or CLI output, its audit
trail through the CLI, and the permissions of everything it leaves under ``data_dir``.

Two DX objects carry distinctive identifiers: one valid, one whose Patient's Name, Birth Date
and Accession Number break their VRs (the kind of header that makes pydicom and highdicom
quote values in warnings). Orthanc is the destination.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import pytest
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dicom import DX_FOR_PRESENTATION
from tests.dicom_factory import make_dx
from tests.security.conftest import scu
from tests.servers import NodeProcess, Orthanc, free_port, wait_until

pytestmark = pytest.mark.e2e

DATA = Path(__file__).resolve().parents[1] / "data"
TERMINAL = {"done", "failed", "discarded"}

VALID = {"PatientName": "Quetzalcoatl^Zebulon", "PatientID": "PIDQ7X3K9W2",
         "PatientBirthDate": "19370412", "AccessionNumber": "ACC8W4M1Z"}
MALFORMED = {"PatientName": "XANTHIPPEVORTIGERN", "PatientID": "PIDM5J8R2T6",
             "PatientBirthDate": "12/04/1936", "AccessionNumber": "ACCN5J8R2T6Y4U1P0Q"}
#: Every string that must not appear: the values, and the name's components on their own.
IDENTIFIERS = sorted({*VALID.values(), *MALFORMED.values(), "Quetzalcoatl", "Zebulon",
                      "1937-04-12", "19361204", "12/04/1936"})


def _radiograph(identifiers: dict[str, str]):  # type: ignore[no-untyped-def]
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the malformed values warn here, in the test process
        for keyword, value in identifiers.items():
            setattr(ds, keyword, value)
    return ds


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc plus a node that has received both radiographs and finished their jobs."""
    work = tmp_path_factory.mktemp("security-run")
    node_port, http_port, dicom_port = free_port(), free_port(), free_port()
    orthanc = Orthanc(work / "orthanc", http_port, dicom_port).start()
    node = NodeProcess(work / "node", node_port, destinations=[
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
        extra={"node": {"allowed_calling_ae_titles": ["GOODSCU"]},
               "worker": {"retry_delay_s": 0.5}})
    try:
        node.start()
        sent = [_radiograph(VALID), _radiograph(MALFORMED)]
        assoc = scu("GOODSCU", DX_FOR_PRESENTATION, Verification).associate(
            "127.0.0.1", node_port, ae_title=node.ae_title)
        assert assoc.is_established
        for ds in sent:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert scu("STRANGER").associate("127.0.0.1", node_port,
                                         ae_title=node.ae_title).is_rejected

        def finished() -> list[dict] | None:
            listing = node.cli("jobs", "list", "--json")
            jobs = json.loads(listing.stdout) if listing.returncode == 0 else []
            return jobs if len(jobs) == 2 and {j["status"] for j in jobs} <= TERMINAL else None

        jobs = wait_until(finished, 300, 1.0, what="both jobs finished")
        yield node, jobs, sent
    finally:
        if node.proc is not None:
            node.stop()
        orthanc.stop()


def _cli_outputs(node: NodeProcess, *commands: tuple[str, ...]) -> dict[str, str]:
    outputs = {}
    for command in commands:
        for extra in ((), ("--json",)):
            done = node.cli(*command, *extra)
            assert done.returncode == 0, done.stderr
            outputs[" ".join(command + extra)] = done.stdout + done.stderr
    return outputs


def _leaks(name: str, text: str) -> list[str]:
    lowered = text.lower()
    return [f"{name}: {value!r}" for value in IDENTIFIERS if value.lower() in lowered]


def test_no_patient_identifiers_in_logs_or_audit(run) -> None:
    node, _, _ = run
    logs = {"node.log (stdout+stderr)": node.log_bytes().decode(errors="replace")}
    for path in sorted((node.data_dir / "logs").glob("cxrnode.log*")):
        logs[str(path.relative_to(node.data_dir))] = path.read_text(errors="replace")
    assert "logs/cxrnode.log" in logs
    assert "C-STORE" in logs["logs/cxrnode.log"]  # the logs are not empty: they say what happened
    outputs = _cli_outputs(node, ("audit",))
    leaks = [leak for name, text in (logs | outputs).items() for leak in _leaks(name, text)]
    assert leaks == []


def test_no_patient_identifiers_in_job_commands(run) -> None:
    node, jobs, _ = run
    outputs = _cli_outputs(node, ("status",), ("jobs", "list"),
                           *[("jobs", "show", str(j["id"])) for j in jobs])
    leaks = [leak for name, text in outputs.items() for leak in _leaks(name, text)]
    assert leaks == []


@pytest.mark.sqlite_only("scans the SQLite file's bytes (vacuous without it)")
def test_no_patient_identifiers_in_the_queue_database(run) -> None:
    node, _, _ = run
    files = sorted(node.data_dir.glob("queue.sqlite3*"))
    leaks = [leak for path in files
             for leak in _leaks(path.name, path.read_bytes().decode("latin-1"))]
    assert leaks == []


def test_audit_cli_shows_associations_and_job_steps(run) -> None:
    node, jobs, _ = run
    done = node.cli("audit", "--json", "--since", "1h")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    associations = [e for e in entries if e["kind"] == "association"]
    accepted = [e for e in associations if e["calling_ae_title"] == "GOODSCU"]
    assert [(e["result"], e["c_store"], e["tls"]) for e in accepted] == [("released", 2, False)]
    (stranger,) = [e for e in associations if e["calling_ae_title"] == "STRANGER"]
    assert stranger["result"] == "rejected" and "not recognised" in stranger["reason"]
    assert stranger["peer_address"] == "127.0.0.1"
    steps = {(e["job_id"], e["step"], e["outcome"]) for e in entries if e["kind"] == "job"}
    for job in jobs:
        assert (job["id"], "receive", "ok") in steps
    table = node.cli("audit", "--since", "2h")
    assert table.returncode == 0 and "STRANGER@127.0.0.1" in table.stdout
    future = node.cli("audit", "--json", "--since", "2999-01-01T00:00:00")
    assert future.returncode == 0 and json.loads(future.stdout) == []
    bad = node.cli("audit", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def _wrong_modes(root: Path) -> list[str]:
    wrong = [f"{root.name}/ {stat.filemode(root.stat().st_mode)}"] \
        if root.stat().st_mode & 0o777 != 0o700 else []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            want = 0o700 if stat.S_ISDIR(mode) else 0o600
            if mode & 0o777 != want:
                wrong.append(f"{path.relative_to(root)} {stat.filemode(mode)}")
    return wrong


@pytest.mark.sqlite_only("checks the SQLite file's WAL and -shm are 0600 while the node runs")
def test_data_dir_is_private_while_running(run) -> None:
    node, _, _ = run
    assert list(node.data_dir.glob("queue.sqlite3-wal")), "expected SQLite's WAL while running"
    assert _wrong_modes(node.data_dir) == []


def test_data_dir_is_private_after_stop(run) -> None:
    node, _, _ = run
    assert node.stop() == 0
    node.cli("status")  # an operator command afterwards (it opens the database again)
    assert _wrong_modes(node.data_dir) == []


def test_audit_after_stop_has_only_real_associations(run) -> None:
    """The port probe of the test harness is no association: the shutdown does not audit it."""
    node, _, _ = run
    assert node.proc is not None and node.proc.poll() is not None
    done = node.cli("audit", "--json")
    assert done.returncode == 0, done.stderr
    associations = [e for e in json.loads(done.stdout) if e["kind"] == "association"]
    assert sorted(e["calling_ae_title"] for e in associations) == ["GOODSCU", "STRANGER"]
