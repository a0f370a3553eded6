"""Loopback servers and subprocess handling shared by the API, client, RunPod and Modal tests."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.conftest import free_port


def wait_for(pred, timeout: float = 20, every: float = 0.05) -> bool:
    """Poll `pred` until it is true or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]):
    """A stdlib HTTP server for `handler` on 127.0.0.1 (threads per request); yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def served(app):
    """An ASGI app served by uvicorn on 127.0.0.1 (a real HTTP server, in a thread); yields its port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 10), "uvicorn did not start"
    try:
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(10)


class _Recording(BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.got.append((self.path, self.rfile.read(int(self.headers.get("Content-Length") or 0))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


@contextlib.contextmanager
def receiver():
    """A webhook receiver on 127.0.0.1 answering 204; yields (port, got): got holds (path, body) per POST."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    server.daemon_threads = True
    server.got = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], server.got
    finally:
        server.shutdown()
        server.server_close()


def stop(proc: subprocess.Popen) -> None:
    """End a subprocess a test started: terminate, then kill if it does not exit in 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
