"""GET an image from, or POST a webhook to, a caller's http(s) URL through the address guard.

The connection goes to the checked address (Host header, SNI and certificate keep the name); every
redirect of a GET is a new hop checked the same way (a POST follows none); a watchdog shuts the
socket at the overall deadline, so a server dripping one byte a second cannot hold the job.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from typing import Callable
from urllib.parse import urljoin

from app.errors import InvalidInput, JobFailed
from app.fetch.caps import READ_CHUNK_BYTES, MIME_TYPES, check_type, read_capped, read_timeout
from app.fetch.guard import target
from app.fetch.policy import FetchLimits, describe

REDIRECTS = frozenset({301, 302, 303, 307, 308})


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a checked address; Host header and URL keep the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; SNI and certificate check use the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _connection(u, port: int, address: str, limits: FetchLimits, deadline: float):
    timeout = max(0.01, min(limits.connect_timeout_s, deadline - time.monotonic()))
    if u.scheme == "https":
        return _PinnedHTTPS(u.hostname, port, address, timeout, limits.ssl_context or ssl.create_default_context())
    return _PinnedHTTP(u.hostname, port, address, timeout)


def _watchdog(conn, deadline: float) -> tuple[threading.Timer, threading.Event]:
    """A timer that shuts the socket at the overall deadline: unblocks any read, however slow the drip."""
    fired = threading.Event()

    def fire():
        fired.set()
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), fire)
    timer.daemon = True
    timer.start()
    return timer, fired


def fetch_http(url: str, limits: FetchLimits, field: str, deadline: float) -> bytes:
    for hop in range(limits.max_redirects + 1):
        u, port, address = target(url, limits, field, deadline, hop)
        body, location = _get_once(u, port, address, url, limits, field, deadline)
        if location is None:
            return body
        url = urljoin(url, location)
    raise InvalidInput(f"{field}: more than {limits.max_redirects} redirects", field=field)


def _get_once(u, port: int, address: str, url: str, limits: FetchLimits, field: str,
              deadline: float) -> tuple[bytes, str | None]:
    """One GET to a checked address: (body, None) or (b"", redirect location)."""
    accept = ", ".join(sorted(MIME_TYPES)) if limits.formats else "*/*"

    def answer(conn, resp, where: str) -> tuple[bytes, str | None]:
        if resp.status in REDIRECTS:
            location = resp.getheader("Location")
            if not location:
                raise InvalidInput(f"{field}: redirect without a Location from {where}", field=field)
            return b"", location
        if resp.status != 200:
            err = JobFailed if resp.status >= 500 or resp.status == 429 else InvalidInput
            raise err(f"{field}: {where} answered HTTP {resp.status}", field=field)
        check_type(resp.getheader("Content-Type"), limits, field)
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > limits.max_bytes:
            raise InvalidInput(f"{field}: {limits.what} is {int(length)} bytes, over the {limits.max_bytes} byte limit",
                               field=field)
        return read_capped(lambda: resp.read1(READ_CHUNK_BYTES), conn, limits, field, deadline), None

    return _request("GET", u, port, address, url, limits, field, deadline, answer,
                    headers={"User-Agent": "diffusion-worker", "Accept-Encoding": "identity", "Accept": accept})


def _request(method: str, u, port: int, address: str, url: str, limits: FetchLimits, field: str,
             deadline: float, answer: Callable, headers: dict[str, str], body: bytes | None = None):
    """One request to a checked address under the watchdog; `answer(conn, resp, where)` reads the reply.

    GET and POST share it so both map timeouts, TLS and connection failures to the same typed errors.
    """
    conn = _connection(u, port, address, limits, deadline)
    timer, fired = _watchdog(conn, deadline)
    where = describe(url)
    doing = "fetching" if method == "GET" else "calling"
    try:
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        conn.request(method, path, body=body, headers=headers)
        conn.sock.settimeout(read_timeout(limits, deadline))
        return answer(conn, conn.getresponse(), where)
    except (socket.timeout, TimeoutError):
        if fired.is_set():
            raise JobFailed(f"{field}: {doing} {where} took longer than {limits.deadline_s:g} s", field=field) from None
        raise JobFailed(f"{field}: {where} timed out", field=field) from None
    except ssl.SSLError:
        raise JobFailed(f"{field}: TLS failed with {where}", field=field) from None
    except (OSError, http.client.HTTPException):
        if fired.is_set():
            raise JobFailed(f"{field}: {doing} {where} took longer than {limits.deadline_s:g} s", field=field) from None
        raise JobFailed(f"{field}: connection to {where} failed", field=field) from None
    finally:
        timer.cancel()
        conn.close()


def check_url(url: str, limits: FetchLimits = FetchLimits(), field: str = "webhook") -> str:
    """Refuse a URL this worker must not call, without calling it: scheme (http/https only),
    credentials, host, port, and the address guard on every address the host resolves to now.
    Returns the address it would connect to. For a URL given now and called later (a webhook),
    `post_json` checks again when it calls: a DNS answer can change in between."""
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"{field}: must be an https:// or http:// URL", field=field)
    return target(url, limits, field, time.monotonic() + limits.deadline_s, hop=0)[2]


def post_json(url: str, payload: bytes, limits: FetchLimits = FetchLimits(), field: str = "webhook") -> int:
    """POST `payload` (JSON bytes) to `url` and return the answer's HTTP status.

    The same guard as an image fetch: the host is resolved and checked now, the connection goes to
    the checked address (Host header, SNI and certificate keep the name), and the whole exchange
    ends by `limits.deadline_s`. Redirects are not followed: a 3xx is returned as it is, so the
    payload never goes to a second, unchecked address. The answer's body is read (at most 64 KiB)
    and dropped. Raises InvalidInput for a refused URL, JobFailed for a timeout or connection failure.
    """
    deadline = time.monotonic() + limits.deadline_s
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"{field}: must be an https:// or http:// URL", field=field)
    u, port, address = target(url, limits, field, deadline, hop=0)

    def answer(conn, resp, where: str) -> int:
        resp.read(READ_CHUNK_BYTES)
        return resp.status

    return _request("POST", u, port, address, url, limits, field, deadline, answer, body=payload, headers={
        "User-Agent": "diffusion-worker", "Content-Type": "application/json", "Accept-Encoding": "identity"})
