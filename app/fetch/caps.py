"""Caps applied while bytes arrive: the byte cap is enforced while streaming (a Content-Length may
lie or be absent), each read has a timeout, and a declared type must be an allowed image."""

from __future__ import annotations

import socket
import time
from typing import Callable

from app.errors import InvalidInput
from app.fetch.policy import FetchLimits

MIME_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
# Object stores and plain file servers often label images generically; the bytes decide then.
GENERIC_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})

READ_CHUNK_BYTES = 64 * 1024  # bytes per read while streaming


def read_timeout(limits: FetchLimits, deadline: float) -> float:
    return max(0.01, min(limits.read_timeout_s, deadline - time.monotonic()))


def read_capped(read: Callable[[], bytes], conn, limits: FetchLimits, field: str, deadline: float) -> bytes:
    """Read until EOF, refusing as soon as more than `limits.max_bytes` arrived."""
    buf = bytearray()
    while True:
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(read_timeout(limits, deadline))
        if time.monotonic() > deadline:
            raise socket.timeout
        chunk = read()
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limits.max_bytes:
            raise InvalidInput(f"{field}: {limits.what} is over the {limits.max_bytes} byte limit", field=field)


def check_type(content_type: str | None, limits: FetchLimits, field: str) -> None:
    """Refuse a declared type that is not an allowed image (HTML error pages, scripts, archives)."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if not mime or mime in GENERIC_TYPES or not limits.formats:
        return  # undeclared: the bytes are checked by decode_image
    if MIME_TYPES.get(mime) not in limits.formats:
        raise InvalidInput(f"{field}: content type {mime[:60]} is not an allowed image type "
                           f"({', '.join(limits.formats)})", field=field)
