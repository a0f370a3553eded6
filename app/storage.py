"""Where results go: S3 (or any S3-compatible store) or a local folder.

Keys are `{prefix}/{job_id}/{index}.{ext}`: a retried job overwrites its own objects instead of
adding new ones. Every upload is verified (size read back) before its URL is returned, so a job
never reports an object that is not there. The S3 endpoint comes from boto3's own configuration
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`), so R2, MinIO and moto work unchanged.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from app.errors import JobFailed, WorkerBroken
from app.retry import Backoff, ShortObject, retry

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
    def put(self, key: str, data: bytes, content_type: str) -> Stored: ...
    def delete(self, key: str) -> bool: ...
    def check(self) -> str: ...


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

    def _put_verified(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        size = self.client.head_object(Bucket=self.bucket, Key=key).get("ContentLength")
        if size != len(data):
            raise ShortObject(f"stored size {size} != {len(data)}")

    def put(self, key: str, data: bytes, content_type: str) -> Stored:
        try:
            retry(lambda: self._put_verified(key, data, content_type), self.backoff, f"upload {key}")
        except ShortObject as e:
            raise JobFailed(f"upload of {key} failed: {e}") from None
        except Exception as e:  # botocore raises many unrelated types; all mean "not stored"
            raise JobFailed(f"upload of {key} failed: {describe_s3_error(e)}") from None
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.ttl
        )
        return Stored(url=url, key=key, bytes=len(data))

    def delete(self, key: str) -> bool:
        """Remove `key` (a failed job's partial output); False when even the retries failed."""
        try:
            retry(lambda: self.client.delete_object(Bucket=self.bucket, Key=key), self.backoff, f"delete {key}")
            return True
        except Exception:
            return False

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
    """Files in a folder, returned as file:// URLs. Writes are atomic (temp file, then rename)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def put(self, key: str, data: bytes, content_type: str) -> Stored:
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            size = path.stat().st_size
        except OSError as e:
            raise JobFailed(f"writing {key} failed: {e.strerror}") from None
        if size != len(data):
            raise JobFailed(f"writing {key} failed: stored size {size} != {len(data)}")
        return Stored(url=path.as_uri(), key=key, bytes=size)

    def delete(self, key: str) -> bool:
        try:
            (self.root / key).unlink(missing_ok=True)
            return True
        except OSError:
            return False

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
    if uri.startswith("file://"):
        return LocalStore(urlparse(uri).path)
    if "://" in uri:
        raise WorkerBroken(f"unsupported OUTPUT_URI scheme: {uri.split('://')[0]}://", field="OUTPUT_URI")
    return LocalStore(uri)


def store_prefix(store: OutputStore) -> str:
    """The key prefix under which a store writes (empty for a local folder)."""
    return getattr(store, "prefix", "")
