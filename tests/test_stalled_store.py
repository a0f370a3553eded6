"""A frozen store cannot hold a job past JOB_TIMEOUT_S: uploads and clean-up run under the job's deadline.

A fault proxy on loopback (tests/fault_proxy.py) sits in front of moto's S3 server and freezes:
requests are taken and never answered, the connection held open, as a hung endpoint does. The S3
client is the production one (30 s read timeout, 5 s connect) and so is the backoff: before the
fix, a one-image job under JOB_TIMEOUT_S=20 ended after 311 s. Now it ends `timeout` at its
deadline plus the clean-up's grace (CLEANUP_GRACE_S), reports no object, and leaves none behind
wherever the store still answers the clean-up.
"""

from __future__ import annotations

import re
import time

import boto3
import pytest

from app.errors import JobTimeout
from app.retry import Backoff, DeadlineExceeded, retry
from app.service import CLEANUP_GRACE_S
from app.storage import S3Store, s3_client
from tests.fault_proxy import FaultProxy
from tests.hardening_helpers import one_torch_thread, service_like, tiny_job  # noqa: F401 (fixture)

JOB_TIMEOUT_S = 3.0
SLACK_S = 1.5  # scheduling on a shared 2-core machine


@pytest.fixture
def frozen(s3_endpoint, s3_env, bucket, monkeypatch):
    """(proxy, store): production client settings and backoff behind a proxy whose `decide` the test sets."""
    with FaultProxy(s3_endpoint, lambda m, p: "pass", freeze_max_s=60) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        client = s3_client(connect_timeout=5, read_timeout=30, max_attempts=1)  # open_store's own settings
        yield proxy, S3Store(bucket, "out", client, 3600, Backoff())


def objects(s3_endpoint: str, bucket: str, prefix: str) -> list[str]:
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def run_timed(service, job: dict, job_id: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    out = service.run(job, job_id)
    return out, time.monotonic() - t0


def assert_timed_out(out: dict, took: float, grace: float = CLEANUP_GRACE_S) -> None:
    assert "images" not in out and out["error"]["type"] == "timeout", out
    assert "JOB_TIMEOUT_S=3" in out["error"]["message"] and "storing" in out["error"]["message"]
    assert took < JOB_TIMEOUT_S + grace + SLACK_S, f"took {took:.1f} s"


def test_a_frozen_store_ends_the_job_at_its_deadline(frozen, tiny_flux_service, one_torch_thread):
    """Everything frozen (upload and clean-up): `timeout` at deadline + grace, no object reported."""
    proxy, store = frozen
    proxy.decide = lambda method, path: "freeze"
    out, took = run_timed(service_like(tiny_flux_service, store, job_timeout_s=JOB_TIMEOUT_S), tiny_job(1), "frz-all")
    assert_timed_out(out, took)
    assert took > JOB_TIMEOUT_S - 0.5  # it did wait for the store, up to the deadline
    assert proxy.counts["freeze"] >= 2  # the PUT, then the clean-up's DELETE


@pytest.mark.parametrize("fault, method", [("freeze", "PUT"), ("freeze-after", "PUT"), ("freeze", "HEAD")])
def test_a_job_frozen_mid_upload_leaves_nothing(frozen, tiny_flux_service, s3_endpoint, bucket, one_torch_thread,
                                                fault, method):
    """Two images; the second's PUT (or its verification) freezes, its first try having landed with
    freeze-after/HEAD. The store still answers DELETEs: the clean-up removes what the job wrote."""
    proxy, store = frozen
    second = re.compile(rf"/{bucket}/out/frz-[^/]+/1\.png")
    proxy.decide = lambda m, p: fault if m == method and second.match(p) else "pass"
    job_id = f"frz-{fault}-{method}".lower()
    out, took = run_timed(service_like(tiny_flux_service, store, job_timeout_s=JOB_TIMEOUT_S),
                          tiny_job(2, num_images=2), job_id)
    assert_timed_out(out, took)
    assert objects(s3_endpoint, bucket, f"out/{job_id}/") == []


def test_store_calls_end_at_their_deadline(frozen):
    proxy, store = frozen
    proxy.decide = lambda method, path: "freeze"
    t0 = time.monotonic()
    with pytest.raises(JobTimeout, match="deadline"):
        store.put("out/j/0.png", b"x" * 1000, "image/png", deadline=time.monotonic() + 1.0)
    assert time.monotonic() - t0 < 1.0 + SLACK_S
    t0 = time.monotonic()
    assert store.delete("out/j/0.png", deadline=time.monotonic() + 1.0) is False
    assert time.monotonic() - t0 < 1.0 + SLACK_S
    with pytest.raises(JobTimeout):  # a deadline already past: not even tried
        store.put("out/j/0.png", b"x", "image/png", deadline=time.monotonic() - 1)


def test_backoff_sleeps_stop_at_the_deadline(frozen):
    """A store answering 503 for ever, with a long backoff: the sleeps are cut to the time left."""
    proxy, store = frozen
    proxy.decide = lambda method, path: "503"
    store.backoff = Backoff(attempts=20, base_s=2.0, cap_s=5.0)
    t0 = time.monotonic()
    with pytest.raises(JobTimeout):
        store.put("out/j/0.png", b"x" * 1000, "image/png", deadline=time.monotonic() + 1.5)
    assert time.monotonic() - t0 < 1.5 + SLACK_S
    assert proxy.counts["503"] >= 2  # retried, within the time


def test_retry_never_sleeps_past_the_deadline():
    sleeps: list[float] = []
    calls = []

    def flaky():
        from botocore.exceptions import EndpointConnectionError

        calls.append(1)
        raise EndpointConnectionError(endpoint_url="http://x")

    deadline = time.monotonic() + 0.5
    with pytest.raises(DeadlineExceeded):
        retry(flaky, Backoff(attempts=50, base_s=10, cap_s=10), "x", sleep=lambda s: (sleeps.append(s), time.sleep(s)),
              deadline=deadline)
    assert sleeps and all(s <= 0.25 for s in sleeps) and time.monotonic() - deadline < 0.2
    assert len(calls) >= 1
