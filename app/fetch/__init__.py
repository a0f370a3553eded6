"""Fetch an input image a caller pointed at, without letting the caller point us anywhere else.

`fetch_image(ref, limits)` takes an `https://` or `http://` URL, a `data:` URI or an `s3://` object
and returns a decoded PIL image, or raises: InvalidInput for a reference we refuse (bad scheme,
forbidden address, too large, too many pixels, not an allowed format), JobFailed for a source that
failed us (timeout, connection error, 5xx). Webhooks (`check_url` when a job is submitted,
`post_json` when it is called) go through the same guard, resolved and checked again at the call.

One job per module: `policy` (FetchLimits, describe), `guard` (the address guard), `caps` (byte and
type caps while reading), `http_client` (GET and POST to a checked address), `sources` (data: and
s3://), `decode` (the pixel cap and the decoders).
"""

from __future__ import annotations

import time

from app.errors import InvalidInput
from app.fetch.decode import decode_image
from app.fetch.guard import METADATA_ADDRESSES, check_host, embedded_ipv4, is_metadata, refusal
from app.fetch.http_client import check_url, fetch_http, post_json
from app.fetch.policy import FetchLimits, describe, system_resolver
from app.fetch.sources import fetch_data, fetch_s3

__all__ = ["FetchLimits", "METADATA_ADDRESSES", "check_host", "check_url", "decode_image", "describe",
           "embedded_ipv4", "fetch_bytes", "fetch_image", "is_metadata", "post_json", "refusal",
           "system_resolver"]


def fetch_image(ref: str, limits: FetchLimits = FetchLimits(), field: str = "image"):
    """The image at `ref` (https/http URL, data: URI, s3:// object), decoded under `limits`."""
    return decode_image(fetch_bytes(ref, limits, field), limits, field)


def fetch_bytes(ref: str, limits: FetchLimits = FetchLimits(), field: str = "image") -> bytes:
    """The raw bytes at `ref`, at most `limits.max_bytes`, within `limits.deadline_s`."""
    if not isinstance(ref, str) or not ref:
        raise InvalidInput(f"{field}: must be a URL, a data: URI or an s3:// URI", field=field)
    scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
    deadline = time.monotonic() + limits.deadline_s
    if scheme in ("http", "https"):
        return fetch_http(ref, limits, field, deadline)
    if scheme == "data":
        return fetch_data(ref, limits, field)
    if scheme == "s3":
        return fetch_s3(ref, limits, field, deadline)
    raise InvalidInput(f"{field}: scheme {scheme + ':' if scheme else '(none)'} not allowed "
                       "(use https://, http://, data: or s3://)", field=field)
