"""The HTTP server in-process: real uvicorn on loopback, real queue database and archive folder.

What the served node reports end to end is in ``tests/e2e/test_metrics.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from node.archive import open_archive
from node.errors import SettingsError
from node.http import metrics
from node.http.app import HttpContext, core_routes, create_app
from node.http.server import HttpService
from node.queue.db import DATABASE_FILE, Database
from node.settings import load_settings
from tests.servers import free_port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def settings_for(tmp_path: Path, http: str = "port = 0\nworker_port = 0\n"):  # type: ignore[no-untyped-def]
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "c.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\nmin_free_disk_mb = 1\n[http]\n{http}'
                      '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n')
    return load_settings(config, env={})


class Node:
    """An :class:`HttpService` with the queue and archive of a data folder, as the Service makes it."""

    def __init__(self, tmp_path: Path, *, listen: bool = True, work: bool = False,
                 http: str = "port = 0\nworker_port = 0\n") -> None:
        self.settings = settings_for(tmp_path, http)
        self.db = Database(self.settings.data_path)
        self.archive = open_archive(self.settings)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.http = HttpService(self.settings, self.db, self.archive, listen=listen, work=work,
                                threads=lambda: self.threads, stop=self.stop)

    @property
    def url(self) -> str:
        assert self.http.address is not None
        return "http://%s:%d" % self.http.address

    def close(self) -> None:
        self.http.stop()
        self.db.dispose()


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    node = Node(tmp_path)
    node.http.start()
    yield node
    node.close()


def test_settings_defaults_listen_on_loopback_and_name_bad_keys(tmp_path: Path) -> None:
    http = load_settings(None, env={}).http
    assert (http.enabled, http.host, http.port, http.worker_port) == (True, "127.0.0.1", 8480, 8481)
    assert load_settings(None, env={"CXRNODE_HTTP_WORKER_PORT": "9000"}).http.worker_port == 9000
    for text, key in [("port = 70000\n", "http.port"), ("worker_port = -1\n", "http.worker_port"),
                      ("port = 9000\nworker_port = 9000\n", "http.worker_port"),
                      ('host = ""\n', "http.host"), ("enabled = 1\n", "http.enabled")]:
        with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
            settings_for(tmp_path, text)


def test_serves_on_loopback_by_default(tmp_path: Path) -> None:
    node = Node(tmp_path, http="port = 0\n")  # the default host
    node.http.start()
    try:
        assert node.http.address is not None and node.http.address[0] == "127.0.0.1"
        port = node.http.address[1]
        assert get(node.url + "/healthz")[0] == 200
    finally:
        node.close()
    assert node.http.address is None
    with pytest.raises(ConnectionRefusedError):  # stopped: the port is closed again
        _connect(port)


def _connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_disabled_opens_no_port(tmp_path: Path) -> None:
    port = free_port()
    node = Node(tmp_path, http=f"enabled = false\nport = {port}\n")
    node.http.start()
    try:
        assert node.http.address is None and not node.http.enabled
        with pytest.raises(ConnectionRefusedError):
            _connect(port)
    finally:
        node.close()


def test_worker_binds_worker_port_and_a_taken_port_names_the_key(tmp_path: Path) -> None:
    port = free_port()
    worker = Node(tmp_path / "w", listen=False, work=True, http=f"port = 0\nworker_port = {port}\n")
    worker.http.start()
    try:
        assert worker.http.address == ("127.0.0.1", port)
        clash = Node(tmp_path / "c", http=f"port = {port}\nworker_port = 0\n")
        with pytest.raises(SettingsError, match=rf"http\.port: cannot listen on 127\.0\.0\.1:{port}"):
            clash.http.start()
        clash.close()
    finally:
        worker.close()


@pytest.mark.sqlite_only("fails the database check by moving the SQLite file aside")
def test_readyz_names_each_failing_check(node: Node) -> None:
    status, body = get(node.url + "/readyz")
    assert status == 503 and json.loads(body)["failed"] == ["started"]
    node.http.mark_started()
    status, body = get(node.url + "/readyz")
    answer = json.loads(body)
    assert status == 200, body
    assert answer["status"] == "ready" and answer["failed"] == []
    assert set(answer["checks"]) == {"started", "database", "archive", "disk"}  # a listener loads no models

    # The archive's tmp folder (where every write starts) replaced by a file: fails as root too.
    tmp = node.archive.tmp
    shutil.rmtree(tmp)
    tmp.write_text("not a folder")
    try:
        status, body = get(node.url + "/readyz")
        answer = json.loads(body)
        assert status == 503 and answer["failed"] == ["archive"], body
        assert "NotADirectoryError" in answer["checks"]["archive"]["detail"]
        assert get(node.url + "/healthz")[0] == 200  # alive, just not ready
    finally:
        tmp.unlink()
        tmp.mkdir(mode=0o700)
    assert get(node.url + "/readyz")[0] == 200

    # The queue database file gone (a folder in its place): it cannot be opened.
    db_file = node.settings.data_path / DATABASE_FILE
    aside = db_file.with_name("aside.sqlite3")
    os.replace(db_file, aside)
    db_file.mkdir()
    try:
        status, body = get(node.url + "/readyz")
        answer = json.loads(body)
        assert status == 503 and answer["failed"] == ["database"], body
    finally:
        db_file.rmdir()
        os.replace(aside, db_file)
    assert get(node.url + "/readyz")[0] == 200

    node.stop.set()
    status, body = get(node.url + "/readyz")
    assert status == 503 and json.loads(body)["checks"]["started"]["detail"] == "stopping"


def test_readyz_waits_for_the_models_of_a_worker(tmp_path: Path) -> None:
    worker = Node(tmp_path, listen=False, work=True)
    worker.http.start()
    worker.http.mark_started()
    previous = metrics.loaded_models()
    try:
        metrics.MODEL_INFO.labels = None
        status, body = get(worker.url + "/readyz")
        assert status == 503 and json.loads(body)["failed"] == ["models"], body
        assert "cxrnode_model_info" not in get(worker.url + "/metrics")[1]
        analyzer = SimpleNamespace(
            device="cpu", runtime="onnx",
            segmenter_identity=SimpleNamespace(name="lung-unet", version="1", sha256="a" * 64),
            tb_identity=SimpleNamespace(name="tb-scorer", version="2", sha256="b" * 64))
        metrics.models_loaded("unet", analyzer, 0.27637559175491333)
        assert get(worker.url + "/readyz")[0] == 200
        found = samples(get(worker.url + "/metrics")[1])
        info = [labels for (name, labels) in found if name == "cxrnode_model_info"]
        assert info == [tuple(sorted({
            "architecture": "unet", "device": "cpu", "runtime": "onnx", "segmenter": "lung-unet",
            "segmenter_version": "1", "segmenter_sha256": "a" * 64, "tb_model": "tb-scorer", "tb_model_version": "2",
            "tb_model_sha256": "b" * 64, "tb_threshold": "0.276376"}.items()))]
        # A worker does not export the queue's gauges (the listener does: no double counting).
        assert not any(name.startswith("cxrnode_jobs") for name, _ in found)
        assert found[("cxrnode_build_info", (("role", "worker"), ("version", "0.1.0")))] == 1
    finally:
        metrics.MODEL_INFO.labels = previous
        worker.close()


def test_healthz_reports_a_dead_thread_and_a_stop(node: Node) -> None:
    node.http.mark_started()
    done = threading.Event()
    alive = threading.Thread(target=done.wait, name="sender", daemon=True)
    dead = threading.Thread(target=lambda: None, name="worker")
    alive.start()
    dead.start()
    dead.join()
    node.threads.append(alive)
    try:
        assert get(node.url + "/healthz") == (200, '{"status":"alive","threads":{"sender":"alive"}}')
        node.threads.append(dead)
        status, body = get(node.url + "/healthz")
        assert status == 503 and json.loads(body)["dead_threads"] == ["worker"]
        node.stop.set()
        status, body = get(node.url + "/healthz")
        assert status == 503 and json.loads(body)["status"] == "stopping"
    finally:
        done.set()


def test_metrics_count_stores_sends_and_the_queue(node: Node) -> None:
    before = samples(get(node.url + "/metrics")[1])
    handler = metrics.instrument_store(lambda event, ctx: {"ok": 0x0000, "bad": 0xA900}[ctx])
    for ctx in ("ok", "ok", "bad"):
        handler(None, ctx)

    @metrics.instrument_store
    def broken(event: object) -> int:
        raise RuntimeError("handler bug")
    with pytest.raises(RuntimeError):
        broken(None)
    started = metrics.now()
    metrics.send_attempted("pacs", None, started)
    metrics.send_attempted("pacs", "association rejected", started)
    metrics.observe_stage("no such stage", 1.0)  # logged, never raised

    after = samples(get(node.url + "/metrics")[1])

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)
    assert delta("cxrnode_cstore_total", status="0x0000") == 2
    assert delta("cxrnode_cstore_total", status="0xA900") == 1
    assert delta("cxrnode_cstore_total", status="exception") == 1
    assert delta("cxrnode_stage_duration_seconds_count", stage="receive") == 4
    assert delta("cxrnode_send_attempts_total", destination="pacs") == 2
    assert delta("cxrnode_send_failures_total", destination="pacs") == 1
    assert delta("cxrnode_stage_duration_seconds_count", stage="sending") == 1
    assert after[("cxrnode_jobs", (("state", "queued"),))] == 0
    assert after[("cxrnode_queue_up", ())] == 1
    assert after[("cxrnode_data_disk_free_bytes", ())] > 0
    assert after[("cxrnode_data_disk_min_free_bytes", ())] == 2**20
    assert after[("cxrnode_build_info", (("role", "listener"), ("version", "0.1.0")))] == 1
    # metric_names() (what dashboards are checked against) knows every name the node shows
    shown = {name for name, _ in after if name.startswith("cxrnode_")}
    assert shown and shown <= metrics.metric_names(), shown - metrics.metric_names()


def test_other_modules_plug_in_routes_and_cannot_shadow_one(node: Node) -> None:
    context = HttpContext(
        settings=node.settings, role="listener", db=node.db, archive=node.archive,
        health=node.http.health, exposition=metrics.exposition("listener"))

    def admin(_context: object) -> list[Route]:
        return [Route("/", lambda request: PlainTextResponse("admin"), methods=["GET"])]
    app = create_app(context, [admin])
    assert [r.path for r in app.routes] == [r.path for r in core_routes(context)] + ["/"]

    def shadow(_context: object) -> list[Route]:
        return [Route("/metrics", lambda request: PlainTextResponse(""), methods=["GET"])]
    with pytest.raises(ValueError, match="/metrics is routed by both"):
        create_app(context, [admin, shadow])
