"""The job HTTP API (RunPod's semantics) over the in-process ThreadBackend and the real tiny service,
driven by the backend client `ModalJobs` through FastAPI's test client."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient

from app.client import ModalJobs, RemoteJobFailed, TransportError
from app.jobs_api import ThreadBackend, create_app
from tests.helpers_net import receiver, wait_for

TOKEN = "api-token-0123456789abcdef"


@pytest.fixture
def backend(tiny_flux_service):
    b = ThreadBackend(tiny_flux_service.run)
    yield b
    b.shutdown()


@pytest.fixture
def http(backend):
    with TestClient(create_app(backend, TOKEN)) as client:
        yield client


@pytest.fixture
def jobs(http):
    return ModalJobs("http://testserver", TOKEN, http=http)


def test_a_job_is_queued_then_completed_with_its_image(jobs):
    job_id = jobs.submit({"prompt": "a red cat", "seed": 3})
    assert jobs.status(job_id).state in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    done = jobs.wait(job_id, timeout=60, first_poll_s=0.05)
    assert done.state == "COMPLETED" and done.error is None
    image = done.output["images"][0]
    assert Path(urlparse(image["url"]).path).stat().st_size == image["bytes"] > 0
    assert image["key"] == f"{job_id}/0.png"


def test_run_answers_runpod_shape(http):
    r = http.post("/run", json={"input": {"prompt": "a dog", "seed": 1}}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert set(r.json()) == {"id", "status"} and r.json()["status"] == "IN_QUEUE"


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", f"Basic {TOKEN}", "Bearer ", TOKEN])
def test_missing_or_wrong_token_gets_401_on_every_route(http, header):
    headers = {"Authorization": header} if header is not None else {}
    for method, path in (("POST", "/run"), ("GET", "/status/job-x"), ("POST", "/cancel/job-x")):
        r = http.request(method, path, headers=headers, json={"input": {"prompt": "x"}})
        assert r.status_code == 401, (method, path, header)
        assert r.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in r.text


def test_the_api_refuses_to_run_without_a_token(backend):
    for token in ("", "short"):
        with pytest.raises(ValueError, match="API_TOKEN"):
            create_app(backend, token)


def test_invalid_input_ends_failed_with_the_field(jobs):
    job_id = jobs.submit({"prompt": "a cat", "width": 100})
    with pytest.raises(RemoteJobFailed) as e:
        jobs.wait(job_id, timeout=30, first_poll_s=0.05)
    assert e.value.status.state == "FAILED"
    assert e.value.status.error == {"type": "invalid_input", "field": "width",
                                    "message": "width: must be a multiple of 16"}


def test_unknown_job_is_404_and_bad_body_is_422(jobs, http):
    with pytest.raises(TransportError) as e:
        jobs.status("job-does-not-exist")
    assert e.value.status_code == 404
    r = http.post("/run", json={"prompt": "no input wrapper"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422


def test_cancel_a_queued_job_it_never_runs(tiny_flux_service):
    """One worker thread held on the first job: the second waits IN_QUEUE and is cancelled there."""
    gate, ran = threading.Event(), []

    def run(raw, job_id):
        ran.append(job_id)
        gate.wait(30)
        return tiny_flux_service.run(raw, job_id)

    backend = ThreadBackend(run)
    try:
        with TestClient(create_app(backend, TOKEN)) as http:
            jobs = ModalJobs("http://testserver", TOKEN, http=http)
            first = jobs.submit({"prompt": "first", "seed": 1})
            second = jobs.submit({"prompt": "second", "seed": 2})
            assert jobs.status(second).state == "IN_QUEUE"
            assert jobs.cancel(second).state == "CANCELLED"
            gate.set()
            assert jobs.wait(first, timeout=60, first_poll_s=0.05).state == "COMPLETED"
            with pytest.raises(RemoteJobFailed) as e:
                jobs.wait(second, timeout=5, first_poll_s=0.05)
            assert e.value.status.state == "CANCELLED"
            assert ran == [first]
            # Cancelling a finished job changes nothing.
            assert jobs.cancel(first).state == "COMPLETED"
    finally:
        backend.shutdown()


def test_cancel_a_running_job_discards_its_result(tiny_flux_service):
    started, gate = threading.Event(), threading.Event()

    def run(raw, job_id):
        started.set()
        gate.wait(30)
        return tiny_flux_service.run(raw, job_id)

    backend = ThreadBackend(run)
    try:
        with TestClient(create_app(backend, TOKEN)) as http:
            jobs = ModalJobs("http://testserver", TOKEN, http=http)
            job_id = jobs.submit({"prompt": "slow", "seed": 1})
            assert started.wait(10)
            assert jobs.status(job_id).state == "IN_PROGRESS"
            assert jobs.cancel(job_id).state == "CANCELLED"
            gate.set()
    finally:
        backend.shutdown()  # waits for the job to finish
    assert backend.status(job_id).status == "CANCELLED"


def test_webhook_gets_the_final_status(tiny_flux_service):
    """Delivered through the address guard with the test seam opened to 127.0.0.1 (the receiver's);
    tests/test_webhooks.py has the refusals."""
    from app.fetch import FetchLimits

    seam = FetchLimits(allow_networks=("127.0.0.1/32",))
    backend = ThreadBackend(tiny_flux_service.run, webhook_limits=seam)
    try:
        with receiver() as (port, got), TestClient(create_app(backend, TOKEN, webhook_limits=seam)) as http:
            jobs = ModalJobs("http://testserver", TOKEN, http=http)
            job_id = jobs.submit({"prompt": "a cat", "seed": 5}, webhook=f"http://127.0.0.1:{port}/hook?sig=abc")
            done = jobs.wait(job_id, timeout=60, first_poll_s=0.05)
            assert wait_for(lambda: got, 5)
            path, body = got[0]
        assert path == "/hook?sig=abc"
        body = json.loads(body)
        assert body["id"] == job_id and body["status"] == "COMPLETED"
        assert body["output"]["images"] == done.output["images"]
    finally:
        backend.shutdown()
