"""A backend's view of RunPod, end to end on the CPU: RunPodJobs -> queue -> the real SDK worker loop.

handler.py runs in a subprocess exactly as in the container (`runpod.serverless.start`, not a direct
call of the handler). RunPod's cloud cannot be reached from here, so its job queue is a loopback
stand-in (tests/runpod_standin.py) that the SDK's worker loop is pointed at through the same
RUNPOD_WEBHOOK_* variables RunPod sets in a worker. We use that rather than `--rp_serve_api`
because the local API server runs a job only when /status is called and has no worker loop:
the stand-in exercises the real job-take / job-done / ping traffic. Output goes to the moto S3
server on loopback with an STS session (AWS_SESSION_TOKEN); the image is fetched back from the
presigned URL the client got, while the worker's log (the SDK at DEBUG: it prints every handler
output) must hold no credential, session token, URL signature or worker key.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.client import RemoteJobFailed, RunPodJobs, TransportError
from tests.helpers_net import stop, wait_for
from tests.runpod_standin import RunPodStandIn

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "rp-test-api-key-0123456789"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEHworker+loop/session//token=="


@pytest.mark.timeout(240)
def test_runpod_worker_loop_serves_jobs_submitted_by_the_client(s3_env, bucket, tmp_path):
    with RunPodStandIn("ep-test", API_KEY, worker_key="rp-worker-key-abcdef") as rp:
        env = {
            "PATH": os.environ["PATH"], "HOME": str(tmp_path),  # no ~/.runpod credentials picked up
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # as the suite runs torch (conftest)
            **s3_env, **rp.worker_env("worker-1"),
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true",  # no GPU, no internet
            "MODEL": "tiny-flux", "PREFLIGHT": "0", "DEVICE": "cpu",
            "OUTPUT_URI": f"s3://{bucket}/runpod", "LOG_FORMAT": "json", "AWS_SESSION_TOKEN": SESSION_TOKEN,
        }
        log = open(tmp_path / "worker.log", "w+")
        proc = subprocess.Popen([sys.executable, "handler.py", "--rp_log_level", "DEBUG"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            jobs = RunPodJobs("ep-test", API_KEY, base_url=f"{rp.url}/v2")
            # Queued while the worker is still loading the model (seconds): FIFO, one job at a time.
            good = jobs.submit({"prompt": "a red sneaker on a beach", "seed": 7})
            bad = jobs.submit({"prompt": "x", "width": 100})
            dropped = jobs.submit({"prompt": "never runs", "seed": 1})
            assert jobs.status(dropped).state == "IN_QUEUE"
            assert jobs.cancel(dropped).state == "CANCELLED"

            try:
                done = jobs.wait(good, timeout=150, first_poll_s=0.2, max_poll_s=1.0)
            except Exception:
                log.seek(0)
                print(log.read()[-5000:])
                raise
            image = done.output["images"][0]
            assert image["key"] == f"runpod/{good}/0.png" and image["seed"] == 7
            assert "X-Amz-Security-Token=" in image["url"]
            body = httpx.get(image["url"], timeout=10).content  # presigned GET on the S3 endpoint
            assert body[:8] == b"\x89PNG\r\n\x1a\n" and len(body) == image["bytes"]
            assert done.output["cold_start"]["load_total_ms"] > 0  # the first job reports the cold start

            with pytest.raises(RemoteJobFailed) as failed:
                jobs.wait(bad, timeout=60, first_poll_s=0.2, max_poll_s=1.0)
            assert failed.value.status.state == "FAILED"
            assert failed.value.status.error["type"] == "invalid_input"
            assert failed.value.status.error["field"] == "width"

            assert jobs.status(dropped).state == "CANCELLED"
            assert rp.taken == [good, bad]  # the cancelled job was never handed to the worker
            assert wait_for(lambda: rp.progress.get(good), 5), "no per-step progress reached the queue"
            assert rp.progress[good][-1]["total"] >= 1
            assert wait_for(lambda: rp.pings > 0, 5), "the SDK's heartbeat never pinged"
            assert proc.poll() is None, "the worker exited"

            with pytest.raises(TransportError) as refused:
                RunPodJobs("ep-test", "wrong-key", base_url=f"{rp.url}/v2").status(good)
            assert refused.value.status_code == 401 and "wrong-key" not in str(refused.value)

            log.flush()
            log.seek(0)
            text = log.read()
            assert "Handler output" in text and "X-Amz-Security-Token=REDACTED" in text  # printed, scrubbed
            for secret in (s3_env["AWS_SECRET_ACCESS_KEY"], s3_env["AWS_ACCESS_KEY_ID"], SESSION_TOKEN,
                           SESSION_TOKEN[:16], "rp-worker-key-abcdef"):
                assert secret not in text
            assert not re.search(r"X-Amz-(Signature|Credential|Security-Token)=(?!REDACTED)", text)
        finally:
            stop(proc)
            log.close()
