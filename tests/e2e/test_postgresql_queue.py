"""cxrnode on a PostgreSQL queue, for real: ``cxrnode serve`` only listening, a separate
``cxrnode worker`` process analysing and sending, both polling once an hour. A radiograph's SEG and
SR still reach Orthanc within seconds: the listener's ``NOTIFY`` wakes the other process
(node.wakeups.PostgresWakeups). Neither process ever prints the database password.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dicom_factory import FIXTURE_DIR, make_dx
from tests.servers import REPO, NodeProcess, Orthanc, c_store, free_port, wait_until

pytestmark = pytest.mark.e2e

HOUR = 3600.0


def test_a_listener_and_a_worker_process_share_a_postgresql_queue(tmp_path: Path, postgresql_url: str) -> None:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(),
                      modalities={"cxrnode": {"AET": "CXRNODE", "Host": "127.0.0.1", "Port": node_port}})
    node = NodeProcess(tmp_path / "node", node_port, destinations=[
        {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        extra={"queue": {"url": postgresql_url}, "worker": {"enabled": False, "poll_interval_s": HOUR},
               "send": {"poll_interval_s": HOUR}})
    worker_log = tmp_path / "worker.log"
    worker = None
    orthanc.start()
    try:
        node.start()  # listens only: [worker] enabled = false
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
        with open(worker_log, "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "node", "worker", "--config", str(node.config_file)],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        wait_until(lambda: b"cxrnode ready" in worker_log.read_bytes(), 240, what="cxrnode worker ready")
        wait_until(lambda: worker.poll() is None and b"queue: PostgreSQL" in worker_log.read_bytes(), 5)

        ds = make_dx(FIXTURE_DIR / "MCUCXR_0017_0.png", size=(256, 256),
                     sop_instance_uid="1.2.826.0.1.3680043.8.498.7701")
        assert c_store(node_port, [ds]) == [0x0000]
        orthanc.wait_for_result_series(str(ds.StudyInstanceUID), 120)  # an hour's poll would be far later

        status = node.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["counts"]["done"] == 1
        assert worker.poll() is None
        worker.terminate()
        assert worker.wait(60) == 0
        assert node.stop() == 0
        password = postgresql_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        for log_text in (node.log_bytes(), worker_log.read_bytes()):
            assert b"queue: PostgreSQL cxrnode@127.0.0.1:" in log_text
            assert password.encode() not in log_text
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        if node.proc is not None:
            node.stop()
        orthanc.stop()
