"""The admin pages (node/http/web.py) with Starlette's TestClient, on a real queue database and real
archived DICOM files (a DX made by the factory, a SEG and an SR built by the node's own encoders).

What a browser shows of a served node is in ``tests/web/test_admin_pages.py``.
"""

from __future__ import annotations

import html
import io
import re
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from models.identity import ModelIdentity
from node import retention
from node.archive.folder import FolderArchive
from node.errors import SettingsError
from node.http import metrics
from node.http.app import HttpContext, create_app
from node.http.health import NodeHealth
from node.imaging import display_pixels
from node.queue import audit
from node.queue import repository as repo
from node.queue.db import Database
from node.queue.states import JobStatus
from node.queue.tables import utcnow
from node.results import ResultAlgorithms, build_report, build_segmentation
from node.results.sc import build_secondary_capture
from node.settings import NodeSettings, Settings, WebSettings, describe, load_settings
from tests.dicom_factory import make_ct_slice, make_dx

DATA = Path(__file__).resolve().parents[1] / "data"
TOKEN = "s3cret-token-for-tests-0123"
OWNER = "test:1:w"
PATIENT_TEXTS = ("CXRNODE^TEST", "CXRNODE TEST", "TEST-0001")
ALGORITHMS = ResultAlgorithms.from_model_identities(ModelIdentity("cxrnode-lung-unet", "0.1.0", "a" * 64),
                                                    ModelIdentity("cxrnode-tb-densenet", "0.1.0", "b" * 64))


def ellipses(rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(patient's left lung on the image's right, patient's right lung)."""
    y, x = np.ogrid[:rows, :columns]

    def ellipse(cx: float) -> np.ndarray:
        return ((x - cx) / (0.17 * columns)) ** 2 + ((y - 0.45 * rows) / (0.3 * rows)) ** 2 <= 1

    return ellipse(0.72 * columns), ellipse(0.28 * columns)


@dataclass
class Node:
    """A data folder, its queue and archive, and the app as ``cxrnode serve`` builds it."""

    settings: Settings
    db: Database
    archive: FolderArchive
    counter: int = 0

    def client(self, role: str = "serve") -> TestClient:
        health = NodeHealth(data_path=self.settings.data_path, archive=self.archive, min_free_bytes=0,
                            work=False, threads=lambda: [], stop=threading.Event())
        context = HttpContext(settings=self.settings, role=role, db=self.db, archive=self.archive,
                              health=health, exposition=metrics.exposition(role))
        return TestClient(create_app(context), follow_redirects=False)

    # --- jobs, driven through the repository as the node drives them ---
    def receive(self, calling: str = "MODALITY") -> tuple[int, object]:
        self.counter += 1
        ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256),
                     sop_instance_uid=f"1.2.826.0.1.3680043.8.498.9911.{self.counter}")
        path = self.archive.received_key(ds.StudyInstanceUID, ds.SOPInstanceUID)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        size = self.archive.put(path, buffer.getvalue())
        received = repo.ReceivedInstance(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID,
                                         ds.SeriesInstanceUID, str(ds.file_meta.TransferSyntaxUID), str(path),
                                         size, calling)
        return repo.enqueue(self.db, received).job_id, ds

    def encode(self, job_id: int, source, kinds=("seg", "sr"), destinations=("pacs",)) -> None:  # type: ignore[no-untyped-def]
        assert repo.claim(self.db, JobStatus.QUEUED, JobStatus.PROCESSING, OWNER, 600) == job_id
        left, right = ellipses(source.Rows, source.Columns)
        seg = build_segmentation(source, left, right, ALGORITHMS.segmenter)
        built = {"seg": seg,
                 "sr": build_report(source, seg, tb_score=0.42, threshold=0.5, lung_masks={"left": left, "right": right},
                                    areas_mm2=None, area_omission_reason="test", algorithms=ALGORITHMS),
                 "sc": build_secondary_capture(source, display_pixels(source), left, right,
                                               patient_left_on_image_right=True, tb_score=0.42, threshold=0.5,
                                               algorithms=ALGORITHMS)}
        results = []
        for kind in kinds:
            path = self.archive.result_key(job_id, kind)
            buffer = io.BytesIO()
            built[kind].save_as(buffer, enforce_file_format=True)
            self.archive.put(path, buffer.getvalue())
            results.append(repo.ArchivedResult(kind, built[kind].SOPClassUID, built[kind].SOPInstanceUID, str(path)))
        repo.mark_encoded(self.db, job_id, OWNER, 0.42, results, list(destinations))

    def send(self, job_id: int, error: str | None = None) -> JobStatus:
        assert repo.claim(self.db, JobStatus.ENCODED, JobStatus.SENDING, OWNER, 600) == job_id
        for destination in repo.pending_deliveries(self.db, job_id):
            repo.record_delivery(self.db, job_id, destination, error)
        return repo.finish_sending(self.db, job_id, OWNER, max_attempts=1, delay_s=1)

    def done(self, **kwargs) -> int:  # type: ignore[no-untyped-def]
        job_id, source = self.receive()
        self.encode(job_id, source, **kwargs)
        assert self.send(job_id) == JobStatus.DONE
        return job_id

    def failed(self) -> int:
        job_id, source = self.receive()
        self.encode(job_id, source)
        assert self.send(job_id, "association rejected") == JobStatus.FAILED
        return job_id

    def discarded(self) -> int:
        ct = make_ct_slice()
        received = repo.ReceivedInstance(ct.SOPInstanceUID, ct.SOPClassUID, ct.StudyInstanceUID,
                                         ct.SeriesInstanceUID, "1.2.840.10008.1.2.1", "", 0, "MODALITY")
        return repo.record_discarded(self.db, received, "CT Image Storage is not a class chest films come in").job_id

    def status(self, job_id: int) -> str:
        return repo.get_job(self.db, job_id).status


def make_node(tmp_path: Path, **web) -> Node:  # type: ignore[no-untyped-def]
    data = tmp_path / "var"
    settings = Settings(node=NodeSettings(data_dir=str(data), min_free_disk_mb=1), web=WebSettings(**web))
    return Node(settings, Database(data), FolderArchive(data / "archive"))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return make_node(tmp_path, token=TOKEN)


def text_of(page: str) -> str:
    """The page's text, roughly as a browser shows it (tags out, entities decoded)."""
    text = re.sub(r"<style.*?</style>|<[^>]+>", " ", page, flags=re.S)
    return " ".join(html.unescape(text).split())


def table_rows(html: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', html, flags=re.S)
    assert body is not None, f"no table {table_id}"
    return [[text_of(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), flags=re.S)]


# ----- settings -----

def test_web_settings_defaults_validation_and_secrecy(tmp_path: Path) -> None:
    web = load_settings(None, env={}).web
    assert (web.enabled, web.token, web.show_patient_data, web.recent_jobs) == (True, "", False, 50)
    assert load_settings(None, env={"CXRNODE_WEB_TOKEN": TOKEN}).web.token == TOKEN
    for values, key in [({"token": "short"}, "web.token"), ({"token": f" {TOKEN}"}, "web.token"),
                        ({"recent_jobs": 0}, "web.recent_jobs"), ({"recent_jobs": 1001}, "web.recent_jobs")]:
        with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
            WebSettings(**values)
    config = tmp_path / "c.toml"
    config.write_text(f'[web]\ntoken = "{TOKEN}"\nshow_patient_data = true\n')
    settings = load_settings(config, env={})
    assert settings.web.token == TOKEN and settings.web.show_patient_data
    assert TOKEN not in repr(settings) and TOKEN not in str(describe(settings))
    assert describe(settings)["web"]["token"] == "(set, not shown)"


def test_pages_only_where_the_node_listens_and_when_enabled(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    assert node.client("serve").get("/").status_code == 200
    assert node.client("listener").get("/").status_code == 200
    worker = node.client("worker")
    assert worker.get("/").status_code == 404 and worker.get("/healthz").status_code == 200
    off = make_node(tmp_path / "off", enabled=False).client()
    assert off.get("/").status_code == 404 and off.get("/audit").status_code == 404
    assert off.get("/healthz").status_code == 200


# ----- overview -----

def test_overview_counts_jobs_and_filters_by_state(node: Node) -> None:
    done, failed, discarded = node.done(), node.failed(), node.discarded()
    waiting, _ = node.receive()
    client = node.client()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    counts = {state: int(n) for state, n in table_rows(page.text, "counts")}
    assert counts == repo.queue_status(node.db).counts
    assert counts == {**dict.fromkeys(counts, 0), "done": 1, "failed": 1, "discarded": 1, "queued": 1}
    rows = {int(r[0]): r for r in table_rows(page.text, "jobs")}
    assert list(rows) == [waiting, discarded, failed, done]  # newest first
    assert rows[done][1:3] == ["done", "0.420"] and rows[failed][1] == "failed"
    assert rows[waiting][4:6] == ["-", "-"]  # not finished: no finish time, no duration
    assert rows[done][5].endswith(" s") and rows[done][6] == "MODALITY"
    assert "Oldest waiting job" in text_of(page.text)
    assert f'href="/jobs/{done}"' in page.text

    only_failed = client.get("/?state=failed")
    assert [int(r[0]) for r in table_rows(only_failed.text, "jobs")] == [failed]
    assert "Jobs failed" in text_of(only_failed.text)
    assert "No processing jobs." in text_of(client.get("/?state=processing").text)
    bad = client.get("/?state=bogus")
    assert bad.status_code == 400 and "no job state 'bogus'" in text_of(bad.text)


def test_every_page_is_sent_with_safe_headers(node: Node) -> None:
    job = node.done()
    client = node.client()
    for path in ("/", f"/jobs/{job}", "/audit", f"/jobs/{job}/preview.png", "/jobs/999"):
        headers = client.get(path).headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert "script-src" not in headers["content-security-policy"]  # default-src 'none': no scripts
        assert headers["cache-control"] == "no-store" and headers["x-content-type-options"] == "nosniff"
    css = client.get("/static/admin.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css") and "body" in css.text
    assert client.get("/static/favicon.svg").headers["content-type"].startswith("image/svg+xml")
    assert client.get("/static/..%2Fweb.py").status_code == 404 and client.get("/static/nope.css").status_code == 404


# ----- a job's page and its preview -----

def test_job_page_shows_every_step_results_and_deliveries(node: Node) -> None:
    job_id = node.done()
    job = repo.get_job(node.db, job_id)
    page = node.client().get(f"/jobs/{job_id}")
    assert page.status_code == 200
    steps = table_rows(page.text, "steps")
    assert [(r[1], r[2]) for r in steps] == [(e.step, e.outcome) for e in job.events]
    assert [r[3] for r in steps][:2] == ["→ queued", "queued → processing"]
    assert re.search(r'<span id="state" class="state state-done">done</span>', page.text)
    assert [r[0] for r in table_rows(page.text, "results")] == ["SEG", "SR"]
    assert [r[2] for r in table_rows(page.text, "results")] == [r.sop_instance_uid for r in job.results]
    (delivery,) = table_rows(page.text, "deliveries")
    assert delivery[:2] == ["pacs", "1"] and delivery[2] != "not yet"
    assert f'<img src="/jobs/{job_id}/preview.png"' in page.text
    assert node.client().get("/jobs/999").status_code == 404


def test_preview_is_the_radiograph_with_green_and_blue_lungs(node: Node) -> None:
    job_id = node.done()
    client = node.client()
    answer = client.get(f"/jobs/{job_id}/preview.png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)
    band = picture.shape[0] - picture.shape[1]  # the caption above the square radiograph
    assert 0 < band < 200
    image = picture[band:]
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    greenish, blueish = (green - np.maximum(red, blue)) > 25, (blue - np.maximum(red, green)) > 25
    half = image.shape[1] // 2
    assert greenish[:, half:].sum() > 20 * max(1, greenish[:, :half].sum())  # patient's left: image right
    assert blueish[:, :half].sum() > 20 * max(1, blueish[:, half:].sum())
    assert client.get(f"/jobs/{job_id}/preview.png").content == answer.content  # the cached copy


def test_a_job_with_only_a_secondary_capture_previews_that(node: Node) -> None:
    job_id = node.done(kinds=("sc",))
    answer = node.client().get(f"/jobs/{job_id}/preview.png")
    assert answer.status_code == 200
    picture = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)
    assert ((picture[..., 1] - np.maximum(picture[..., 0], picture[..., 2])) > 25).sum() > 100


def test_jobs_without_a_preview_say_why(node: Node) -> None:
    done = node.done()
    discarded = node.discarded()
    waiting, _ = node.receive()
    client = node.client()
    page = text_of(client.get(f"/jobs/{discarded}").text)
    assert "discarded, so it has no results and no preview" in page and "No results: the job was discarded." in page
    assert "<img" not in client.get(f"/jobs/{discarded}").text
    assert client.get(f"/jobs/{discarded}/preview.png").status_code == 404
    assert "No results yet (state queued)" in text_of(client.get(f"/jobs/{waiting}").text)

    files = [node.archive.path(repo.get_job(node.db, done).instance.path)]
    assert files[0].is_file()
    planned = retention.plan(node.settings, node.db, node.archive, now=utcnow() + timedelta(days=31))
    retention.execute(planned, node.db, node.archive)
    assert not files[0].exists()
    page = client.get(f"/jobs/{done}")
    assert "deleted by the retention purge" in text_of(page.text) and "<img" not in page.text
    gone = client.get(f"/jobs/{done}/preview.png")
    assert gone.status_code == 410 and "retention purge" in gone.text


# ----- patient identifiers -----

def test_no_patient_identifiers_unless_asked_for(node: Node) -> None:
    done, failed = node.done(), node.failed()
    client = node.client()
    pages = [client.get(p).text for p in ("/", f"/jobs/{done}", f"/jobs/{failed}", "/audit", "/?state=failed")]
    for page_html in pages:
        for text in PATIENT_TEXTS:
            assert text not in page_html
    assert "Patient identifiers are not shown" in text_of(pages[1])

    shown = Node(Settings(node=node.settings.node, web=WebSettings(show_patient_data=True)), node.db, node.archive)
    page = shown.client().get(f"/jobs/{done}").text
    assert "TEST-0001" in page and "CXRNODE^TEST" in page
    assert "TEST-0001" not in shown.client().get("/").text  # the job page only


# ----- retry -----

def test_retry_needs_the_token_in_the_body_or_header(node: Node) -> None:
    failed, other = node.failed(), node.failed()
    client = node.client()
    page = client.get(f"/jobs/{failed}").text
    assert '<form id="retry" method="post" action="/jobs/%d/retry">' % failed in page
    assert TOKEN not in page  # the page never holds the token
    events = len(repo.get_job(node.db, failed).events)

    refused = [client.post(f"/jobs/{failed}/retry", data={"token": "wrong-token-of-some-length"}),
               client.post(f"/jobs/{failed}/retry", data={}),
               client.post(f"/jobs/{failed}/retry", data={"token": ""}),
               client.post(f"/jobs/{failed}/retry?token={TOKEN}"),  # never from a URL
               client.post(f"/jobs/{failed}/retry", headers={"X-Cxrnode-Token": TOKEN[:-1]}),
               client.post(f"/jobs/{failed}/retry", content=f"token={TOKEN}",
                           headers={"content-type": "text/plain"})]
    for answer in refused:
        assert answer.status_code == 403 and "Nothing was changed" in text_of(answer.text)
    assert client.get(f"/jobs/{failed}/retry?token={TOKEN}").status_code == 405
    job = repo.get_job(node.db, failed)
    assert job.status == JobStatus.FAILED and len(job.events) == events

    answer = client.post(f"/jobs/{failed}/retry", data={"token": TOKEN})
    assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{failed}?retried=1"
    job = repo.get_job(node.db, failed)
    assert job.status == JobStatus.ENCODED  # it has results: sent again
    assert (job.events[-1].step, job.events[-1].outcome, job.events[-1].to_status) == ("retry", "ok", "encoded")
    after = client.get(answer.headers["location"]).text
    assert "Retried" in text_of(after) and 'state state-encoded">encoded</span>' in after

    again = client.post(f"/jobs/{failed}/retry", headers={"X-Cxrnode-Token": TOKEN})
    assert again.status_code == 409 and "not failed" in text_of(again.text)
    assert client.post("/jobs/999/retry", headers={"X-Cxrnode-Token": TOKEN}).status_code == 404

    assert client.post(f"/jobs/{other}/retry", headers={"X-Cxrnode-Token": TOKEN}).status_code == 303
    assert node.status(other) == JobStatus.ENCODED


def test_without_a_token_retry_is_disabled_and_the_page_says_how_to_enable_it(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    failed = node.failed()
    client = node.client()
    page = client.get(f"/jobs/{failed}").text
    assert '<form id="retry"' not in page and "set [web] token" in text_of(page)
    for answer in (client.post(f"/jobs/{failed}/retry", data={"token": ""}),
                   client.post(f"/jobs/{failed}/retry", headers={"X-Cxrnode-Token": "anything-at-all-16"})):
        assert answer.status_code == 403 and "[web] token is empty" in text_of(answer.text)
    assert node.status(failed) == JobStatus.FAILED


# ----- audit -----

def test_audit_page_lists_associations_and_steps_since_a_time(node: Node) -> None:
    peer = audit.Peer("127.0.0.1", 40000, "MODALITY", "CXRNODE")
    audit.association_ended(node.db, audit.record(node.db, peer, "accepted"), "released", audit.Counts(c_store=1))
    job_id = node.done()
    client = node.client()
    page = client.get("/audit")
    rows = table_rows(page.text, "audit")
    trail = audit.trail(node.db)
    assert len(rows) == len(trail)
    assert [(r[1], r[2]) for r in rows] == [(e.subject, e.what) for e in reversed(trail)]  # newest first
    assert any("MODALITY@127.0.0.1:40000 -> CXRNODE" in r[3] for r in rows)
    assert f'<a href="/jobs/{job_id}">job {job_id}</a>' in page.text
    assert "No audit entries since" in text_of(client.get("/audit?since=2999-01-01T00:00").text)
    assert len(table_rows(client.get("/audit?since=1h").text, "audit")) == len(trail)
    bad = client.get("/audit?since=yesterday")
    assert bad.status_code == 400 and "neither a duration" in text_of(bad.text)
