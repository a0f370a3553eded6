"""What a fetch may do: the caps and timeouts (`FetchLimits`), the resolver, and how a reference may
appear in a message (`describe`: no query string, no user info, so presigned signatures stay out of
errors and logs).

The one test seam is `FetchLimits.allow_networks`: networks let through the address guard so tests
can reach a server on 127.0.0.1. It is a constructor argument, never read from the environment, so
no deployment can open it by accident; cloud metadata addresses, in every embedded form, stay
refused even inside it (opened to 0.0.0.0/0 and ::/0).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from app.limits import (FETCH_CONNECT_TIMEOUT_S, FETCH_DEADLINE_S, FETCH_MAX_REDIRECTS, FETCH_READ_TIMEOUT_S,
                        INPUT_IMAGE_FORMATS, MAX_INPUT_IMAGE_BYTES, MAX_INPUT_IMAGE_PIXELS)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (IPv4 and IPv6)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


@dataclass(frozen=True)
class FetchLimits:
    """Caps and timeouts for one fetch; defaults are app.limits' constants."""

    max_bytes: int = MAX_INPUT_IMAGE_BYTES
    max_pixels: int = MAX_INPUT_IMAGE_PIXELS
    formats: tuple[str, ...] = INPUT_IMAGE_FORMATS
    connect_timeout_s: float = FETCH_CONNECT_TIMEOUT_S
    read_timeout_s: float = FETCH_READ_TIMEOUT_S
    deadline_s: float = FETCH_DEADLINE_S
    max_redirects: int = FETCH_MAX_REDIRECTS
    # TEST SEAM (see module docstring): CIDRs exempt from the address guard, e.g. ("127.0.0.1/32",).
    allow_networks: tuple[str, ...] = ()
    resolver: Callable[[str, int], list[str]] = system_resolver
    ssl_context: ssl.SSLContext | None = None  # None: the system's trust store, hostname checked
    s3_client: object | None = None  # None: app.storage.s3_client() from boto3's environment
    what: str = "image"  # what the bytes are, as errors name them ("LoRA file")


def describe(ref: str) -> str:
    """`ref` as it may appear in a message or log: no query (presigned signatures), no userinfo."""
    if ref.startswith("data:"):
        return "data: URI"
    u = urlsplit(ref)
    host = u.hostname or ""
    try:
        host += f":{u.port}" if u.port else ""
    except ValueError:  # "user:pass@host" with a '/' in pass parses as a bad port: show nothing of it
        host = "(unparsable host)"
    text = f"{u.scheme}://{host}{u.path}"
    return text if len(text) <= 120 else text[:117] + "..."
