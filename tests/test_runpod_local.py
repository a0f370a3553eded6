"""handler.py under the RunPod SDK's local API server (`--rp_serve_api`), the real SDK in a subprocess
on a loopback port, output to moto's S3 server with an STS session.

What it must hold: the SDK's server answers RunPod's `{"error": "<string>"}` (our typed error as
JSON) instead of HTTP 500 (ResponseValidationError) on /run + /status and /runsync; the project's
client works against it (POST /status); no progress update is attempted (no job-done URL locally);
and nothing the process prints carries a credential, the session token or a URL signature, while
the result itself, read over HTTP, holds a working presigned URL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import boto3
import httpx
import pytest

from app import client
from app.client import ModalJobs, RemoteJobFailed, RunPodLocalJobs
from tests.conftest import AWS_ENV, free_port
from tests.helpers_net import stop

ROOT = Path(__file__).resolve().parents[1]
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEHsts+local/mode//token=="
FAST = {"num_inference_steps": 1, "width": 256, "height": 256}
INVALID = {"prompt": "x", "width": 100}
WIDTH_ERROR = {"type": "invalid_input", "message": "width: must be a multiple of 16", "field": "width"}


@pytest.fixture(scope="module")
def server(s3_endpoint, tmp_path_factory):
    """(base URL, log path) of `python handler.py --rp_serve_api` on 127.0.0.1, the SDK at DEBUG (it
    then prints every handler output, presigned URLs included: the scrubber must catch them)."""
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="a",
                 aws_secret_access_key="b").create_bucket(Bucket="serve-api-out")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNPOD_", "OUTPUT_", "MODEL"))}
    env.update(AWS_ENV, AWS_SESSION_TOKEN=SESSION_TOKEN, AWS_ENDPOINT_URL_S3=s3_endpoint,
               OUTPUT_URI="s3://serve-api-out/local", DEVICE="cpu", WARMUP="0", PREFLIGHT="0",
               PYTHONUNBUFFERED="1", HOME=str(tmp_path_factory.mktemp("home")))
    log_path = tmp_path_factory.mktemp("serve-api") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
                             "--rp_api_port", str(port), "--rp_log_level", "DEBUG"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/docs", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        yield base, log_path
    finally:
        stop(proc)
        log.close()


def test_run_then_status_answers_runpods_error_string(server):
    base, _ = server
    job = httpx.post(f"{base}/run", json={"input": INVALID}, timeout=10).json()
    assert job["status"] == "IN_PROGRESS"  # the SDK's server runs the job when /status is asked
    r = httpx.post(f"{base}/status/{job['id']}", timeout=120)
    assert r.status_code == 200, r.text  # was: 500 ResponseValidationError
    body = r.json()
    assert body["status"] == "FAILED" and isinstance(body["error"], str)
    assert json.loads(body["error"]) == WIDTH_ERROR


@pytest.mark.parametrize("job, field", [(INVALID, "width"), ({"prompt": ""}, "prompt"),
                                        ({"prompt": "x", "num_images": 9}, "num_images"),
                                        ({"prompt": "x", "steps": 3}, None)])
def test_runsync_answers_runpods_error_string(server, job, field):
    base, _ = server
    r = httpx.post(f"{base}/runsync", json={"input": job}, timeout=120)
    assert r.status_code == 200, r.text
    error = json.loads(r.json()["error"])
    assert r.json()["status"] == "FAILED" and error["type"] == "invalid_input"
    if field:
        assert error["field"] == field


def test_runsync_result_holds_a_working_presigned_url(server, s3_endpoint):
    base, _ = server
    r = httpx.post(f"{base}/runsync", json={"input": {"prompt": "a cat", "seed": 3, **FAST}}, timeout=120)
    image = r.json()["output"]["images"][0]
    assert "X-Amz-Security-Token=" in image["url"]  # the session is in the URL handed to the caller...
    body = httpx.get(image["url"], timeout=10).content
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and len(body) == image["bytes"]


def test_the_client_works_against_the_local_server(server, capsys):
    base, _ = server
    jobs = RunPodLocalJobs(base)
    done = jobs.wait(jobs.submit({"prompt": "a dog", "seed": 5, **FAST}), timeout=120, first_poll_s=0.1)
    assert done.output["images"][0]["seed"] == 5
    with pytest.raises(RemoteJobFailed) as e:
        jobs.wait(jobs.submit(INVALID), timeout=120, first_poll_s=0.1)
    assert e.value.status.state == "FAILED" and e.value.status.error == WIDTH_ERROR
    # ModalJobs (GET /status first, as our API and RunPod's serve it) meets the local server's 405 too
    other = ModalJobs(base, "unused-token-0123456789", timeout_s=120)
    assert other.status(other.submit({"prompt": "a fox", "seed": 6, **FAST})).state == "COMPLETED"
    assert client.main(["--local", base, "submit", json.dumps(INVALID), "--wait", "--timeout", "120"], {}) == 1
    assert json.loads(capsys.readouterr().out)["error"]["field"] == "width"


def test_the_server_output_is_clean(server):
    """Last in the module: everything the server printed for the jobs above."""
    _, log_path = server
    text = log_path.read_text()
    assert "Starting API server" in text and "job done" in text  # the jobs did run, and printed
    assert "Handler output:" in text and "X-Amz-Security-Token=REDACTED" in text  # results printed, scrubbed
    assert "ResponseValidationError" not in text and "Traceback" not in text
    assert "Failed to return job results" not in text and "JOB_DONE_URL" not in text
    for secret in (AWS_ENV["AWS_SECRET_ACCESS_KEY"], AWS_ENV["AWS_ACCESS_KEY_ID"], SESSION_TOKEN,
                   quote(SESSION_TOKEN, safe=""), SESSION_TOKEN[:16]):
        assert secret not in text
    assert not re.search(r"X-Amz-(Signature|Credential|Security-Token)=(?!REDACTED)", text)
