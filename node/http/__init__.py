"""The node's HTTP server: Prometheus ``/metrics``, ``/healthz`` and ``/readyz``, configured by ``[http]``.

- :mod:`node.http.metrics`: the metric objects, the hooks the listener, worker and sender call,
  and the collectors read at scrape time;
- :mod:`node.http.health`: liveness and readiness checks;
- :mod:`node.http.app`: the Starlette application and its routes (other modules plug in their own);
- :mod:`node.http.web`: the admin pages at ``/`` (``[web]``), plugged in by the app;
- :mod:`node.http.server`: uvicorn in a background thread of the node process.
"""
