"""Where results go: S3 (or any S3-compatible store) or a local folder.

Keys are `{prefix}/{job_id}/{index}.{ext}`: a retried job overwrites its own objects instead of
adding new ones. Every upload is verified (size read back) before its URL is returned, so a job
never reports an object that is not there. The S3 endpoint comes from boto3's own configuration
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`), so R2, MinIO and moto work unchanged.

`put` and `delete` take a `deadline` (time.monotonic()), the job's: no attempt starts after it, no
backoff sleep runs past it, and each S3 request reads for no longer than the time left (botocore's
per-request read timeout), so a frozen store ends the job `timeout` at its deadline instead of
after every retry's full read timeout. Only a connect attempt already under way may run past it,
by at most the client's connect timeout (5 s).
"""

from __future__ import annotations

import contextvars
import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from app.errors import JobFailed, JobTimeout, WorkerBroken
from app.retry import Backoff, DeadlineExceeded, ShortObject, retry

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# S3 error codes -> what to tell the operator (never the credentials themselves).
_S3_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied: the credentials may not write there",
    "InvalidAccessKeyId": "the access key id is not known to the endpoint",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "RequestTimeTooSkewed": "the clock of this machine is too far from the endpoint's (clock skew)",
    "ExpiredToken": "the session token has expired",
}


@dataclass(frozen=True)
class Stored:
    url: str
    key: str
    bytes: int


class OutputStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str, deadline: float | None = None) -> Stored: ...
    def delete(self, key: str, deadline: float | None = None) -> bool: ...
    def check(self) -> str: ...


# The deadline of the store call running in this thread, read by the botocore hook below.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("store_deadline", default=None)


def _bound_read_timeout(request, **_) -> None:
    """botocore `before-send` hook: a request sent under a deadline reads no longer than the time left."""
    deadline = _deadline.get()
    context = getattr(request, "context", None)
    if deadline is None or context is None:
        return
    config = context.get("client_config")
    configured = getattr(config, "read_timeout", None) or 60
    context["read_timeout"] = max(0.05, min(configured, deadline - time.monotonic()))


def object_key(prefix: str, job_id: str, index: int, ext: str) -> str:
    """`{prefix}/{job_id}/{index}.{ext}`; the job id is checked so it cannot escape the prefix."""
    if not _JOB_ID.fullmatch(job_id) or ".." in job_id:
        raise JobFailed(f"job id {job_id[:40]!r} is not usable as a storage key")
    return "/".join(p for p in (prefix.strip("/"), job_id, f"{index}.{ext}") if p)


def parse_s3_uri(uri: str, field: str | None = None) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); WorkerBroken naming `field` for anything else."""
    u = urlparse(uri)
    if u.scheme != "s3" or not u.netloc:
        raise WorkerBroken(f"{field + ': ' if field else ''}not an s3:// URI: {uri!r}", field=field)
    return u.netloc, u.path.strip("/")


def describe_s3_error(exc: Exception) -> str:
    """A one-line, secret-free description of a boto3/botocore failure."""
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                     HTTPClientError, PartialCredentialsError, ReadTimeoutError)

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{code} ({status}): {_S3_HINTS.get(code, 'the endpoint refused the request')}"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return "endpoint unreachable: could not connect to the S3 endpoint"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or give the machine a role)"
    if isinstance(exc, ReadTimeoutError):
        return "timeout: the S3 endpoint did not answer in time"
    if isinstance(exc, HTTPClientError):  # after ReadTimeoutError, its subclass
        return "connection closed or reset by the S3 endpoint"
    return f"{type(exc).__name__}: S3 request failed"


def s3_client(connect_timeout: float = 5, read_timeout: float = 30, max_attempts: int = 5,
              max_pool_connections: int = 10):
    """A boto3 S3 client with bounded timeouts and standard retries (500, 503, SlowDown, resets).
    The one place botocore's retries are configured: readers (weights, compile cache, input images,
    preflight) use its standard mode; the output store passes 1 and retries through app.retry.
    `max_pool_connections` must cover the threads that share it (botocore's default is 10).

    `max_attempts` counts every attempt, the first included (botocore's `total_max_attempts`; its
    own `max_attempts` key counts retries only, so 1 there meant two tries: measured).
    """
    import boto3
    from botocore.config import Config

    cfg = Config(
        connect_timeout=connect_timeout, read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        signature_version="s3v4", max_pool_connections=max_pool_connections,
    )
    return boto3.client("s3", config=cfg)


class S3Store:
    """Objects in an S3 bucket, returned as presigned GET URLs.

    Each upload is PUT then HEAD (size read back), retried as a unit on transient faults (5xx,
    SlowDown, resets, timeouts; see app.retry). Retrying a PUT is safe: the key is the job's own
    and the body is the same bytes, so a PUT that landed before its answer was lost is simply
    overwritten. Give it a client built with `s3_client(max_attempts=1)` so attempts do not multiply.
    """

    def __init__(self, bucket: str, prefix: str, client, presign_ttl_s: int, backoff: Backoff | None = None):
        self.bucket, self.prefix, self.client, self.ttl = bucket, prefix, client, presign_ttl_s
        self.backoff = backoff or Backoff()
        events = getattr(getattr(client, "meta", None), "events", None)
        if events is not None:  # a real botocore client (tests may hand in a stand-in)
            events.register("before-send.s3", _bound_read_timeout, unique_id="diffusion-worker-deadline")

    def _put_verified(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        size = self.client.head_object(Bucket=self.bucket, Key=key).get("ContentLength")
        if size != len(data):
            raise ShortObject(f"stored size {size} != {len(data)}")

    def put(self, key: str, data: bytes, content_type: str, deadline: float | None = None) -> Stored:
        token = _deadline.set(deadline)
        try:
            retry(lambda: self._put_verified(key, data, content_type), self.backoff, f"upload {key}",
                  deadline=deadline)
        except DeadlineExceeded:
            raise JobTimeout(f"upload of {key} did not finish before the job's deadline") from None
        except ShortObject as e:
            raise JobFailed(f"upload of {key} failed: {e}") from None
        except Exception as e:  # botocore raises many unrelated types; all mean "not stored"
            raise JobFailed(f"upload of {key} failed: {describe_s3_error(e)}") from None
        finally:
            _deadline.reset(token)
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.ttl
        )
        return Stored(url=url, key=key, bytes=len(data))

    def delete(self, key: str, deadline: float | None = None) -> bool:
        """Remove `key` (a failed job's partial output); False when even the retries failed or the
        deadline came first."""
        token = _deadline.set(deadline)
        try:
            retry(lambda: self.client.delete_object(Bucket=self.bucket, Key=key), self.backoff, f"delete {key}",
                  deadline=deadline)
            return True
        except Exception:
            return False
        finally:
            _deadline.reset(token)

    def check(self) -> str:
        """Put and delete a small object under the prefix; raise JobFailed naming the cause."""
        key = "/".join(p for p in (self.prefix, ".preflight-probe") if p)
        try:
            retry(lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=b"ok"), self.backoff, "probe")
            retry(lambda: self.client.delete_object(Bucket=self.bucket, Key=key), self.backoff, "probe")
        except Exception as e:
            raise JobFailed(f"s3://{self.bucket}/{self.prefix}: {describe_s3_error(e)}") from None
        return f"s3://{self.bucket}/{self.prefix} writable"


class LocalStore:
    """Files in a folder, returned as file:// URLs. Writes are atomic (temp file, then rename); a
    failed write (a full disk: ENOSPC, a quota: EDQUOT) removes its temp file, and `delete` removes a
    key's file, its temp file and the folders it leaves empty, so a failed job leaves nothing."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    @staticmethod
    def _tmp(path: Path) -> Path:
        return path.with_name(f".{path.name}.tmp")

    def put(self, key: str, data: bytes, content_type: str, deadline: float | None = None) -> Stored:
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimeout(f"writing {key} did not start before the job's deadline")
        path = self.root / key
        tmp = self._tmp(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path)
            size = path.stat().st_size
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)  # what the failed write left (half a file)
            except OSError:
                pass  # never created (its folder could not be)
            reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            raise JobFailed(f"writing {key} failed: {reason}") from None
        if size != len(data):
            raise JobFailed(f"writing {key} failed: stored size {size} != {len(data)}")
        return Stored(url=path.as_uri(), key=key, bytes=size)

    def delete(self, key: str, deadline: float | None = None) -> bool:
        path = self.root / key
        try:
            path.unlink(missing_ok=True)
            self._tmp(path).unlink(missing_ok=True)
        except OSError:
            return False
        parent = path.parent
        while parent != self.root and self.root in parent.parents:  # the job's folder, if now empty
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or gone): it stays
            parent = parent.parent
        return True

    def check(self) -> str:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".preflight-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise JobFailed(f"{self.root}: not writable ({e.strerror})") from None
        return f"{self.root} writable"


def open_store(uri: str, presign_ttl_s: int = 7 * 24 * 3600, client=None) -> OutputStore:
    """`s3://bucket/prefix` -> S3Store; `file:///path` or a plain path -> LocalStore."""
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        # botocore retries off: S3Store retries PUT+HEAD as a unit (app.retry)
        return S3Store(bucket, prefix, client or s3_client(max_attempts=1), presign_ttl_s)
    if uri[:5].lower() == "file:":
        return LocalStore(file_uri_path(uri))
    if "://" in uri:
        raise WorkerBroken(f"unsupported OUTPUT_URI scheme: {uri.split('://')[0]}://", field="OUTPUT_URI")
    return LocalStore(uri)


def file_uri_path(uri: str) -> str:
    """The folder a `file:` OUTPUT_URI names: `file:///abs/path` (or `file://localhost/abs/path`,
    `file:/abs/path`), percent-escapes decoded. A host is refused: `file://tmp/x` names the folder
    /x on a machine called "tmp", not ./tmp/x, and writing to /x would be a silent surprise."""
    u = urlparse(uri)
    if u.netloc not in ("", "localhost"):
        raise WorkerBroken(f"OUTPUT_URI {uri[:80]!r} names a host ({u.netloc[:40]!r}): a file:// URI takes "
                           "an absolute path after three slashes (file:///abs/path), or use a plain path",
                           field="OUTPUT_URI")
    if u.query or u.fragment or u.params:
        raise WorkerBroken(f"OUTPUT_URI {uri[:80]!r}: a file:// URI has no query or fragment", field="OUTPUT_URI")
    path = unquote(u.path)
    if not path.startswith("/"):
        raise WorkerBroken(f"OUTPUT_URI {uri[:80]!r}: a file: URI needs an absolute path (file:///abs/path)",
                           field="OUTPUT_URI")
    if "\0" in path:
        raise WorkerBroken("OUTPUT_URI: the path holds a NUL byte", field="OUTPUT_URI")
    return path


def store_prefix(store: OutputStore) -> str:
    """The key prefix under which a store writes (empty for a local folder)."""
    return getattr(store, "prefix", "")
