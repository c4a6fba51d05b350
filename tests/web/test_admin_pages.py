"""The admin pages of a served node, looked at in real headless Chromium after real traffic.

Real pieces only: ``cxrnode serve`` in a subprocess (real networks on the CPU) with the pages on its
HTTP port and ``[web] token`` from ``CXRNODE_WEB_TOKEN``; a real Orthanc as the destination
``pacs``; a second destination ``backup`` (``reply_to_caller``) whose port has nothing listening
at first, with ``[send] max_attempts = 1``, so the radiograph that ``BACKUP`` sends fails in the
sender; DX radiographs from ``tests.dicom_factory.make_dx`` and a CT slice sent with pynetdicom.
Each page is loaded by ``page.mjs`` (puppeteer-core driving Debian Chromium); the assertions are
on what it rendered (the DOM's text, its tables, the screenshot's pixels) and on ``cxrnode ...
--json`` of the same node. The tests run in file order on one node: the retry and the purge last.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from node.cli.render import human_bytes
from tests.dicom_factory import make_ct_slice, make_dx
from tests.servers import REPO, NodeProcess, Orthanc, c_store, free_port, wait_until
from tests.web.browser import screenshot_pixels

pytestmark = pytest.mark.e2e

DATA = REPO / "tests" / "data"
TOKEN = "admin-page-token-0123456789"
TIMEOUT_S = 300
#: What tests.dicom_factory writes into every header: never on a page by default.
PATIENT_TEXTS = ("CXRNODE^TEST", "CXRNODE TEST", "TEST-0001")
#: Set, the failed job's page is also saved as docs/images/admin-job.png (the README's picture).
DOCS_SCREENSHOT_ENV = "CXRNODE_WRITE_DOCS_SCREENSHOTS"


def send(port: int, datasets: list[Dataset], calling: str) -> list[int]:
    statuses = c_store(port, datasets, calling=calling)
    assert statuses is not None, "association rejected"
    return statuses


def cli_json(node: NodeProcess, *args: str) -> Any:
    done = node.cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def post(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body if body is not None else b"", method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def assert_no_patient_identifiers(dump: dict[str, Any]) -> None:
    for text in PATIENT_TEXTS:
        assert text not in dump["body_text"], f"{text} shown on {dump['url']}"
        assert text not in dump["html"], f"{text} in the HTML of {dump['url']}"


def assert_clean(dump: dict[str, Any], status: int = 200) -> None:
    assert dump["status"] == status, dump["body_text"][:500]
    # Chromium logs a page answered with an error status as a console error: that one is expected.
    expected = f"the server responded with a status of {status} "
    assert dump["page_errors"] == []
    assert [e for e in dump["console_errors"] if status == 200 or expected not in e] == []
    assert [f for f in dump["request_failures"] if f["url"] != dump["final_url"]] == []
    assert_no_patient_identifiers(dump)


def overlay_colours(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(greenish, blueish) masks: the preview's left-lung green and right-lung blue."""
    rgb = pixels.astype(int)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (green - np.maximum(red, blue)) > 25, (blue - np.maximum(red, green)) > 25


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The served node after its traffic: one radiograph done, one failed in the sender, a CT discarded."""
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port()).start()
    backup_port, http_port = free_port(), free_port()
    node = NodeProcess(
        tmp_path_factory.mktemp("node"), free_port(),
        destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
                      {"name": "backup", "ae_title": "BACKUP", "host": "127.0.0.1", "port": backup_port,
                       "reply_to_caller": True}],
        extra={"http": {"port": http_port}, "send": {"max_attempts": 1}})
    started_at = datetime.now(UTC) - timedelta(seconds=1)
    try:
        node.start(env={"CXRNODE_WEB_TOKEN": TOKEN})
        done_dx = make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024),
                          sop_instance_uid="1.2.826.0.1.3680043.8.498.6601")
        failing_dx = make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024),
                             sop_instance_uid="1.2.826.0.1.3680043.8.498.6602")
        ct = make_ct_slice()
        assert send(node.port, [done_dx, ct], "MODALITY") == [0, 0]
        assert send(node.port, [failing_dx], "BACKUP") == [0]
        wanted = {"done": 1, "failed": 1, "discarded": 1}
        wait_until(lambda: {k: v for k, v in cli_json(node, "status")["counts"].items() if v} == wanted,
                   TIMEOUT_S, interval_s=1.0, what="one job done, one failed, one discarded")
        jobs = {j["sop_instance_uid"]: j for j in cli_json(node, "jobs", "list")}
        yield {
            "node": node, "orthanc": orthanc, "url": f"http://127.0.0.1:{http_port}", "backup_port": backup_port,
            "done": jobs[done_dx.SOPInstanceUID]["id"], "failed": jobs[failing_dx.SOPInstanceUID]["id"],
            "discarded": jobs[ct.SOPInstanceUID]["id"], "study": failing_dx.StudyInstanceUID,
            "started_at": started_at, "out": tmp_path_factory.mktemp("pages"),
            "start_backup": lambda: Orthanc(tmp_path_factory.mktemp("backup"), free_port(), backup_port,
                                            aet="BACKUP").start(),
        }
    finally:
        node.stop()
        orthanc.stop()


def test_overview_shows_what_cxrnode_status_shows(site: dict[str, Any], browser) -> None:  # type: ignore[no-untyped-def]
    node = site["node"]
    dump = browser(site["url"] + "/", site["out"], "overview")
    print(f"screenshot: {dump['screenshot']}")
    assert_clean(dump)
    status = cli_json(node, "status")
    counts = {state: int(count) for state, count in dump["tables"]["counts"]["rows"]}
    assert counts == status["counts"]
    assert status["oldest_waiting_at"] is None and dump["ids"]["oldest"] == "No job is waiting."
    assert dump["lists"]["disk"]["Total"] == human_bytes(status["disk"]["total_bytes"])
    assert dump["lists"]["disk"]["Data folder"] == status["disk"]["data_dir"]

    listed = {j["id"]: j for j in cli_json(node, "jobs", "list")}
    table = dump["tables"]["jobs"]
    assert table["headers"][:6] == ["Job", "State", "TB score", "Received", "Finished", "Duration"]
    rows = {int(row[0]): row for row in table["rows"]}
    assert list(rows) == sorted(listed, reverse=True)
    for job_id, job in listed.items():
        assert rows[job_id][1] == job["status"]
        assert rows[job_id][2] == ("-" if job["tb_score"] is None else f"{job['tb_score']:.3f}")
        assert rows[job_id][3] == job["received_at"].replace("T", " ").removesuffix("+00:00")
    done = rows[site["done"]]
    assert done[4] != "-" and done[5].endswith(" s")  # finished, with how long it took
    assert {"text": str(site["done"]), "href": f"/jobs/{site['done']}"} in dump["links"]

    failed = browser(site["url"] + "/?state=failed", site["out"], "overview-failed")
    print(f"screenshot: {failed['screenshot']}")
    assert_clean(failed)
    assert [row[:2] for row in failed["tables"]["jobs"]["rows"]] == [[str(site["failed"]), "failed"]]
    assert "Jobs failed" in failed["body_text"]


def test_job_page_shows_its_steps_and_the_preview(site: dict[str, Any], browser) -> None:  # type: ignore[no-untyped-def]
    node, job_id = site["node"], site["done"]
    dump = browser(f"{site['url']}/jobs/{job_id}", site["out"], "job-done")
    print(f"screenshot: {dump['screenshot']}")
    assert_clean(dump)
    shown = cli_json(node, "jobs", "show", str(job_id))
    assert dump["ids"]["state"] == shown["status"] == "done"
    steps = dump["tables"]["steps"]
    assert steps["headers"] == ["At", "Step", "Outcome", "State", "Detail"]
    assert [(row[1], row[2], row[4]) for row in steps["rows"]] == \
        [(s["step"], s["outcome"], s["message"]) for s in shown["steps"]]
    assert [row[0] for row in steps["rows"]] == [s["at"].replace("T", " ").removesuffix("+00:00") for s in shown["steps"]]
    assert dump["lists"]["summary"]["TB score"] == f"{shown['tb_score']:.3f}"
    assert [row[:3] for row in dump["tables"]["results"]["rows"]] == \
        [[r["kind"].upper(), r["sop_class_uid"], r["sop_instance_uid"]] for r in shown["results"]]
    assert [row[:2] for row in dump["tables"]["deliveries"]["rows"]] == [["pacs", "1"]]

    (image,) = dump["images"]
    assert image["src"].endswith(f"/jobs/{job_id}/preview.png") and image["complete"]
    assert image["natural_width"] == 1024 and image["natural_height"] > 1024  # the radiograph under its caption
    box = image["box"]
    assert box["width"] > 300
    pixels = screenshot_pixels(dump["screenshot"], box)
    band = round(box["height"] - box["width"])  # the caption band above the square radiograph
    greenish, blueish = overlay_colours(pixels[band:])
    half = greenish.shape[1] // 2
    assert greenish.sum() > 2000 and blueish.sum() > 2000, (greenish.sum(), blueish.sum())
    assert greenish[:, half:].sum() > 10 * max(1, greenish[:, :half].sum())  # patient's left: image right
    assert blueish[:, :half].sum() > 10 * max(1, blueish[:, half:].sum())


def test_discarded_job_says_it_has_no_results(site: dict[str, Any], browser) -> None:  # type: ignore[no-untyped-def]
    dump = browser(f"{site['url']}/jobs/{site['discarded']}", site["out"], "job-discarded")
    print(f"screenshot: {dump['screenshot']}")
    assert_clean(dump)
    assert dump["ids"]["state"] == "discarded"
    assert dump["images"] == []
    assert dump["ids"]["no-preview"].startswith("The job was discarded, so it has no results and no preview")
    assert "CT Image Storage" in dump["ids"]["discard-reason"]
    assert dump["ids"]["no-results"] == "No results: the job was discarded."
    assert get_status(f"{site['url']}/jobs/{site['discarded']}/preview.png") == 404


def test_audit_page_shows_what_cxrnode_audit_shows(site: dict[str, Any], browser) -> None:  # type: ignore[no-untyped-def]
    since = site["started_at"].isoformat(timespec="seconds")
    dump = browser(f"{site['url']}/audit?since={since.replace('+', '%2B')}", site["out"], "audit")
    print(f"screenshot: {dump['screenshot']}")
    assert_clean(dump)
    trail = cli_json(site["node"], "audit", "--since", since)
    rows = dump["tables"]["audit"]["rows"]
    assert [(row[1], row[2], row[3]) for row in rows] == [(e["subject"], e["what"], e["detail"]) for e in reversed(trail)]
    details = " ".join(row[3] for row in rows if row[1].startswith("association"))
    assert "MODALITY@127.0.0.1" in details and "BACKUP@127.0.0.1" in details
    assert {"text": f"job {site['failed']}", "href": f"/jobs/{site['failed']}"} in dump["links"]
    later = browser(f"{site['url']}/audit?since=2999-01-01T00:00", site["out"], "audit-empty")
    assert later["ids"]["no-entries"].startswith("No audit entries since 2999-01-01")


def test_retry_is_refused_without_the_right_token(site: dict[str, Any], browser) -> None:  # type: ignore[no-untyped-def]
    node, job_id, url = site["node"], site["failed"], site["url"]
    before = cli_json(node, "jobs", "show", str(job_id))
    assert before["status"] == "failed" and before["fail_stage"] == "send"
    page = browser(f"{url}/jobs/{job_id}", site["out"], "job-failed")
    print(f"screenshot: {page['screenshot']}")
    assert_clean(page)
    assert page["ids"]["state"] == "failed"
    (form,) = [f for f in page["forms"] if f["id"] == "retry"]
    assert form == {"id": "retry", "action": f"/jobs/{job_id}/retry", "method": "post",
                    "fields": [{"name": "token", "type": "password"}], "buttons": [f"Retry job {job_id}"]}
    assert TOKEN not in page["html"]
    assert page["images"] and page["images"][0]["natural_width"] == 1024  # its results exist: a preview
    if os.environ.get(DOCS_SCREENSHOT_ENV):  # the README's picture of a job's page
        shutil.copyfile(page["screenshot"], REPO / "docs" / "images" / "admin-job.png")

    wrong = browser(f"{url}/jobs/{job_id}", site["out"], "retry-wrong-token",
                    fill={"#token": "not-the-token-0123456789"}, click="#retry button")
    print(f"screenshot: {wrong['screenshot']}")
    assert_clean(wrong, status=403)
    assert wrong["ids"]["message"] == "The token is missing or wrong ([web] token). Nothing was changed."
    assert post(f"{url}/jobs/{job_id}/retry") == 403  # no token at all
    assert post(f"{url}/jobs/{job_id}/retry?token={TOKEN}") == 403  # never taken from a URL
    assert post(f"{url}/jobs/{job_id}/retry", b"token=" + TOKEN[:-1].encode(),
                {"Content-Type": "application/x-www-form-urlencoded"}) == 403
    assert get_status(f"{url}/jobs/{job_id}/retry?token={TOKEN}") == 405
    after = cli_json(node, "jobs", "show", str(job_id))
    assert after["status"] == "failed" and after["steps"] == before["steps"]


def test_retry_button_with_the_token_requeues_the_failed_job(site: dict[str, Any], browser) -> None:  # type: ignore[no-untyped-def]
    node, job_id, url = site["node"], site["failed"], site["url"]
    backup = site["start_backup"]()  # the destination is up again
    try:
        dump = browser(f"{url}/jobs/{job_id}", site["out"], "retry-with-token",
                       fill={"#token": TOKEN}, click="#retry button")
        print(f"screenshot: {dump['screenshot']}")
        assert_clean(dump)
        assert dump["final_url"] == f"{url}/jobs/{job_id}?retried=1"
        assert dump["ids"]["notice"].startswith("Retried")
        assert dump["ids"]["state"] in {"encoded", "sending", "done"}
        assert ("retry", "ok") in [(row[1], row[2]) for row in dump["tables"]["steps"]["rows"]]
        shown = cli_json(node, "jobs", "show", str(job_id))
        assert shown["status"] != "failed"
        assert [(s["step"], s["outcome"], s["to"]) for s in shown["steps"]].count(("retry", "ok", "encoded")) == 1

        wait_until(lambda: cli_json(node, "jobs", "show", str(job_id))["status"] == "done", TIMEOUT_S,
                   what="the retried job done")
        again = browser(f"{url}/jobs/{job_id}", site["out"], "job-retried-done")
        print(f"screenshot: {again['screenshot']}")
        assert_clean(again)
        assert again["ids"]["state"] == "done"
        assert "retry" not in [f["id"] for f in again["forms"]]
        delivered = {row[0]: row[2] for row in again["tables"]["deliveries"]["rows"]}
        assert set(delivered) == {"pacs", "backup"} and "not yet" not in delivered.values()
        assert len(backup.find("Instance", {"StudyInstanceUID": site["study"]})) == 2  # SEG + SR at the backup
    finally:
        backup.stop()


def test_a_purged_job_shows_a_message_instead_of_the_preview(site: dict[str, Any], browser) -> None:  # type: ignore[no-untyped-def]
    node, job_id = site["node"], site["done"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    env["CXRNODE_RETENTION_IMAGES_DAYS"] = "0.00001"  # about a second: every ended job's images go
    purge = subprocess.run([sys.executable, "-m", "node", "archive", "purge", "--config", str(node.config_file)],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert purge.returncode == 0, purge.stderr
    assert cli_json(node, "jobs", "show", str(job_id))["files_purged_at"] is not None
    dump = browser(f"{site['url']}/jobs/{job_id}", site["out"], "job-purged")
    print(f"screenshot: {dump['screenshot']}")
    assert_clean(dump)
    assert dump["images"] == []
    assert "deleted by the retention purge" in dump["ids"]["no-preview"]
    assert "deleted by the retention purge" in dump["ids"]["purged"]
    assert get_status(f"{site['url']}/jobs/{job_id}/preview.png") == 410
