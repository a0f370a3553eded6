"""Request body caps on the jobs API (RunPod's: 10 MB for /run, 20 MB for /runsync): 413, decided from
the Content-Length before the body is read, and while a body without one streams in.

Through FastAPI's test client for the decisions, and through uvicorn on 127.0.0.1 with a raw socket
for the timing: a client that announces 50 MB and sends 1 KB gets its 413 at once (the server did
not wait for the body), and a chunked body is cut as soon as it passes the cap.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from fastapi.testclient import TestClient

from app.jobs_api import ThreadBackend, create_app
from app.limits import MAX_RUN_BODY_BYTES, MAX_RUNSYNC_BODY_BYTES
from tests.helpers_net import served

TOKEN = "limits-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
MB = 1000 * 1000


def body_of(size: int) -> bytes:
    """A valid run request of exactly `size` bytes (the prompt fills it; the job refuses it later)."""
    frame = b'{"input": {"prompt": "'
    tail = b'"}}'
    return frame + b"x" * (size - len(frame) - len(tail)) + tail


@pytest.fixture
def service_api(tiny_flux_service):
    backend = ThreadBackend(tiny_flux_service.run)
    with TestClient(create_app(backend, TOKEN)) as http:
        yield backend, http
    backend.shutdown()


@pytest.mark.parametrize("path, cap", [("/run", MAX_RUN_BODY_BYTES), ("/ep-1/run", MAX_RUN_BODY_BYTES),
                                       ("/runsync", MAX_RUNSYNC_BODY_BYTES), ("/ep-1/runsync", MAX_RUNSYNC_BODY_BYTES)])
def test_a_body_over_the_cap_is_413_one_under_is_taken(service_api, path, cap):
    backend, http = service_api
    over = http.post(path, content=body_of(cap + 1), headers=AUTH)
    assert over.status_code == 413 and f"over the {cap} byte limit" in over.json()["error"]
    assert not backend._jobs  # nothing queued
    at = http.post(path + ("?wait=0" if "sync" in path else ""), content=body_of(cap), headers=AUTH)
    assert at.status_code == 200, at.text[:200]  # exactly the cap: taken (the job then refuses the prompt)
    assert len(backend._jobs) == 1


def test_runsync_takes_what_run_refuses(service_api):
    backend, http = service_api
    body = body_of(15 * MB)
    assert http.post("/run", content=body, headers=AUTH).status_code == 413
    done = http.post("/runsync", content=body, headers=AUTH)
    assert done.status_code == 200 and done.json()["status"] == "FAILED"
    assert json.loads(done.json()["error"])["field"] == "prompt"  # through to the job, refused there


def test_a_body_without_content_length_is_counted_as_it_streams(service_api):
    backend, http = service_api
    sent = []

    def chunks(total: int, size: int = MB):
        for _ in range(total // size):
            sent.append(size)
            yield b" " * size  # JSON whitespace: a valid body if it were let through

    r = http.post("/run", content=chunks(11 * MB), headers=AUTH)  # a generator: chunked, no Content-Length
    assert r.status_code == 413 and "over the 10000000 byte limit" in r.json()["error"]
    small = http.post("/run", content=(c for c in [b'{"input": ', b'{"prompt": "a cat"}}']), headers=AUTH)
    assert small.status_code == 200 and small.json()["id"] in backend._jobs


def test_other_routes_are_capped_too(service_api):
    _, http = service_api
    assert http.post("/cancel/job-x", content=b" " * (MAX_RUN_BODY_BYTES + 1), headers=AUTH).status_code == 413
    assert http.post("/ep/status/job-x", content=b" " * (MAX_RUN_BODY_BYTES + 1), headers=AUTH).status_code == 413
    assert http.post("/cancel/job-x", headers=AUTH).status_code == 404  # no body: as before


def test_the_cap_is_checked_before_the_token(service_api):
    """An oversized body is refused unread even without a token: refusing costs nothing."""
    _, http = service_api
    r = http.post("/run", content=body_of(MAX_RUN_BODY_BYTES + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and TOKEN not in r.text


# ------------------------------------------------------------------ a real server, a raw socket


def read_status(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.fixture
def port(tiny_flux_service):
    backend = ThreadBackend(tiny_flux_service.run)
    with served(create_app(backend, TOKEN)) as p:
        yield p
    backend.shutdown()


def request_head(path: str, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("path", ["/run", "/runsync", "/my-endpoint/run"])
def test_an_announced_50_mb_body_is_refused_before_it_is_sent(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        t0 = time.monotonic()
        sock.sendall(request_head(path, f"Content-Length: {50 * MB}\r\n") + b"{" + b" " * 1023)  # 1 KB of 50 MB
        status, head = read_status(sock, timeout=3)
        assert status == 413 and time.monotonic() - t0 < 2, head


def test_a_chunked_body_is_cut_at_the_cap(port):
    """Chunks of 1 MB: the answer comes once the cap is passed, the terminating chunk never sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_head("/run", "Transfer-Encoding: chunked\r\n"))
        chunk = f"{MB:x}\r\n".encode() + b" " * MB + b"\r\n"
        for _ in range(MAX_RUN_BODY_BYTES // MB + 1):  # 11 MB: one chunk past the cap, bounded
            sock.sendall(chunk)
        status, head = read_status(sock, timeout=5)
        assert status == 413, head
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # the server is fine
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        assert read_status(sock, timeout=5)[0] == 200
