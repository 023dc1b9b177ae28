"""A fault-injecting HTTP proxy for tests: put it in front of an S3 server and some requests fail.

Clients use the proxy's URL as their S3 endpoint. Each request is either answered by the proxy with
``503 SlowDown`` (what S3 says when it throttles), dropped (the connection closed without an answer, as a
load balancer or a flaky network does), or forwarded byte for byte (the Host header included, so request
signatures stay valid) and its answer passed back. Faults happen before the request reaches the server, so
a retried request never finds half of its work done. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
# Hop-by-hop headers the proxy handles itself (it reads whole bodies and answers 100-continue).
_NOT_FORWARDED = {"connection", "keep-alive", "expect", "transfer-encoding", "proxy-connection"}


@dataclass
class FaultProxy:
    """A running proxy: ``endpoint_url`` for clients, ``counts`` of what it did with each request."""

    upstream: str
    throttle: float = 0.3  # share of requests answered 503 SlowDown
    drop: float = 0.05  # share of requests whose connection is closed without an answer
    seed: int = 0
    counts: Counter = field(default_factory=Counter)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        upstream = urlparse(self.upstream)
        rng = random.Random(self.seed)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                with proxy._lock:
                    draw = rng.random()
                if draw < proxy.throttle:
                    proxy._count("throttled")
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if draw < proxy.throttle + proxy.drop:
                    proxy._count("dropped")
                    self.close_connection = True
                    self.connection.close()
                    return
                proxy._count("forwarded")
                connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
                try:
                    connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _NOT_FORWARDED and name.lower() != "content-length":
                            connection.putheader(name, value)
                    connection.putheader("Content-Length", str(len(body)))
                    connection.endheaders(body)
                    answer = connection.getresponse()
                    payload = answer.read()
                finally:
                    connection.close()
                self.send_response(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in _NOT_FORWARDED and name.lower() != "content-length":
                        self.send_header(name, value)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else len(payload)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients that give up on a dropped or slow connection are expected here, not worth a trace."""
