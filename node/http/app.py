"""The node's web application (Starlette): ``/metrics``, ``/healthz``, ``/readyz``, and whatever
other modules add.

Adding pages (the admin pages, say) takes a module with a ``routes`` function and one line in
:data:`ROUTE_MODULES`::

    # node/http/admin.py
    from starlette.routing import Route

    def routes(context: HttpContext) -> list[BaseRoute]:
        return [Route("/", lambda request: ..., methods=["GET"])]

Each module owns its paths; :func:`create_app` refuses two routes on one path, so a module cannot
shadow another's. :class:`HttpContext` hands every module the same things the node itself uses:
the settings, the queue, the archive, the health checks and the metrics.

Endpoints that read the database or the disk are plain ``def`` functions: Starlette runs them in
its thread pool, so a slow query never holds up the event loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from node.archive import Archive
from node.http.health import NodeHealth
from node.http.metrics import Exposition
from node.queue.db import Database
from node.settings import Settings

#: Modules (dotted names) whose ``routes(context)`` are added after the core routes, in order.
ROUTE_MODULES: tuple[str, ...] = ("node.http.web",)


@dataclass(frozen=True)
class HttpContext:
    """Everything a route may use, built once per process by :mod:`node.http.server`."""

    settings: Settings
    #: ``serve`` (listens and works), ``listener`` (serve with the worker disabled), ``worker``, or
    #: the ``--role`` names joined by ``+`` (:func:`node.http.server.role_of`).
    role: str
    db: Database
    archive: Archive
    health: NodeHealth
    exposition: Exposition


RouteProvider = Callable[[HttpContext], Sequence[BaseRoute]]


def core_routes(context: HttpContext) -> list[BaseRoute]:
    """``/metrics`` (Prometheus text, or OpenMetrics when the scraper asks for it), ``/healthz``
    and ``/readyz`` (JSON; 200 or 503)."""

    def metrics_endpoint(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(context.exposition), media_type=content_type)

    def healthz(_request: Request) -> Response:
        alive, body = context.health.liveness()
        return JSONResponse(body, status_code=200 if alive else 503)

    def readyz(_request: Request) -> Response:
        ready, body = context.health.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    return [Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"])]


def _module_routes(name: str) -> RouteProvider:
    provider = getattr(importlib.import_module(name), "routes", None)
    if not callable(provider):
        raise TypeError(f"{name} has no routes(context) function")
    return provider


def create_app(context: HttpContext, providers: Sequence[RouteProvider] | None = None) -> Starlette:
    """The application: :func:`core_routes`, then each provider's (default: those of
    :data:`ROUTE_MODULES`).

    Raises:
        ValueError: two routes claim the same path.
    """
    if providers is None:
        providers = [_module_routes(name) for name in ROUTE_MODULES]
    routes: list[BaseRoute] = []
    seen: dict[str, str] = {}
    for provider in (core_routes, *providers):
        for route in provider(context):
            path = getattr(route, "path", None)
            if path is not None:
                if path in seen:
                    raise ValueError(f"{path} is routed by both {seen[path]} and "
                                     f"{getattr(provider, '__module__', provider)}")
                seen[path] = str(getattr(provider, "__module__", provider))
            routes.append(route)
    app = Starlette(routes=routes)
    app.state.context = context
    return app
