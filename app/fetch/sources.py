"""The two references that are not http(s): a `data:` URI and an `s3://` object, under the same caps."""

from __future__ import annotations

import base64
import binascii
import socket
from urllib.parse import urlsplit

from app.errors import InvalidInput, JobFailed
from app.fetch.caps import READ_CHUNK_BYTES, check_type, read_capped
from app.fetch.policy import FetchLimits


def fetch_data(ref: str, limits: FetchLimits, field: str) -> bytes:
    """`data:image/png;base64,...`: type checked, size capped before decoding the base64."""
    header, comma, payload = ref[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InvalidInput(f"{field}: data: URI must be base64 (data:image/png;base64,...)", field=field)
    check_type(header[: -len(";base64")] or None, limits, field)
    if len(payload) > (limits.max_bytes + 2) // 3 * 4:
        raise InvalidInput(f"{field}: {limits.what} is over the {limits.max_bytes} byte limit", field=field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field}: data: URI is not valid base64", field=field) from None


def fetch_s3(ref: str, limits: FetchLimits, field: str, deadline: float) -> bytes:
    """An object in S3 (credentials from the worker's environment), size checked before reading."""
    from botocore.exceptions import ClientError

    from app.storage import describe_s3_error, s3_client

    u = urlsplit(ref)
    bucket, key = u.netloc, u.path.lstrip("/")
    if not bucket or not key:
        raise InvalidInput(f"{field}: s3:// URI needs a bucket and a key", field=field)
    client = limits.s3_client or s3_client(limits.connect_timeout_s, limits.read_timeout_s, max_attempts=3)
    where = f"s3://{bucket}/{key}"[:120]
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        check_type(head.get("ContentType"), limits, field)
        if head.get("ContentLength", 0) > limits.max_bytes:
            raise InvalidInput(f"{field}: {limits.what} is {head['ContentLength']} bytes, over the {limits.max_bytes} "
                               "byte limit", field=field)
        # The Range caps what the store sends even if the object grew since the HEAD.
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limits.max_bytes}")["Body"]
        try:
            return read_capped(lambda: body.read(READ_CHUNK_BYTES), None, limits, field, deadline)
        finally:
            body.close()
    except (InvalidInput, JobFailed):
        raise
    except socket.timeout:
        raise JobFailed(f"{field}: reading {where} took longer than {limits.deadline_s:g} s", field=field) from None
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (403, 404):
            raise InvalidInput(f"{field}: {where} not found or not readable by this worker", field=field) from None
        raise JobFailed(f"{field}: reading {where} failed: {describe_s3_error(e)}", field=field) from None
    except Exception as e:  # botocore's many transport errors
        raise JobFailed(f"{field}: reading {where} failed: {describe_s3_error(e)}", field=field) from None
