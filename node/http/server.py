"""Run the node's web application inside the node process: uvicorn in a background thread.

Why uvicorn (with Starlette, :mod:`node.http.app`): both are small, widely used and maintained
(the stack under FastAPI), pure Python with h11 for HTTP/1.1, and uvicorn's ``Server`` is made to
be embedded: it runs its own asyncio loop in whatever thread calls ``run``, leaves signal handling
to the main thread (the node's warm stop stays the node's), and stops when ``should_exit`` is
set. The socket is bound here, before the thread starts, so that a port already in use stops
start-up with a message naming the key (``http.port`` / ``http.worker_port``) instead of a
thread dying quietly, and port 0 (tests) reports the port it got.

Which port a process uses: one that listens for DICOM (``cxrnode serve``, or a ``--role`` with
``receiver``) binds ``http.port``; any other (``cxrnode worker``, ``--role worker``, ``--role
sender``) binds ``http.worker_port``, so a receiver and a worker run from one configuration file on
one host (more processes on one host each need their own ``CXRNODE_HTTP_WORKER_PORT``). Each serves its own ``/metrics`` (see ``docs/ARCHITECTURE.md``, "Decisions").
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable

from node.archive import Archive
from node.errors import SettingsError
from node.http import metrics
from node.http.health import NodeHealth
from node.queue.db import Database
from node.settings import Settings

log = logging.getLogger(__name__)

#: Seconds the server waits for requests in flight when the node stops.
GRACE_S = 2.0
#: Seconds the server may take to come up.
START_TIMEOUT_S = 10.0


def role_of(*, listen: bool, work: bool, send: bool | None = None) -> str:
    """The process's role in ``cxrnode_build_info`` and its HTTP context: ``serve`` (receiver,
    worker and sender), ``listener`` (receiver only), ``worker`` (worker and sender), else the
    roles it runs joined by ``+`` (``receiver+sender``, ``sender``, ``inference``); empty: none,
    a test's bare Service. ``send`` defaults to ``work``."""
    send = work if send is None else send
    if listen and work and send:
        return "serve"
    if listen and not (work or send):
        return "listener"
    if work and send and not listen:
        return "worker"
    return "+".join(name for name, on in (("receiver", listen), ("inference", work), ("sender", send)) if on)


def role_listens(role: str) -> bool:
    """Whether a process of ``role`` (see :func:`role_of`) runs the DICOM listener."""
    return role in ("serve", "listener") or "receiver" in role.split("+")


def bind(host: str, port: int, key: str) -> socket.socket:
    """A listening TCP socket on ``host``:``port``.

    Raises:
        SettingsError: naming ``key``, when the address cannot be bound (in use, not local).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SettingsError(f"http.host: cannot listen on {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise SettingsError(f"{key}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class HttpService:
    """The HTTP server of one node process and the health it reports.

    Created with the :class:`node.service.Service` (nothing is opened then); :meth:`start` binds
    and serves, :meth:`mark_started` makes ``/readyz`` ready once start-up is over, :meth:`stop`
    ends it. With ``[http] enabled = false``, or in a Service that neither listens nor works
    (unit tests), no port is opened and every method does nothing.
    """

    def __init__(self, settings: Settings, db: Database, archive: Archive, *, listen: bool,
                 work: bool, threads: Callable[[], Iterable[threading.Thread]],
                 stop: threading.Event, send: bool | None = None) -> None:
        self.settings, self.db, self.archive = settings, db, archive
        self.listen, self.work = listen, work
        self.send = work if send is None else send
        self.role = role_of(listen=listen, work=work, send=self.send)
        self.health = NodeHealth(data_path=settings.data_path, archive=archive,
                                 min_free_bytes=settings.node.min_free_disk_mb * 2**20, work=work,
                                 threads=threads, stop=stop, db=db)
        self.address: tuple[str, int] | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.http.enabled and bool(self.role)

    def start(self) -> None:
        """Bind and serve in a daemon thread.

        Raises:
            SettingsError: the port cannot be bound (the message names the key).
            RuntimeError: the server did not come up within :data:`START_TIMEOUT_S`.
        """
        if not self.enabled:
            if self.role:
                log.info("http: disabled ([http] enabled = false): no /metrics, /healthz, /readyz")
            return
        import uvicorn

        from node.http.app import HttpContext, create_app

        cfg = self.settings.http
        metrics.prepare(listen=self.listen, work=self.work, send=self.send,
                        destinations=[d.name for d in self.settings.destinations])
        exposition = metrics.exposition(
            self.role, db=self.db if self.listen else None, data_path=self.settings.data_path,
            min_free_bytes=self.settings.node.min_free_disk_mb * 2**20)
        context = HttpContext(settings=self.settings, role=self.role, db=self.db,
                              archive=self.archive, health=self.health, exposition=exposition)
        port, key = (cfg.port, "http.port") if self.listen else (cfg.worker_port, "http.worker_port")
        sock = bind(cfg.host, port, key)
        logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))
        config = uvicorn.Config(create_app(context), log_config=None, access_log=False,
                                lifespan="off", loop="asyncio", http="h11", ws="none",
                                server_header=False, timeout_graceful_shutdown=GRACE_S)
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive():
                sock.close()
                raise RuntimeError("the HTTP server stopped during start-up (see the log above)")
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the HTTP server did not start within {START_TIMEOUT_S:g} s")
            time.sleep(0.02)
        host, bound = sock.getsockname()[:2]
        self.address = (host, bound)
        log.info("http: /metrics, /healthz, /readyz on http://%s:%d (%s)", _url_host(host), bound,
                 self.role)

    def mark_started(self) -> None:
        self.health.mark_started()

    def stop(self) -> None:
        """Stop serving (requests in flight get :data:`GRACE_S`)."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=GRACE_S + 3)
        self._server = self._thread = None
        self.address = None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
