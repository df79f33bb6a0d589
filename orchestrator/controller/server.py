"""The controller's HTTP endpoints: Prometheus `/metrics` and a read-only JSON API.

  GET /metrics          Prometheus text format (controller counters, jobs by state, live job series)
  GET /jobs             [{job without its config}], oldest first; `?state=RUNNING` filters
  GET /jobs/<id>        {job with its resolved config, its transitions and its attempts}, 404 when unknown
  GET /healthz          "ok"

Everything else is 404 (unknown path) or 405 (any method but GET/HEAD): the API never changes
state; submitting and stopping go through `mmpt submit` / `mmpt jobs stop`, which authenticate to
the cluster. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.controller.metrics import ControllerMetrics
from orchestrator.controller.registry import Registry
from orchestrator.controller.state import STATES

log = logging.getLogger("mmpt.controller")


class _Handler(BaseHTTPRequestHandler):
    registry: Registry
    metrics: ControllerMetrics
    server_version = "mmpt-controller"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        if path == "/metrics":
            self._send(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/jobs":
            states = parse_qs(url.query).get("state")
            bad = [s for s in states or [] if s not in STATES]
            if bad:
                self._json(400, {"error": f"state {bad[0]!r}: allowed {', '.join(STATES)}"})
                return
            jobs = self.registry.jobs(states)  # type: ignore[arg-type]
            self._json(200, [j.to_json(with_config=False) for j in jobs])
        elif path.startswith("/jobs/"):
            job_id = path[len("/jobs/"):]
            rec = self.registry.get(job_id)
            if rec is None:
                self._json(404, {"error": f"no job {job_id!r} in the registry"})
            else:
                self._json(200, rec.to_json() | {"transitions": self.registry.transitions(job_id),
                                                 "attempts": self.registry.attempts(job_id)})
        else:
            self._json(404, {"error": f"no such path {path!r}; try /metrics, /jobs, /jobs/ID"})

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _refuse(self) -> None:
        self._json(405, {"error": "read-only API: only GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, (json.dumps(obj, default=float) + "\n").encode(), "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if code == 405:
            self.send_header("Allow", "GET, HEAD")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


def start_server(registry: Registry, metrics: ControllerMetrics, host: str = "127.0.0.1",
                 port: int = 9400) -> ThreadingHTTPServer:
    """Serve in a daemon thread; returns the server (`.server_address`, `.shutdown()`).

    `registry` should be a connection of the API's own, not the reconcile loop's: a Registry
    serialises its statements under one lock, so a slow commit there would hold every request.
    """
    handler = type("Handler", (_Handler,), {"registry": registry, "metrics": metrics})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="mmpt-http", daemon=True).start()
    return server
