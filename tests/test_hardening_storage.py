"""Flaky storage loses nothing: a fault-injecting proxy on loopback in front of moto's S3 server.

Transient faults (500, SlowDown, resets, stalls past the read timeout, a short object) are retried
to success; persistent ones end the job FAILED with no URL and no object left behind. Every job
goes through Service.run with the real tiny pipeline and the real boto3 client.
"""

from __future__ import annotations

import io
import random
import re
import time

import boto3
import httpx
import pytest
from PIL import Image

from app.errors import JobFailed
from app.retry import Backoff
from app.storage import S3Store, s3_client
from tests.fault_proxy import FaultProxy
from tests.hardening_helpers import one_torch_thread, service_like, tiny_job  # noqa: F401 (fixture)

READ_TIMEOUT_S = 0.3  # the stalls sleep past it
FAST = Backoff(attempts=5, base_s=0.01, cap_s=0.05)  # production: 0.25 s base, 5 s cap
TRANSIENT = ("500", "503", "reset-before", "reset-after", "stall-before", "stall-after", "short")
PERSISTENT = ("500", "503", "reset-before", "reset-after", "short")  # stalls cost 0.3 s x 10: kept transient


@pytest.fixture
def proxied(s3_endpoint, s3_env, bucket, monkeypatch):
    """(proxy, store): an S3Store whose client goes through the fault proxy (botocore retries off)."""
    plans: dict[str, dict] = {}
    pattern = re.compile(rf"/{bucket}/out/([^/?]+)/(\d+)\.\w+")

    def decide(method: str, path: str) -> str:
        m = pattern.match(path)
        plan = plans.get(m[1]) if m else None
        if plan is None:
            return "pass"
        if plan.get("persistent") and plan.get("index") in (None, int(m[2])):
            return plan["persistent"]
        return plan["faults"].pop(0) if plan.get("faults") else "pass"

    with FaultProxy(s3_endpoint, decide, stall_s=READ_TIMEOUT_S + 0.4) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        client = s3_client(connect_timeout=1, read_timeout=READ_TIMEOUT_S, max_attempts=1)
        proxy.plans = plans
        yield proxy, S3Store(bucket, "out", client, 3600, FAST)


def stored_objects(s3_endpoint: str, bucket: str) -> dict[str, int]:
    """Key -> size, read straight from moto (not through the proxy)."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.parametrize("kind", TRANSIENT)
def test_each_transient_fault_is_retried_to_success(proxied, kind):
    proxy, store = proxied
    proxy.plans["j1"] = {"faults": [kind, kind]}
    stored = store.put("out/j1/0.png", b"x" * 5000, "image/png")
    assert proxy.counts[kind] == 2 and stored.bytes == 5000
    assert len(httpx.get(stored.url).content) == 5000


@pytest.mark.parametrize("kind", PERSISTENT)
def test_persistent_fault_fails_cleanly(proxied, kind):
    proxy, store = proxied
    proxy.plans["j2"] = {"persistent": kind}
    with pytest.raises(JobFailed) as info:
        store.put("out/j2/0.png", b"x" * 5000, "image/png")
    assert info.value.message.startswith("upload of out/j2/0.png failed:")
    assert "X-Amz" not in info.value.message and "testing-secret" not in info.value.message
    # exactly our attempts: botocore adds none of its own (a PUT that fails is not followed by a HEAD)
    assert proxy.counts[kind] == FAST.attempts * (2 if kind == "short" else 1)


def test_retried_job_id_overwrites_the_same_keys(proxied, tiny_flux_service, s3_endpoint, bucket, one_torch_thread):
    proxy, store = proxied
    service = service_like(tiny_flux_service, store)
    first = service.run(tiny_job(1, num_images=2), "job-retry")
    proxy.plans["job-retry"] = {"faults": ["reset-after", "503"]}  # the retry meets a flaky store
    second = service.run(tiny_job(2, num_images=2), "job-retry")
    assert [i["key"] for i in first["images"]] == [i["key"] for i in second["images"]]
    objects = stored_objects(s3_endpoint, bucket)
    assert sorted(objects) == ["out/job-retry/0.png", "out/job-retry/1.png"]
    for img in second["images"]:  # the second run's bytes, not the first's
        assert httpx.get(img["url"]).content == boto3.client("s3", endpoint_url=s3_endpoint).get_object(
            Bucket=bucket, Key=img["key"])["Body"].read()
        assert objects[img["key"]] == img["bytes"]
    assert [i["seed"] for i in second["images"]] == [2, 3]


def make_plans(n: int, rng: random.Random) -> dict[str, dict]:
    """A deterministic fault mix: ~55% clean, ~30% 1-3 transient faults, ~15% a persistent fault."""
    plans = {}
    for i in range(n):
        job, images = f"job-{i:03d}", 2 if rng.random() < 0.2 else 1
        r = rng.random()
        if r < 0.55:
            plan = {"faults": []}
        elif r < 0.85:
            plan = {"faults": [rng.choice(TRANSIENT) for _ in range(rng.randint(1, 3))]}
        else:  # on a 2-image job, sometimes only the second image's key: the first must be cleaned up
            plan = {"persistent": rng.choice(PERSISTENT), "index": 1 if images == 2 and rng.random() < 0.5 else None}
        plans[job] = dict(plan, images=images, expect="failed" if "persistent" in plan else "completed")
    return plans


def test_fault_mix_over_200_jobs_loses_nothing(proxied, tiny_flux_service, s3_endpoint, bucket, one_torch_thread):
    proxy, store = proxied
    service = service_like(tiny_flux_service, store)
    plans = make_plans(200, random.Random(20261122))
    proxy.plans.update({k: dict(v, faults=list(v.get("faults", []))) for k, v in plans.items()})
    t0 = time.monotonic()
    results = {job: service.run(tiny_job(i, num_images=p["images"]), job) for i, (job, p) in enumerate(plans.items())}
    took = time.monotonic() - t0

    proxy.decide = lambda method, path: "pass"  # verification reads through a healthy proxy
    objects = stored_objects(s3_endpoint, bucket)
    lost, phantom, wrong = [], [], []
    for job, plan in plans.items():
        result = results[job]
        state = "failed" if "error" in result else "completed"
        if state != plan["expect"]:
            wrong.append((job, plan, result))
        if state == "completed":
            for img in result["images"]:
                body = httpx.get(img["url"]).content  # the presigned URL we returned
                if objects.get(img["key"]) != img["bytes"] or len(body) != img["bytes"]:
                    lost.append((job, img["key"]))
                else:
                    assert Image.open(io.BytesIO(body)).size == (256, 256)
        else:
            assert result["error"]["type"] == "job_failed" and "images" not in result
            assert "upload of" in result["error"]["message"]
            phantom += [k for k in objects if k.startswith(f"out/{job}/")]
    expected_keys = {i["key"] for r in results.values() if "images" in r for i in r["images"]}
    stray = set(objects) - expected_keys

    faults = {k: v for k, v in proxy.counts.items() if k != "pass"}
    completed = sum("images" in r for r in results.values())
    print(f"\nfault mix: {len(plans)} jobs, {completed} completed, {len(plans) - completed} failed (all expected); "
          f"faults injected {sum(faults.values())} {dict(sorted(faults.items()))}; "
          f"lost {len(lost)}, phantom {len(phantom)}, stray {len(stray)}; {took:.1f} s")
    assert not wrong, wrong[:3]
    assert not lost and not phantom and not stray
    assert completed >= 150 and sum(faults.values()) >= 150  # the mix really was mixed
    assert {k for k in faults} == set(TRANSIENT)
