"""The HTTP edge of a /metrics endpoint (an agent's, a node's): a server in a daemon thread
that answers GET /metrics with the text a function gives, 404 elsewhere, and never logs a
line per scrape."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kvsvr.monitor import prometheus

log = logging.getLogger("kvsvr.metrics")


def serve_metrics(address: str, text: Callable[[], str], owner: str) -> ThreadingHTTPServer:
    """Listen on HOST:PORT (OSError if it cannot be bound) and serve `text()` as /metrics;
    `owner` ("this agent", "a node") says who in the 404 answer."""
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self._answer(404, "text/plain; charset=utf-8",
                             f"not found: {owner} serves /metrics only\n".encode())
                return
            try:
                body = text().encode()
            except Exception as e:   # a bug must cost a scrape, never the process
                log.exception("/metrics failed")
                self._answer(500, "text/plain; charset=utf-8", f"{e}\n".encode())
                return
            self._answer(200, prometheus.CONTENT_TYPE, body)

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass           # scrapes are not worth a log line each

    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


__all__ = ["serve_metrics"]
