"""Output stores against real endpoints: moto's S3 server on loopback through boto3, and a folder."""

from pathlib import Path
from urllib.parse import parse_qs, urlparse

import boto3
import httpx
import pytest

from app.errors import JobFailed, WorkerBroken
from app.service import Service
from app.storage import LocalStore, S3Store, object_key, open_store

FAST = {"num_inference_steps": 2}


def using(service: Service, store) -> Service:
    """The session's loaded pipeline, writing to another store (loading again would cost seconds)."""
    return Service(service.pipe, service.source, service.settings, service.plan, store, {})


def test_key_layout():
    assert object_key("renders/v1/", "job-1", 0, "png") == "renders/v1/job-1/0.png"
    assert object_key("", "job-1", 3, "webp") == "job-1/3.webp"
    for bad in ("../etc", "a/b", "", "x" * 200, ".hidden"):
        with pytest.raises(JobFailed):
            object_key("p", bad, 0, "png")


def test_s3_presigned_url_returns_exactly_the_bytes_written(tiny_flux_service, bucket):
    svc = using(tiny_flux_service, open_store(f"s3://{bucket}/renders/v1", presign_ttl_s=3600))
    out = svc.run({"prompt": "a red sneaker", "seed": 7, "num_images": 2, "output_format": "jpeg", **FAST}, "job-s3")
    assert "error" not in out, out
    s3 = boto3.client("s3")
    for i, img in enumerate(out["images"]):
        assert img["key"] == f"renders/v1/job-s3/{i}.jpeg"
        stored = s3.get_object(Bucket=bucket, Key=img["key"])
        body = stored["Body"].read()
        assert stored["ContentType"] == img["content_type"] == "image/jpeg"
        assert len(body) == img["bytes"]
        got = httpx.get(img["url"])  # a plain HTTP client, no AWS credentials
        assert got.status_code == 200
        assert got.content == body and got.headers["content-type"] == "image/jpeg"
        assert parse_qs(urlparse(img["url"]).query)["X-Amz-Expires"] == ["3600"]
    assert out["images"][0]["url"] != out["images"][1]["url"]


def test_a_retried_job_overwrites_its_objects(tiny_flux_service, bucket):
    svc = using(tiny_flux_service, open_store(f"s3://{bucket}/out"))
    first = svc.run({"prompt": "a cat", "seed": 1, **FAST}, "job-retry")
    second = svc.run({"prompt": "a cat", "seed": 2, **FAST}, "job-retry")
    assert first["images"][0]["key"] == second["images"][0]["key"] == "out/job-retry/0.png"
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="out/")
    assert [o["Key"] for o in listed["Contents"]] == ["out/job-retry/0.png"]
    assert httpx.get(second["images"][0]["url"]).content == httpx.get(first["images"][0]["url"]).content
    assert listed["Contents"][0]["Size"] == second["images"][0]["bytes"]


def test_the_generic_endpoint_variable_works_too(s3_endpoint, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert httpx.get(open_store(f"s3://{bucket}").put("j/0.png", b"png", "image/png").url).content == b"png"


def test_a_missing_bucket_fails_the_job(tiny_flux_service, s3_env):
    svc = using(tiny_flux_service, open_store("s3://no-such-bucket-here/out"))
    out = svc.run({"prompt": "a cat", "seed": 1, **FAST}, "job-nobucket")
    assert "images" not in out
    assert out["error"]["type"] == "job_failed"
    assert "NoSuchBucket" in out["error"]["message"]
    assert not svc.broken  # the next job may go elsewhere; the worker is fine


@pytest.mark.parametrize("who, code", [("policy-less user", "AccessDenied"), ("unknown key", "InvalidAccessKeyId")])
def test_refused_credentials_fail_the_job(tiny_flux_service, s3_auth, monkeypatch, who, code):
    bucket, key_id, secret = s3_auth  # the endpoint now checks every request's signature
    if who == "unknown key":
        key_id, secret = "AKIANOBODYKNOWS00000", "not-a-secret-anyone-issued"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # boto3's default session keeps the credentials it resolved first; drop it, as a fresh worker would start.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    svc = using(tiny_flux_service, open_store(f"s3://{bucket}/out"))
    out = svc.run({"prompt": "a cat", "seed": 1, **FAST}, "job-denied")
    assert "images" not in out
    assert out["error"]["type"] == "job_failed"
    assert code in out["error"]["message"]
    assert secret not in str(out) and key_id not in str(out)
    assert not svc.broken


def test_s3_check_names_the_cause(s3_env, bucket):
    assert open_store(f"s3://{bucket}/p").check() == f"s3://{bucket}/p writable"
    with pytest.raises(JobFailed, match="NoSuchBucket"):
        open_store("s3://no-such-bucket-here/p").check()


def test_local_folder_store(tmp_path):
    for uri in (str(tmp_path / "a"), (tmp_path / "b").as_uri()):
        store = open_store(uri)
        assert isinstance(store, LocalStore)
        stored = store.put("job-1/0.png", b"first", "image/png")
        stored = store.put("job-1/0.png", b"second", "image/png")  # a retry overwrites
        path = Path(urlparse(stored.url).path)
        assert stored.url.startswith("file:///") and path.read_bytes() == b"second" and stored.bytes == 6
        assert sorted(p.name for p in path.parent.iterdir()) == ["0.png"]  # no temp file left behind
        assert store.check().endswith("writable")


def test_local_folder_job_result(tiny_flux_service, tmp_path):
    svc = using(tiny_flux_service, open_store(str(tmp_path)))
    out = svc.run({"prompt": "a cat", "seed": 5, "output_format": "webp", **FAST}, "job-local")
    img = out["images"][0]
    assert img["key"] == "job-local/0.webp" and img["content_type"] == "image/webp"
    assert (tmp_path / "job-local" / "0.webp").read_bytes()[8:12] == b"WEBP"
    assert img["url"] == (tmp_path / "job-local" / "0.webp").as_uri()


def test_an_unwritable_folder_fails_the_job(tiny_flux_service, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    out = using(tiny_flux_service, LocalStore(blocker)).run({"prompt": "a", "seed": 1, **FAST}, "job-x")
    assert out["error"]["type"] == "job_failed" and "images" not in out


def test_unknown_scheme_names_output_uri():
    with pytest.raises(WorkerBroken) as e:
        open_store("gs://bucket/x")
    assert e.value.field == "OUTPUT_URI"
    assert isinstance(open_store("s3://b/p", client=object()), S3Store)
