"""One node spread over several "hosts": two receivers and three workers, each its own process with
its own data folder and ``[node] instance_name``, sharing a real PostgreSQL queue and a real
S3-compatible archive (SeaweedFS), delivering to a real Orthanc. Eight senders send 200
radiographs spread over both receivers while receivers and workers are killed with SIGKILL and
started again.

What must hold (issue 12):
- every radiograph a receiver acknowledged gets exactly one SEG and one SR in Orthanc;
- no job is processed to completion twice (one processing -> encoded transition per job) and none
  is delivered twice (one sending -> done);
- ``cxrnode status`` shows the same counts from every host.

A sender whose association breaks, or which gets no answer, sends the image again to the other
receiver, as a modality or a PACS retries an unacknowledged store. The kills follow a seeded
random schedule (the seed is printed), at least one of each kind. Each receiver also runs a
sender (``--role receiver,sender``): killing it kills sends in flight too.
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from node.dicom import DX_FOR_PRESENTATION
from node.queue.db import Database
from node.queue.tables import Job, JobEvent
from tests.dicom_factory import copies_in_one_study, make_dx
from tests.servers import NodeProcess, Orthanc, SeaweedFS, free_port, wait_until

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[1] / "data"
RECEIVERS, WORKERS, SENDERS, RADIOGRAPHS = 2, 3, 8, 200
#: Seconds between a sender's images (25 each: about 40 s of sending, while the kills go on).
PACE_S = 1.6
#: Kills during the run: at least this many, alternating receivers and workers.
KILLS = 6


class Sender(threading.Thread):
    """A modality sending its images to the receivers, starting at ``first``; an image not
    acknowledged is sent again, to the other receiver, until it is."""

    def __init__(self, images: list[Any], receivers: list[NodeProcess], first: int,
                 acknowledged: dict[str, int], lock: threading.Lock) -> None:
        super().__init__(daemon=True)
        self.images, self.receivers, self.at = images, receivers, first
        self.acknowledged, self.lock = acknowledged, lock
        self.retries = 0

    def run(self) -> None:
        pending = list(self.images)
        deadline = time.monotonic() + 600
        while pending and time.monotonic() < deadline:
            receiver = self.receivers[self.at % len(self.receivers)]
            ae = AE(ae_title=f"MOD{self.at % 97}")
            ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            try:
                assoc = ae.associate("127.0.0.1", receiver.port, ae_title=receiver.ae_title)
                if not assoc.is_established:
                    raise ConnectionError("no association")
                while pending:
                    answer = assoc.send_c_store(pending[0])
                    status = int(answer.Status) if "Status" in answer else None
                    if status != 0x0000:
                        raise ConnectionError(f"status {status}")
                    with self.lock:
                        self.acknowledged[str(pending[0].SOPInstanceUID)] = self.at % len(self.receivers)
                    pending.pop(0)
                    time.sleep(PACE_S)
                assoc.release()
            except Exception:  # noqa: BLE001 - a killed receiver: try the other one
                self.retries += 1
                self.at += 1
                time.sleep(0.3)


def test_two_receivers_three_workers_sigkill_exactly_once(tmp_path: Path, postgresql_url: str,
                                                          seaweedfs: SeaweedFS) -> None:
    seed = int(time.time())
    print(f"\nchaos seed {seed}")
    rng = random.Random(seed)
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    prefix = seaweedfs.prefix()
    shared: dict[str, dict[str, Any]] = {
        "queue": {"url": postgresql_url},
        "archive": {"url": f"s3://{seaweedfs.BUCKET}/{prefix}", "s3_endpoint_url": seaweedfs.endpoint,
                    "s3_access_key_id": seaweedfs.access_key, "s3_secret_access_key": seaweedfs.secret_key},
        "worker": {"device": "cpu", "concurrency": 1, "lease_s": 20.0, "poll_interval_s": 2.0},
        "send": {"poll_interval_s": 2.0, "timeout_s": 10.0, "max_attempts": 10, "backoff_s": [0.5, 1.0]},
        "housekeeping": {"reap_interval_s": 2.0},
    }
    destinations = [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]

    def host(name: str, roles: str) -> NodeProcess:
        extra = copy.deepcopy(shared)
        # one node: the same identity in every result, whichever host made it
        extra["node"] = {"instance_name": name, "station_name": "CXRNODE-MH", "device_serial_number": "MH-1"}
        return NodeProcess(tmp_path / name, free_port(), destinations, extra=extra, roles=roles)

    receivers = [host(f"receiver-{n}", "receiver,sender") for n in range(1, RECEIVERS + 1)]
    workers = [host(f"worker-{n}", "worker") for n in range(1, WORKERS + 1)]
    hosts = receivers + workers
    study_uid = generate_uid()
    images = copies_in_one_study(make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256)), RADIOGRAPHS, study_uid)
    acknowledged: dict[str, int] = {}
    lock = threading.Lock()
    kills: Counter[str] = Counter()
    try:
        for process in hosts:
            process.start(ready_timeout_s=240)
        senders = [Sender(images[n::SENDERS], receivers, n, acknowledged, lock) for n in range(SENDERS)]
        for sender in senders:
            sender.start()

        for n in range(KILLS):  # receivers and workers in turn, a random one each time
            time.sleep(rng.uniform(2.0, 6.0))
            group = receivers if n % 2 == 0 else workers
            victim = rng.choice(group)
            victim.kill()
            kills["receiver" if group is receivers else "worker"] += 1
            time.sleep(rng.uniform(0.2, 1.5))
            victim.start(ready_timeout_s=240)  # the same instance: it takes its own dead leases back

        for sender in senders:
            sender.join(600)
        assert len(acknowledged) == RADIOGRAPHS, f"{len(acknowledged)} of {RADIOGRAPHS} acknowledged"

        def all_done() -> dict[str, int] | None:
            out = receivers[0].cli("status", "--json")
            counts = json.loads(out.stdout)["counts"] if out.returncode == 0 else {}
            return counts if counts.get("done") == RADIOGRAPHS else None

        wait_until(all_done, 900, interval_s=3, what=f"{RADIOGRAPHS} jobs done")

        # the same picture from every host
        statuses = [json.loads(p.cli("status", "--json").stdout) for p in hosts]
        assert all(s["counts"] == statuses[0]["counts"] for s in statuses), [s["counts"] for s in statuses]
        assert statuses[0]["counts"]["done"] == RADIOGRAPHS and sum(statuses[0]["counts"].values()) == RADIOGRAPHS

        # each job processed to completion once, delivered once
        db = Database(tmp_path / "check", postgresql_url)
        with db.session() as session:
            jobs = session.query(Job).all()
            encoded = Counter(e.job_id for e in session.query(JobEvent).filter(
                JobEvent.from_status == "processing", JobEvent.to_status == "encoded"))
            delivered = Counter(e.job_id for e in session.query(JobEvent).filter(
                JobEvent.from_status == "sending", JobEvent.to_status == "done"))
            received = {job.instance.sop_instance_uid for job in jobs}
            keys = {job.instance.path for job in jobs}
            recovered = sum(1 for e in session.query(JobEvent).filter(JobEvent.step.in_(["recover", "reap"])))
        db.dispose()
        assert received == set(acknowledged) and len(jobs) == RADIOGRAPHS
        assert set(encoded.values()) == {1} and len(encoded) == RADIOGRAPHS
        assert set(delivered.values()) == {1} and len(delivered) == RADIOGRAPHS
        assert all(key.startswith(f"received/{study_uid}/") for key in keys)  # keys, never host paths

        # exactly one SEG and one SR per radiograph in the PACS
        study = orthanc.find("Study", {"StudyInstanceUID": study_uid})[0]
        series = orthanc.get(f"/studies/{study}/series?expand")
        modalities = Counter()
        for item in series:
            modalities[item["MainDicomTags"].get("Modality")] += len(item["Instances"])
        assert modalities == {"SEG": RADIOGRAPHS, "SR": RADIOGRAPHS}, modalities

        # and in the archive: every source and both results of every job, under the prefix
        listed = [o["Key"] for page in seaweedfs.client().get_paginator("list_objects_v2").paginate(
            Bucket=seaweedfs.BUCKET, Prefix=f"{prefix}/") for o in page.get("Contents", ())]
        assert sum(k.startswith(f"{prefix}/received/") for k in listed) == RADIOGRAPHS
        assert sum(k.startswith(f"{prefix}/results/") for k in listed) == 2 * RADIOGRAPHS

        print(f"kills: {dict(kills)}; sender retries: {sum(s.retries for s in senders)}; "
              f"jobs recovered or reaped: {recovered}; acknowledged {len(acknowledged)}; "
              f"delivered {len(delivered)}; duplicates in the PACS: 0")
        assert kills["receiver"] >= 1 and kills["worker"] >= 1
        assert sum(s.retries for s in senders) >= 1  # a receiver died under a sender: the chaos was real
        assert len(set(acknowledged.values())) == RECEIVERS  # both receivers took images
        for process in hosts:
            assert process.stop() == 0, process.log_bytes()[-3000:].decode(errors="replace")
    finally:
        for process in hosts:
            if process.proc is not None and process.proc.poll() is None:
                process.kill()
        orthanc.stop()
