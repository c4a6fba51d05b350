"""Eight senders, 25 images each, at once: every image archived, processed once, delivered once,
with two worker threads analysing at once (``worker.concurrency = 2``, the default).

A correctness test under concurrency (SQLite writers from eight association threads plus the
worker and the sender), not a speed test.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from node.dicom import DX_FOR_PRESENTATION
from tests.dicom_factory import copies_in_one_study, make_dx
from tests.servers import NodeProcess, Orthanc, free_port, wait_until

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[1] / "data"
SENDERS, PER_SENDER = 8, 25


def test_eight_concurrent_senders(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    node = NodeProcess(tmp_path / "node", free_port(), destinations=[
        {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        extra={"worker": {"concurrency": 2}})  # the shipped default: two jobs analysed at once
    base = make_dx(DATA / "MCUCXR_0017_0.png", size=(512, 512))
    study_uid = generate_uid()
    batches = [copies_in_one_study(base, PER_SENDER, study_uid) for _ in range(SENDERS)]
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def send(batch: list) -> None:  # type: ignore[type-arg]
        ae = AE(ae_title="LOADSCU")
        ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        for ds in batch:
            answer = assoc.send_c_store(ds)
            with lock:
                statuses[ds.SOPInstanceUID] = int(answer.Status) if "Status" in answer else -1
        assoc.release()

    node.start()
    try:
        threads = [threading.Thread(target=send, args=(b,)) for b in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        sent = {ds.SOPInstanceUID for batch in batches for ds in batch}
        assert len(statuses) == SENDERS * PER_SENDER and set(statuses.values()) == {0}

        def all_done() -> list[dict] | None:
            out = node.cli("jobs", "list", "--json", "--limit", "1000")
            jobs = json.loads(out.stdout)
            return jobs if len(jobs) == len(sent) and all(j["status"] == "done" for j in jobs) else None

        jobs = wait_until(all_done, 900, interval_s=2, what="all 200 jobs done")
        assert {j["sop_instance_uid"] for j in jobs} == sent  # each exactly once
        assert all(j["attempts"] == 1 for j in jobs)  # processed once, never twice
        received = list((node.data_dir / "archive" / "received" / study_uid).glob("*.dcm"))
        assert len(received) == len(sent)
        study = orthanc.find("Study", {"StudyInstanceUID": study_uid})[0]
        counts = orthanc.get(f"/studies/{study}/statistics")
        assert int(counts["CountInstances"]) == 2 * len(sent)  # one SEG and one SR each
    finally:
        node.stop()
        orthanc.stop()
