"""The official RunPod client against our jobs API (the Modal deployment's), on loopback: a backend
switches platforms by changing `runpod.endpoint_url_base` and nothing else.

`runpod.Endpoint` builds `{endpoint_url_base}/{endpoint_id}/run`, `/runsync`, `/status/{id}`,
`/cancel/{id}` and `/health`; the API serves them under any endpoint id. The API runs in uvicorn on
127.0.0.1 over the in-process ThreadBackend and the real tiny service; the SDK is the pinned one.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import runpod

from app.client import RemoteJobFailed, RunPodJobs
from app.jobs_api import ThreadBackend, create_app
from tests.hardening_helpers import tiny_job
from tests.test_api_limits import served

TOKEN = "compat-api-token-0123456789"


@pytest.fixture
def gate():
    g = threading.Event()
    g.set()
    return g


@pytest.fixture
def base(tiny_flux_service, gate, monkeypatch):
    """The API's base URL, set as the SDK's `endpoint_url_base` (as a backend would set it)."""
    def run(raw, job_id):
        gate.wait(30)
        return tiny_flux_service.run(raw, job_id)

    backend = ThreadBackend(run)
    with served(create_app(backend, TOKEN)) as port:
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setattr(runpod, "endpoint_url_base", url)
        monkeypatch.setattr(runpod, "api_key", TOKEN)
        yield url
    gate.set()
    backend.shutdown()


@pytest.mark.parametrize("endpoint_id", ["diffusion-worker", "abc123xyz", "ep.v2_test"])
def test_endpoint_run_status_output(base, endpoint_id):
    endpoint = runpod.Endpoint(endpoint_id)
    job = endpoint.run({"prompt": "a red cat", "seed": 9, "num_inference_steps": 1, "width": 256, "height": 256})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    output = job.output(timeout=60)
    assert output["images"][0]["seed"] == 9 and output["model"] == "tiny-flux"
    assert job.status() == "COMPLETED"


def test_endpoint_run_sync_and_health(base):
    endpoint = runpod.Endpoint("diffusion-worker")
    output = endpoint.run_sync({"input": tiny_job(4)}, timeout=60)
    assert output["images"][0]["seed"] == 4
    health = endpoint.health()
    assert health["jobs"]["completed"] >= 1 and set(health["workers"]) == {"running", "idle"}


def test_endpoint_cancel_a_queued_job(base, gate):
    gate.clear()  # the one worker thread holds the first job: the second waits in the queue
    endpoint = runpod.Endpoint("diffusion-worker")
    first, second = endpoint.run(tiny_job(1)), endpoint.run(tiny_job(2))
    assert second.status() == "IN_QUEUE"
    assert second.cancel()["status"] == "CANCELLED"
    gate.set()
    assert first.output(timeout=60)["images"][0]["seed"] == 1
    assert second.status() == "CANCELLED" and second.output() is None


def test_a_failed_job_reads_as_runpods_error_string(base):
    endpoint = runpod.Endpoint("diffusion-worker")
    job = endpoint.run({"prompt": "x", "width": 100})
    for _ in range(100):
        state = job._fetch_job()
        if state["status"] == "FAILED":
            break
        time.sleep(0.1)
    assert state["status"] == "FAILED" and isinstance(state["error"], str)
    assert json.loads(state["error"]) == {"type": "invalid_input", "message": "width: must be a multiple of 16",
                                          "field": "width"}


def test_a_wrong_key_is_refused(base):
    with pytest.raises(RuntimeError, match="Unauthorized"):
        runpod.Endpoint("diffusion-worker", api_key="wrong-key-0123456789").run(tiny_job(1))


def test_our_runpod_client_works_against_it_too(base):
    """RunPodJobs with the API's base URL: the same paths RunPod serves, the error parsed back."""
    jobs = RunPodJobs("diffusion-worker", TOKEN, base_url=base)
    done = jobs.wait(jobs.submit(tiny_job(5)), timeout=60, first_poll_s=0.05)
    assert done.output["images"][0]["seed"] == 5
    with pytest.raises(RemoteJobFailed) as e:
        jobs.wait(jobs.submit({"prompt": "x", "width": 100}), timeout=60, first_poll_s=0.05)
    assert e.value.status.error == {"type": "invalid_input", "message": "width: must be a multiple of 16",
                                    "field": "width"}
