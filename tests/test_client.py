"""The backend client: waiting with backoff, typed errors, retries, and the CLI over real loopback HTTP."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from app import client
from app.client import Jobs, JobStatus, ModalJobs, RemoteJobFailed, RunPodJobs, TransportError, WaitTimeout
from app.jobs import normalize_error
from app.jobs_api import ThreadBackend, create_app
from tests.helpers_net import http_server, served

TOKEN = "cli-token-0123456789abcdef"


class ScriptedJobs(Jobs):
    """A job that reports the given states in turn (the wait loop is what is under test here)."""

    def __init__(self, states):
        self.states, self.polls = list(states), 0

    def submit(self, input, webhook=None):
        return "job-1"

    def status(self, job_id):
        self.polls += 1
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return JobStatus(id=job_id, state=state, output={"ok": 1} if state == "COMPLETED" else None,
                         error={"type": "job_failed", "message": "boom"} if state == "FAILED" else None)

    def cancel(self, job_id):
        return JobStatus(id=job_id, state="CANCELLED")


def test_wait_backs_off_up_to_the_cap_then_returns_completed():
    sleeps: list[float] = []
    jobs = ScriptedJobs(["IN_QUEUE"] * 3 + ["IN_PROGRESS"] * 3 + ["COMPLETED"])
    out = jobs.wait("job-1", timeout=60, first_poll_s=0.5, max_poll_s=1.5, backoff=2, sleep=sleeps.append)
    assert out.state == "COMPLETED" and out.output == {"ok": 1}
    assert sleeps == [0.5, 1.0, 1.5, 1.5, 1.5, 1.5]
    assert jobs.polls == 7


@pytest.mark.parametrize("final", ["FAILED", "CANCELLED", "TIMED_OUT"])
def test_wait_raises_job_failed_for_other_final_states(final):
    with pytest.raises(RemoteJobFailed) as e:
        ScriptedJobs(["IN_PROGRESS", final]).wait("job-1", sleep=lambda s: None)
    assert e.value.status.state == final and final in str(e.value)


def test_wait_times_out_with_the_last_state():
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout) as e:
        ScriptedJobs(["IN_PROGRESS"]).wait("job-1", timeout=0.3, first_poll_s=0.05, max_poll_s=0.05)
    assert 0.25 < time.monotonic() - t0 < 2
    assert e.value.last.state == "IN_PROGRESS" and e.value.job_id == "job-1"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api_is_a_transport_error_without_the_key():
    jobs = RunPodJobs("ep", "secret-key-123456", base_url=f"http://127.0.0.1:{_closed_port()}/v2", attempts=2)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as e:
        jobs.status("abc")
    assert time.monotonic() - t0 < 5
    assert "cannot connect" in str(e.value) and "secret-key" not in str(e.value)
    assert e.value.status_code is None


def test_status_is_retried_on_503_but_submit_is_not():
    # httpx's MockTransport stands in for a flaky API: the retry policy is what is under test.
    calls: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        calls.append(request.method + " " + request.url.path)
        assert request.headers["authorization"] == "Bearer tok-0123456789abcdef"
        if len(calls) == 1 or request.url.path.endswith("/run"):
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json={"id": "j1", "status": "IN_PROGRESS"})

    jobs = ModalJobs("http://api", "tok-0123456789abcdef", http=httpx.Client(transport=httpx.MockTransport(api)))
    assert jobs.status("j1").state == "IN_PROGRESS"
    assert calls == ["GET /status/j1", "GET /status/j1"]
    with pytest.raises(TransportError) as e:
        jobs.submit({"prompt": "x"})
    assert e.value.status_code == 503 and calls[-1] == "POST /run" and len(calls) == 3


def test_errors_are_normalized_and_tracebacks_dropped():
    sdk = json.dumps({"error_type": "<class 'RuntimeError'>", "error_message": "boom",
                      "error_traceback": "Traceback (most recent call last): secret stuff"})
    assert normalize_error(sdk) == {"type": "worker_exception", "message": "boom"}
    assert normalize_error({"type": "invalid_input", "message": "m", "field": "width", "x": 1}) == {
        "type": "invalid_input", "message": "m", "field": "width"}
    assert normalize_error("plain text") == {"type": "job_failed", "message": "plain text"}
    assert normalize_error(None)["type"] == "job_failed"


def test_job_ids_cannot_change_the_path():
    seen: list[str] = []

    def api(request):
        seen.append(request.url.raw_path.decode())
        return httpx.Response(200, json={"id": "x", "status": "IN_QUEUE"})

    jobs = ModalJobs("http://api", "tok-0123456789abcdef", http=httpx.Client(transport=httpx.MockTransport(api)))
    jobs.status("../cancel/x")
    assert seen == ["/status/..%2Fcancel%2Fx"]


# ------------------------------------------------------------------------------------ CLI, real HTTP


@pytest.fixture
def api_url(tiny_flux_service):
    """The job API served by uvicorn on 127.0.0.1 over the in-process backend (a real HTTP server)."""
    backend = ThreadBackend(tiny_flux_service.run)
    with served(create_app(backend, TOKEN)) as port:
        yield f"http://127.0.0.1:{port}"
    backend.shutdown()


def test_cli_submit_wait_status_cancel(api_url, capsys):
    env = {"API_TOKEN": TOKEN}
    assert client.main(["--modal", api_url, "submit", '{"prompt": "a cat", "seed": 2}', "--wait",
                        "--timeout", "60"], env) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["status"] == "COMPLETED" and done["output"]["images"][0]["seed"] == 2

    assert client.main(["submit", '{"prompt": "a cat", "seed": 2}'], env | {"MODAL_API_URL": api_url}) == 0
    job_id = json.loads(capsys.readouterr().out)["id"]
    assert client.main(["--modal", api_url, "wait", job_id, "--timeout", "60"], env) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "COMPLETED"
    assert client.main(["--modal", api_url, "status", job_id], env) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job_id
    assert client.main(["--modal", api_url, "cancel", job_id], env) == 0  # already done: stays COMPLETED
    assert json.loads(capsys.readouterr().out)["status"] == "COMPLETED"


def test_cli_exit_codes(api_url, capsys):
    env = {"API_TOKEN": TOKEN}
    assert client.main(["--modal", api_url, "submit", '{"prompt": "x", "width": 100}', "--wait"], env) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["error"]["type"] == "invalid_input" and "FAILED" in out.err
    assert client.main(["--modal", api_url, "status", "nope"], {"API_TOKEN": "wrong-token-0123456789"}) == 3
    err = capsys.readouterr().err
    assert "401" in err and "wrong-token" not in err
    assert client.main(["--modal", api_url, "submit", "not json"], env) == 2
    assert client.main(["status", "x"], {}) == 2  # no endpoint given anywhere
    assert client.main(["--modal", api_url, "status", "x"], {}) == 2  # no token


# ------------------------------------------------------- what a server sends back is scrubbed

SECRET_TOKEN = "Tk9+/abc=DEF-ghijkl0123456789"


@pytest.fixture
def reflector():
    """An upstream on 127.0.0.1 that reflects the request's headers into its answers, the way a
    misconfigured proxy or debug endpoint does; the path picks the status and the shape."""
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import quote

    class Reflect(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def answer(self):
            auth = self.headers.get("Authorization", "")
            token = auth.split(" ", 1)[-1]
            route = self.path.split("/")[-1]
            bodies = {
                "text400": (400, f"bad request; you sent Authorization: {auth}"),
                "json404": (404, json.dumps({"error": "no such job", "headers": {"authorization": auth}})),
                "raw422": (422, f"token {token} is not allowed here"),
                "quoted400": (400, f"redirect to /login?next=%2F&key={quote(token, safe='')}"),
                "cut400": (400, "x" * 190 + token + " trailing"),
                "signed400": (400, "see https://b.s3/k.png?X-Amz-Signature=deadbeef0123&X-Amz-Credential=AKIA/x"),
                "json500": (500, json.dumps({"echo": auth})),
                "failed200": (200, json.dumps({"id": "j1", "status": "FAILED",
                                               "error": f"upstream rejected Authorization: {auth} ({token})"})),
            }
            status, body = bodies.get(route, (404, "no route"))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.answer()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.answer()

    with http_server(Reflect) as url:
        yield url


def assert_no_token(text: str) -> None:
    from urllib.parse import quote

    for form in (SECRET_TOKEN, quote(SECRET_TOKEN, safe=""), SECRET_TOKEN[:12], SECRET_TOKEN[-12:]):
        assert form not in text, (form, text)


@pytest.mark.parametrize("route", ["text400", "json404", "raw422", "quoted400", "cut400", "json500"])
def test_error_bodies_that_reflect_the_token_are_scrubbed(reflector, route):
    jobs = ModalJobs(reflector, SECRET_TOKEN, attempts=2)
    with pytest.raises(TransportError) as e:
        jobs.status(route)
    assert e.value.status_code in (400, 404, 422, 500)
    assert "REDACTED" in str(e.value)
    assert_no_token(str(e.value))


def test_signatures_in_error_bodies_are_scrubbed(reflector):
    with pytest.raises(TransportError) as e:
        ModalJobs(reflector, SECRET_TOKEN).status("signed400")
    assert "deadbeef0123" not in str(e.value) and "X-Amz-Signature=REDACTED" in str(e.value)


def test_a_job_error_that_reflects_the_token_is_scrubbed(reflector):
    jobs = ModalJobs(reflector, SECRET_TOKEN)
    status = jobs.status("failed200")
    assert status.state == "FAILED" and "REDACTED" in status.error["message"]
    assert_no_token(json.dumps(status.error))
    with pytest.raises(RemoteJobFailed) as e:
        jobs.wait("failed200", timeout=1, sleep=lambda s: None)
    assert_no_token(str(e.value))


def test_the_cli_prints_no_reflected_token(reflector, capsys):
    env = {"API_TOKEN": SECRET_TOKEN}
    assert client.main(["--modal", reflector, "status", "text400"], env) == 3
    assert client.main(["--modal", reflector, "status", "failed200"], env) == 0
    assert client.main(["--modal", reflector, "wait", "failed200", "--timeout", "1"], env) == 1
    out = capsys.readouterr()
    assert "REDACTED" in out.out + out.err
    assert_no_token(out.out + out.err)


def test_status_falls_back_to_post_on_405_and_remembers():
    """The RunPod SDK's local server (`--rp_serve_api`) serves POST /status only; ours and RunPod's GET."""
    calls: list[str] = []

    def api(request):
        calls.append(request.method)
        if request.method == "GET":
            return httpx.Response(405, json={"detail": "Method Not Allowed"})
        return httpx.Response(200, json={"id": "j1", "status": "COMPLETED", "output": {"ok": 1}})

    jobs = ModalJobs("http://api", "tok-0123456789abcdef", http=httpx.Client(transport=httpx.MockTransport(api)))
    assert jobs.status("j1").output == {"ok": 1}
    assert jobs.status("j1").state == "COMPLETED"
    assert calls == ["GET", "POST", "POST"]
