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


# ------------------------------------------------- a full disk leaves nothing in the output folder

def fail_writes(monkeypatch, errno_code: int, after_bytes: int = 0, on: str = "write"):
    """Make writes to our temp files fail as a full disk (or quota) does. No tmpfs small enough to
    fill can be mounted here, so `os.write` (or `os.replace`) is wrapped: it writes `after_bytes`
    for real, then raises the OSError the kernel would. Only temp files of LocalStore are hit."""
    import errno as _errno
    import os

    real_write, real_replace = os.write, os.replace
    written: dict[int, int] = {}

    def is_ours(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp")
        except OSError:
            return False

    def write(fd, data):
        if on == "write" and is_ours(fd):
            room = after_bytes - written.get(fd, 0)
            if room <= 0:
                raise OSError(errno_code, os.strerror(errno_code))
            n = real_write(fd, bytes(data)[:room])
            written[fd] = written.get(fd, 0) + n
            return n
        return real_write(fd, data)

    def replace(src, dst, **kw):
        if on == "replace" and str(src).endswith(".tmp"):
            raise OSError(errno_code, os.strerror(errno_code))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "replace", replace)
    return _errno


@pytest.mark.parametrize("code, after, on", [("ENOSPC", 0, "write"), ("ENOSPC", 4096, "write"),
                                             ("EDQUOT", 100, "write"), ("ENOSPC", 0, "replace")])
def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch, code, after, on):
    import errno

    fail_writes(monkeypatch, getattr(errno, code), after, on)
    store = LocalStore(tmp_path)
    with pytest.raises(JobFailed, match="the disk is full"):
        store.put("job-1/0.png", b"x" * 10000, "image/png")
    assert [p.name for p in (tmp_path / "job-1").iterdir()] == []  # no .0.png.tmp, no 0.png
    assert store.delete("job-1/0.png") and not (tmp_path / "job-1").exists()  # the job's folder goes too


def test_a_job_that_fills_the_disk_leaves_the_folder_as_it_was(tiny_flux_service, tmp_path, monkeypatch):
    """Two images, the second hits ENOSPC half-way: the first image, the half-written temp file and
    the job's folder are removed; what was in the output folder before is untouched."""
    import errno

    (tmp_path / "other.txt").write_text("keep")
    (tmp_path / "job-before").mkdir()
    (tmp_path / "job-before" / "0.png").write_bytes(b"older job")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    store = LocalStore(tmp_path)
    real_put = store.put
    calls = []

    def second_fails(key, data, content_type, deadline=None):
        calls.append(key)
        if len(calls) == 2:
            with pytest.MonkeyPatch.context() as mp:
                fail_writes(mp, errno.ENOSPC, after_bytes=len(data) // 2)
                return real_put(key, data, content_type, deadline)
        return real_put(key, data, content_type, deadline)

    store.put = second_fails
    out = using(tiny_flux_service, store).run({"prompt": "a", "seed": 1, "num_images": 2, **FAST}, "job-full")
    assert out["error"]["type"] == "job_failed" and "disk is full" in out["error"]["message"]
    assert calls == ["job-full/0.png", "job-full/1.png"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_delete_removes_a_stale_temp_file_and_only_empty_folders(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / "job-2").mkdir()
    (tmp_path / "job-2" / ".0.png.tmp").write_bytes(b"half")  # left by a crash before this fix
    (tmp_path / "job-2" / "1.png").write_bytes(b"kept")
    assert store.delete("job-2/0.png")
    assert [p.name for p in (tmp_path / "job-2").iterdir()] == ["1.png"]
    assert store.delete("job-2/1.png") and not (tmp_path / "job-2").exists() and tmp_path.exists()


# ------------------------------------------------------------------ file:// URIs name a path only

@pytest.mark.parametrize("uri", ["file://tmp/x", "file://outputs", "file://host.example/srv/out",
                                 "file://user@/x", "file://127.0.0.1/x", "file:relative/x", "file:///x?y=1",
                                 "file:///x#frag", "FILE://tmp/x"])
def test_a_file_uri_with_a_host_or_no_absolute_path_is_refused(uri):
    with pytest.raises(WorkerBroken) as e:
        open_store(uri)
    assert e.value.field == "OUTPUT_URI" and "OUTPUT_URI" in e.value.message


def test_file_uri_forms_that_name_a_local_path(tmp_path):
    for uri, path in [(f"file://{tmp_path}/a", tmp_path / "a"), (f"file://localhost{tmp_path}/b", tmp_path / "b"),
                      (f"file:{tmp_path}/c", tmp_path / "c"), (f"file://{tmp_path}/my%20dir", tmp_path / "my dir")]:
        store = open_store(uri)
        assert isinstance(store, LocalStore) and store.root == path, uri


def test_settings_with_a_hosted_file_uri_fail_at_load_naming_output_uri(tmp_path):
    from app.config import Settings

    with pytest.raises(WorkerBroken) as e:
        Service.load(Settings(model="tiny-flux", output_uri="file://tmp/x", preflight=False, device="cpu",
                              warmup=False))
    assert e.value.field == "OUTPUT_URI" and "tmp" in e.value.message
