"""Retention with a served node and a real Orthanc that is down: nothing undelivered is purged.

Radiographs are analysed while the PACS is down, their results wait (and one fails for good);
``cxrnode archive purge`` with a retention of a second deletes only what was finished (a lateral
the node discarded). Once the PACS is up and the results delivered, the next purge deletes their
images and results, reporting files and bytes, while a pinned job and a failed one keep theirs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.dicom_factory import make_dx
from tests.servers import NodeProcess, Orthanc, c_store, free_port, wait_until

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[1] / "data"
#: A retention of under a second (0.00001 days): "past retention" as soon as a job has ended.
TINY_DAYS = 0.00001


def send(node: NodeProcess, ds) -> int:  # type: ignore[no-untyped-def]
    statuses = c_store(node.port, [ds], called=node.ae_title)
    assert statuses is not None, "association rejected"
    return statuses[0]


def cli_json(node: NodeProcess, *args: str):  # type: ignore[no-untyped-def]
    out = node.cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def jobs_by_sop(node: NodeProcess) -> dict[str, dict]:
    return {j["sop_instance_uid"]: j for j in cli_json(node, "jobs", "list")}


def files(node: NodeProcess, ds, job_id: int) -> dict[str, list[Path]]:  # type: ignore[no-untyped-def]
    """A job's files where the folder archive keeps them (node/archive/folder.py)."""
    archive = node.data_dir / "archive"
    source = archive / "received" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    results = sorted((archive / "results" / str(job_id)).glob("*.dcm"))
    return {"images": [source], "results": results}


def purge(node: NodeProcess, *extra: str) -> dict:
    return cli_json(node, "archive", "purge", *extra)


def test_nothing_undelivered_is_purged_and_delivered_jobs_are(tmp_path: Path) -> None:
    node_port, http_port, dicom_port = free_port(), free_port(), free_port()
    node = NodeProcess(tmp_path / "node", node_port, destinations=[
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
        extra={"send": {"max_attempts": 1000, "backoff_s": [2.0]},
               "retention": {"images_days": TINY_DAYS, "history_days": 0, "audit_days": TINY_DAYS,
                             "purge_interval_s": 0}})
    orthanc = Orthanc(tmp_path / "orthanc", http_port, dicom_port)
    image = DATA / "MCUCXR_0017_0.png"
    failed_ds = make_dx(image, size=(1024, 1024))
    try:
        # 1. One radiograph whose results fail for good: one send attempt only, the PACS is down.
        node.start(env={"CXRNODE_SEND_MAX_ATTEMPTS": "1"})
        assert send(node, failed_ds) == 0x0000
        wait_until(lambda: jobs_by_sop(node)[failed_ds.SOPInstanceUID]["status"] == "failed", 180,
                   what="the first job to fail sending")
        assert node.stop() == 0

        # 2. Restart (1000 send attempts from now on); a crash's leftover in archive/tmp goes at start-up.
        leftover = node.data_dir / "archive" / "tmp" / "tmpcrash.part"
        leftover.write_bytes(b"half an image")
        os.utime(leftover, (time.time() - 3600, time.time() - 3600))
        node.start()
        assert not leftover.exists()
        assert b"removed 1 leftover temporary file(s)" in node.log_bytes().rpartition(b"----- start -----")[2]

        waiting = [make_dx(image, size=(1024, 1024)) for _ in range(3)]  # two to deliver, one to pin
        lateral = make_dx(image, size=(1024, 1024), view_position="LL")
        for ds in [*waiting, lateral]:
            assert send(node, ds) == 0x0000

        def settled() -> bool:
            jobs = jobs_by_sop(node)
            return (all(jobs.get(ds.SOPInstanceUID, {}).get("status") in ("encoded", "sending")
                        and jobs[ds.SOPInstanceUID]["last_error"] for ds in waiting)
                    and jobs.get(lateral.SOPInstanceUID, {}).get("status") == "discarded")
        wait_until(settled, 300, interval_s=1.0, what="results waiting for the PACS, the lateral discarded")
        jobs = jobs_by_sop(node)
        ids = {ds.SOPInstanceUID: jobs[ds.SOPInstanceUID]["id"] for ds in [*waiting, lateral, failed_ds]}
        pinned_ds = waiting[2]
        pinned = node.cli("jobs", "pin", str(ids[pinned_ds.SOPInstanceUID]))
        assert pinned.returncode == 0 and "pinned" in pinned.stdout
        before = {uid: files(node, ds, ids[uid]) for uid, ds in
                  ((d.SOPInstanceUID, d) for d in [*waiting, lateral, failed_ds])}
        for ds in [*waiting, failed_ds]:
            found = before[ds.SOPInstanceUID]
            assert found["images"][0].is_file() and len(found["results"]) == 2, found

        # 3. Purge with the PACS down: only the discarded lateral goes; every undelivered result stays.
        lateral_source = before[lateral.SOPInstanceUID]["images"][0]
        assert lateral_source.is_file() and before[lateral.SOPInstanceUID]["results"] == []
        lateral_size = lateral_source.stat().st_size
        time.sleep(1.5)
        dry = purge(node, "--dry-run")
        assert lateral_source.is_file()  # a dry run deletes nothing
        first = purge(node)
        assert first["jobs_purged"] == dry["jobs_purged"] == 1
        assert first["images"] == dry["images"] == {"jobs": 1, "files": 1, "bytes": lateral_size}
        assert first["results"] == {"jobs": 0, "files": 0, "bytes": 0}
        assert first["audit"]["rows"] >= 5  # the associations of the five C-STOREs
        assert not lateral_source.exists()
        for ds in [*waiting, failed_ds]:
            assert all(p.is_file() for group in before[ds.SOPInstanceUID].values() for p in group), ds.SOPInstanceUID
        statuses = {uid: j["status"] for uid, j in jobs_by_sop(node).items()}
        assert statuses[failed_ds.SOPInstanceUID] == "failed"
        assert all(statuses[ds.SOPInstanceUID] in ("encoded", "sending") for ds in waiting)
        retried = node.cli("jobs", "retry", str(ids[lateral.SOPInstanceUID]))
        assert retried.returncode == 2 and "deleted by the retention purge" in retried.stderr
        assert "Traceback" not in retried.stderr

        # 4. The PACS comes up: the waiting results arrive by themselves (the failed job is not retried).
        orthanc.start()
        wait_until(lambda: all(jobs_by_sop(node)[ds.SOPInstanceUID]["status"] == "done" for ds in waiting),
                   120, interval_s=1.0, what="delivery once the PACS is up")
        for ds in waiting:
            assert orthanc.series_of_study(ds.StudyInstanceUID, "SEG")

        # 5. Purge again: the two delivered, unpinned jobs lose their image and results.
        delivered = waiting[:2]
        sizes = {kind: sum(p.stat().st_size for ds in delivered for p in before[ds.SOPInstanceUID][kind])
                 for kind in ("images", "results")}
        time.sleep(1.5)
        second = purge(node)
        assert second["jobs_purged"] == 2
        assert second["images"] == {"jobs": 2, "files": 2, "bytes": sizes["images"]}
        assert second["results"] == {"jobs": 2, "files": 4, "bytes": sizes["results"]}
        for ds in delivered:
            assert not any(p.exists() for group in before[ds.SOPInstanceUID].values() for p in group)
            assert not (node.data_dir / "archive" / "results" / str(ids[ds.SOPInstanceUID])).exists()
        for ds in (pinned_ds, failed_ds):  # pinned, and failed: kept
            assert all(p.is_file() for group in before[ds.SOPInstanceUID].values() for p in group)
        jobs = jobs_by_sop(node)
        assert jobs[pinned_ds.SOPInstanceUID]["pinned"] is True and jobs[pinned_ds.SOPInstanceUID]["status"] == "done"
        assert jobs[failed_ds.SOPInstanceUID]["status"] == "failed"
        assert purge(node, "--dry-run")["jobs_purged"] == 0

        # 6. A purged job explains itself; its history stays (history_days = 0: for ever).
        purged_id = ids[delivered[0].SOPInstanceUID]
        shown = cli_json(node, "jobs", "show", str(purged_id))
        assert shown["status"] == "done" and shown["files_purged_at"]
        assert shown["steps"][-1]["step"] == "purge" and "source and results deleted" in shown["steps"][-1]["message"]
        preview = node.cli("jobs", "show", str(purged_id), "--preview", str(tmp_path / "p.png"))
        assert preview.returncode == 2 and "deleted by the retention purge" in preview.stderr
        assert "Traceback" not in preview.stderr
        kept = node.cli("jobs", "show", str(ids[pinned_ds.SOPInstanceUID]), "--preview", str(tmp_path / "k.png"))
        assert kept.returncode == 0, kept.stderr
        assert (tmp_path / "k.png").stat().st_size > 0

        status = cli_json(node, "status")
        assert status["counts"]["done"] == 3 and status["counts"]["failed"] == 1
        disk = status["disk"]
        assert disk["intake_instances"] == 5 and disk["intake_bytes_per_day"] > 0
        assert disk["headroom_days"] is not None and disk["headroom_days"] > 0
        assert disk["archive_bytes"] == sum(p.stat().st_size for p in (node.data_dir / "archive").rglob("*")
                                            if p.is_file())
        print(f"\nfirst purge (PACS down): {json.dumps({k: first[k] for k in ('images', 'results', 'audit')})}"
              f"\nsecond purge (delivered): {json.dumps({k: second[k] for k in ('images', 'results', 'audit')})}"
              f"\nstatus disk: {json.dumps(disk)}")
    finally:
        node.stop()
        orthanc.stop()
