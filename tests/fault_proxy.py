"""A fault-injecting HTTP proxy on loopback, in front of moto's S3 server.

boto3 is pointed at it with AWS_ENDPOINT_URL_S3, exactly as at a real endpoint. For every request
`decide(method, path)` names what happens:

  pass          forwarded, the answer relayed
  500           InternalError XML, nothing forwarded
  503           SlowDown XML (S3's throttling answer), nothing forwarded
  reset-before  TCP reset before forwarding: the request never reached the store
  reset-after   forwarded, then TCP reset: the store acted (a PUT landed) but the answer is lost
  stall-before  no answer until past the client's read timeout, then reset; nothing forwarded
  stall-after   forwarded, then the same stall: the store acted, the client times out
  short         forwarded; a HEAD answer reports one byte less than stored (a truncated object)
  freeze        nothing forwarded, no answer, the connection held open: a frozen store. Held until
                the proxy is thawed (`thaw()`, or leaving the `with`) or `freeze_max_s` passes, then reset
  freeze-after  forwarded (the store acted: a PUT landed), then frozen the same way

`-after` faults are the ones that make a retried PUT interesting: the object is there, the
client believes it failed, and the retry must overwrite it with the same bytes.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: "FaultProxy"

    def handle_error(self, request, client_address):
        pass  # resets are deliberate here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server: _Server

    def log_message(self, *a):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _forward(self, body: bytes):
        up = urlsplit(self.server.proxy.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def _handle(self):
        proxy = self.server.proxy
        body = self._body()
        action = proxy.decide(self.command, self.path)
        proxy.record(action)
        if action in ERRORS:
            status, code, message = ERRORS[action]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<RequestId>fault</RequestId></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        if action in ("reset-before", "stall-before", "freeze"):
            if action == "stall-before":
                time.sleep(proxy.stall_s)
            if action == "freeze":
                proxy.thawed.wait(proxy.freeze_max_s)
            return self._reset()
        status, headers, payload = self._forward(body)
        if action in ("reset-after", "stall-after", "freeze-after"):
            if action == "stall-after":
                time.sleep(proxy.stall_s)
            if action == "freeze-after":
                proxy.thawed.wait(proxy.freeze_max_s)
            return self._reset()
        assert action in ("pass", "short"), action
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        # HEAD answers carry the object's length without a body: relay it as the store sent it.
        length = dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
        if action == "short" and length is not None:
            length = str(int(length) - 1)
        self.send_header("Content-Length", length if length is not None else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class FaultProxy:
    """Start with `with FaultProxy(upstream, decide) as proxy:`; `proxy.url` is the endpoint to use."""

    def __init__(self, upstream: str, decide: Callable[[str, str], str] | None = None, stall_s: float = 1.0,
                 freeze_max_s: float = 60.0):
        self.upstream, self.stall_s, self.freeze_max_s = upstream, stall_s, freeze_max_s
        self.thawed = threading.Event()
        self.decide = decide or (lambda method, path: "pass")
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def record(self, action: str) -> None:
        with self._lock:
            self.counts[action] += 1

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def thaw(self) -> None:
        """Release every frozen request (each is then reset)."""
        self.thawed.set()

    def __exit__(self, *exc) -> None:
        self.thaw()
        self._server.shutdown()
        self._server.server_close()
