"""Webhooks go through the input images' address guard: refused at submit (422 naming the field,
nothing queued, nothing contacted), checked again when called (a DNS answer may have changed),
connected to the checked address, never redirected.

A receiver runs on 127.0.0.1 (and a second one on 127.0.0.2 as a redirect target). The guard refuses
loopback, so the tests that must deliver open exactly 127.0.0.1/32 through FetchLimits.allow_networks
(the documented test seam); DNS cannot be steered on this machine, so name-to-address answers
(rebinding) come through the resolver seam. Jobs run on the real tiny service through the real API.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from app.client import ModalJobs, TransportError
from app.fetch import FetchLimits
from app.jobs import WEBHOOK_LIMITS, StatusBody, normalize_error, post_webhook
from app.jobs_api import ThreadBackend, create_app
from tests.conftest import captured_logs
from tests.hardening_helpers import tiny_job
from tests.helpers_net import wait_for

TOKEN = "webhook-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEAM = FetchLimits(allow_networks=("127.0.0.1/32",), connect_timeout_s=1, read_timeout_s=2, deadline_s=3)


class Receiver(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.got.append((self.server.server_address[0], self.path, self.headers.get("Host"), body))
        status, headers = self.server.answer
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receivers():
    """Two receivers on one port: 127.0.0.1 (reachable through the seam) and 127.0.0.2 (never reachable).
    Every address a test may wrongly contact is on loopback, so a broken guard is seen, never felt."""
    servers = []
    for ip in ("127.0.0.1", "127.0.0.2"):
        srv = ThreadingHTTPServer((ip, servers[0].server_address[1] if servers else 0), Receiver)
        srv.daemon_threads = True
        srv.got, srv.answer = [], (204, {})
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    yield servers
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def warnings():
    with captured_logs("WARNING") as lines:
        yield lines


def api(service, limits: FetchLimits = SEAM):
    backend = ThreadBackend(service.run, webhook_limits=limits)
    return backend, TestClient(create_app(backend, TOKEN, webhook_limits=limits))


class Recorder:
    """A backend that records what was submitted and runs nothing: a submit-time check that failed
    would show here, and no job (hence no webhook call to the refused address) ever runs."""

    def __init__(self):
        self.submitted = []

    def submit(self, input, webhook):
        self.submitted.append(webhook)
        return f"rec-{len(self.submitted)}"

    def status(self, job_id):
        return StatusBody(id=job_id, status="IN_QUEUE")

    def cancel(self, job_id):
        return StatusBody(id=job_id, status="CANCELLED")


# ------------------------------------------------------------------------------------ submit time

def forbidden_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/hook", f"http://127.0.0.2:{port}/hook",
        f"http://localhost:{port}/hook", f"http://[::1]:{port}/hook", f"http://[::ffff:127.0.0.1]:{port}/hook",
        f"http://[2002:7f00:1::]:{port}/hook", f"http://[64:ff9b::7f00:1]:{port}/hook",  # 6to4, NAT64
        f"http://2130706433:{port}/hook", f"http://0x7f000001:{port}/hook", f"http://127.1:{port}/hook",
        f"http://0177.0.0.1:{port}/hook",  # the resolver's legacy IPv4 spellings of 127.0.0.1
        "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://[2002:a9fe:a9fe::]/",
        "http://[::ffff:169.254.169.254]/", "http://10.0.0.7/hook", "http://192.168.1.1/hook",
        "http://172.16.0.1/hook", "http://100.64.0.1/hook", f"http://0.0.0.0:{port}/hook", "http://[fe80::1]/",
        "http://user:pw@example.com/hook", "http:///no-host", "http://example.com:99999/hook",
    ]


def test_submit_refuses_every_forbidden_webhook_naming_the_field(receivers, warnings):
    """The production guard (no seam), each spelling of an inside address; real resolver (numeric forms)."""
    port = receivers[0].server_address[1]
    backend = Recorder()
    with TestClient(create_app(backend, TOKEN, webhook_limits=WEBHOOK_LIMITS)) as http:
        for url in forbidden_urls(port):
            r = http.post("/run", json={"input": tiny_job(1), "webhook": url}, headers=AUTH)
            assert r.status_code == 422, (url, r.status_code, r.text)
            body = r.json()
            assert body["field"] == "webhook" and body["error"].startswith("webhook: "), (url, body)
            assert "pw" not in r.text and TOKEN not in r.text
            # the same under RunPod's endpoint-id path and /runsync
            for path in ("/ep-1/run", "/runsync", "/ep-1/runsync"):
                assert http.post(path, json={"input": tiny_job(1), "webhook": url},
                                 headers=AUTH).status_code == 422, (path, url)
        # a scheme other than http(s) is refused by the body's own validation, still naming the field
        for url in ("ftp://example.com/x", "file:///etc/passwd", "gopher://x/", "javascript:alert(1)"):
            r = http.post("/run", json={"input": tiny_job(1), "webhook": url}, headers=AUTH)
            assert r.status_code == 422 and "webhook" in r.text, url
    assert backend.submitted == []  # nothing was queued
    assert receivers[0].got == [] and receivers[1].got == []  # nothing was contacted
    assert any("job refused: webhook" in w for w in warnings)


def test_the_client_sees_the_refusal_as_a_422():
    backend = Recorder()
    with TestClient(create_app(backend, TOKEN)) as http:
        jobs = ModalJobs("http://testserver", TOKEN, http=http)
        with pytest.raises(TransportError) as e:
            jobs.submit(tiny_job(1), webhook="http://169.254.169.254/latest/meta-data/iam/")
        assert e.value.status_code == 422 and "metadata" in str(e.value) and "webhook" in str(e.value)
    assert backend.submitted == []


# -------------------------------------------------------------------------------------- send time

class Answers:
    """A resolver seam that gives each call the next answer (the last one repeats)."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, host, port):
        self.calls.append(host)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.mark.parametrize("later", [["127.0.0.2"], ["::ffff:127.0.0.2"], ["::ffff:127.0.0.1"], ["::1"],
                                   ["127.0.0.1", "127.0.0.2"]])
def test_webhook_checked_again_when_called(tiny_flux_service, receivers, warnings, later):
    """DNS answered 127.0.0.1 (the seam's) at submit, an address outside the seam when the job ends:
    not called. (Metadata and private answers are the same decision: tests/test_fetch.py, check_url.)"""
    port = receivers[0].server_address[1]
    resolver = Answers(["127.0.0.1"], later)
    limits = FetchLimits(allow_networks=SEAM.allow_networks, resolver=resolver, connect_timeout_s=1, deadline_s=3)
    backend, http = api(tiny_flux_service, limits)
    try:
        with http:
            r = http.post("/run", json={"input": tiny_job(2), "webhook": f"http://hooks.example.test:{port}/h"},
                          headers=AUTH)
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
            assert wait_for(lambda: backend.status(job_id).final)
            assert wait_for(lambda: any("not called" in w for w in warnings), 5), warnings
        assert resolver.calls == ["hooks.example.test", "hooks.example.test"]  # once at submit, once at the call
        assert receivers[0].got == [] and receivers[1].got == []
    finally:
        backend.shutdown()


def test_webhook_goes_to_the_checked_address_with_runpods_body(tiny_flux_service, receivers):
    """The name is resolved once per call and the connection goes to that answer (the Host header
    keeps the name); the body is RunPod's: `error` a string our client parses back."""
    port = receivers[0].server_address[1]
    resolver = Answers(["127.0.0.1"])
    limits = FetchLimits(allow_networks=SEAM.allow_networks, resolver=resolver, connect_timeout_s=1, deadline_s=3)
    backend, http = api(tiny_flux_service, limits)
    try:
        with http:
            hook = f"http://hooks.example.test:{port}/hook?sig=abc"
            ok = http.post("/run", json={"input": tiny_job(3), "webhook": hook}, headers=AUTH).json()["id"]
            bad = http.post("/ep-x/run", json={"input": {"prompt": "x", "width": 100}, "webhook": hook},
                            headers=AUTH).json()["id"]
            assert wait_for(lambda: len(receivers[0].got) == 2)
        bodies = {json.loads(b)["id"]: json.loads(b) for _, _, _, b in receivers[0].got}
        assert {(ip, path, host) for ip, path, host, _ in receivers[0].got} == {
            ("127.0.0.1", "/hook?sig=abc", f"hooks.example.test:{port}")}
        assert bodies[ok]["status"] == "COMPLETED" and bodies[ok]["output"]["images"][0]["seed"] == 3
        assert bodies[bad]["status"] == "FAILED" and isinstance(bodies[bad]["error"], str)
        assert normalize_error(bodies[bad]["error"]) == {"type": "invalid_input", "field": "width",
                                                         "message": "width: must be a multiple of 16"}
        assert resolver.calls.count("hooks.example.test") == 4  # submit + call, for each job
    finally:
        backend.shutdown()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_webhook_redirects_are_not_followed(receivers, warnings, status):
    first, other = receivers
    first.answer = (status, {"Location": f"http://127.0.0.2:{other.server_address[1]}/stolen"})
    sleeps: list[float] = []
    ok = post_webhook(f"http://127.0.0.1:{first.server_address[1]}/hook", StatusBody(id="j", status="COMPLETED"),
                      limits=FetchLimits(allow_networks=("127.0.0.1/32", "127.0.0.2/32"), deadline_s=3),
                      sleep=sleeps.append)
    assert ok is False and len(first.got) == 3 and other.got == []  # 3 tries, never the redirect target
    assert sleeps == [1, 2] and any("redirects are not followed" in w for w in warnings)


def test_a_refused_webhook_is_never_retried(receivers, warnings):
    sleeps: list[float] = []
    port = receivers[0].server_address[1]
    assert post_webhook(f"http://127.0.0.1:{port}/h", StatusBody(id="j", status="COMPLETED"),
                        sleep=sleeps.append) is False  # default limits: loopback refused
    assert sleeps == [] and receivers[0].got == [] and any("not called" in w for w in warnings)


def test_a_stalled_webhook_costs_its_deadline_only():
    """A receiver that accepts and never answers: each try ends at the deadline; bounded in all."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        t0 = time.monotonic()
        assert post_webhook(f"http://127.0.0.1:{srv.getsockname()[1]}/h", StatusBody(id="j", status="COMPLETED"),
                            limits=FetchLimits(allow_networks=("127.0.0.1/32",), read_timeout_s=5, deadline_s=0.5),
                            attempts=2, sleep=lambda s: None) is False
        assert time.monotonic() - t0 < 2.5
    finally:
        srv.close()


# ------------------------------------------------------------------------------------- on Modal

def test_modal_api_refuses_at_submit_and_spawns_nothing():
    """The Modal deployment's API (create_app over ModalBackend): a forbidden webhook never reaches
    `spawn`. Modal's cloud cannot be reached here: `spawn` is a recorder."""
    from modal_app import ModalBackend

    spawned = []

    class Call:
        object_id = "fc-abc123"

    backend = ModalBackend(spawn=lambda input, webhook: spawned.append(webhook) or Call(), marks={},
                           from_id=lambda i: None)
    public = FetchLimits(resolver=lambda h, p: ["93.184.216.34"])  # backend.example -> a public address
    with TestClient(create_app(backend, TOKEN, webhook_limits=public)) as http:
        for url in ("http://127.0.0.1:8000/h", "http://169.254.169.254/", "http://[2002:a9fe:a9fe::]/"):
            assert http.post("/run", json={"input": {"prompt": "x"}, "webhook": url}, headers=AUTH).status_code == 422
        assert spawned == []
        r = http.post("/run", json={"input": {"prompt": "x"}, "webhook": "https://backend.example/hook"}, headers=AUTH)
        assert r.status_code == 200 and spawned == ["https://backend.example/hook"]
