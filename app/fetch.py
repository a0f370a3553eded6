"""Fetch an input image a caller pointed at, without letting the caller point us anywhere else.

`fetch_image(ref, limits)` takes an `https://` or `http://` URL, a `data:` URI or an `s3://` object
and returns a decoded PIL image, or raises: InvalidInput for a reference we refuse (bad scheme,
forbidden address, too large, too many pixels, not an allowed format), JobFailed for a source that
failed us (timeout, connection error, 5xx). Used by the edit and image-to-image tasks, and with
`formats=()` (any content type, the bytes judged by their reader) for a job's LoRA files.

Rules, and why:
- Server-side request forgery: the host is resolved once and refused when ANY of its addresses is
  loopback, private, link-local, multicast, unspecified/reserved or a cloud metadata address
  (169.254.169.254, fd00:ec2::254, ...); the connection then goes to the address we checked, not to
  a second resolution (a DNS-rebinding server answers "public" to the check and "169.254.169.254"
  to the connect). Every redirect is a new hop and is checked the same way. An IPv6 address that
  embeds an IPv4 one (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, SIIT ::ffff:0:a.b.c.d,
  NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32 with its obfuscated client) is judged by
  the embedded address: 2002:7f00:1:: is 127.0.0.1, 2002:a9fe:a9fe:: is 169.254.169.254.
- Webhooks (`check_url` when a job is submitted, `post_json` when it is called) go through the same
  guard, resolved and checked again at the call; redirects are not followed there.
- Resource exhaustion: the byte cap is enforced while streaming (a Content-Length may lie or be
  absent), each read has a timeout, and a watchdog closes the socket at the overall deadline so a
  server dripping one byte a second cannot hold the job. The pixel cap is checked from the image
  header before a single pixel is decoded (a 50 KB PNG can inflate to gigabytes).
- Only PNG, JPEG and WEBP are decoded: each extra decoder is attack surface.

The one test seam is `FetchLimits.allow_networks`: networks let through the address guard so tests
can reach a server on 127.0.0.1. It is a constructor argument, never read from the environment, so
no deployment can open it by accident; cloud metadata addresses, in every embedded form, stay
refused even inside it (opened to 0.0.0.0/0 and ::/0).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urljoin, urlsplit

from app.errors import InvalidInput, JobFailed
from app.limits import (FETCH_CONNECT_TIMEOUT_S, FETCH_DEADLINE_S, FETCH_MAX_REDIRECTS, FETCH_READ_TIMEOUT_S,
                        INPUT_IMAGE_FORMATS, MAX_INPUT_IMAGE_BYTES, MAX_INPUT_IMAGE_PIXELS)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata services (AWS/GCP/Azure/OpenStack IPv4, AWS IPv6, AWS ECS task, Alibaba).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200",
))
MIME_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
# Object stores and plain file servers often label images generically; the bytes decide then.
GENERIC_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK = 64 * 1024

_dns = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetch-dns")  # getaddrinfo has no timeout


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
        return _fetch_http(ref, limits, field, deadline)
    if scheme == "data":
        return _fetch_data(ref, limits, field)
    if scheme == "s3":
        return _fetch_s3(ref, limits, field, deadline)
    raise InvalidInput(f"{field}: scheme {scheme + ':' if scheme else '(none)'} not allowed "
                       "(use https://, http://, data: or s3://)", field=field)


def decode_image(data: bytes, limits: FetchLimits = FetchLimits(), field: str = "image"):
    """Decode `data` as one of `limits.formats`, refusing more than `limits.max_pixels` before decoding."""
    from PIL import Image, UnidentifiedImageError

    allowed = " or ".join(limits.formats)
    try:
        im = Image.open(io.BytesIO(data), formats=list(limits.formats))  # reads the header only
    except Image.DecompressionBombError:  # PIL's own header check (2 x 89 Mpx), far above ours: same answer
        raise InvalidInput(f"{field}: image has more than {limits.max_pixels} pixels (decompression-bomb guard)",
                           field=field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidInput(f"{field}: not a {allowed} image", field=field) from None
    width, height = im.size
    if width * height > limits.max_pixels:
        raise InvalidInput(f"{field}: image is {width}x{height}, more than {limits.max_pixels} pixels "
                           "(decompression-bomb guard)", field=field)
    try:
        im.load()  # first frame only: an animated WEBP's other frames are never decoded
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InvalidInput(f"{field}: {im.format} image is corrupt or truncated", field=field) from None
    return im


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


# --- the address guard ----------------------------------------------------------------------------

# IPv6 forms that carry an IPv4 address a packet ends up at: judged by that address, not by the
# IPv6 one (2002:7f00:1:: is 127.0.0.1 through a 6to4 relay; Python calls it global).
NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: operator-defined layout; refused whole
SIIT_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 IPv4-translated (::ffff:0:a.b.c.d)
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d (RFC 4291 2.5.5.1)


def embedded_ipv4(address: Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address embeds (IPv4-mapped, IPv4-compatible, SIIT, NAT64, 6to4 and
    both of Teredo's: server and de-obfuscated client); () for an IPv4 address or a plain IPv6 one."""
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo  # (server, client): Python already undoes the client's XOR obfuscation
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in NAT64_WELL_KNOWN or address in SIIT_TRANSLATED:
        return (low32,)
    if address in IPV4_COMPATIBLE and int(address) > 1:  # :: and ::1 keep their own meaning
        return (low32,)
    return ()


def is_metadata(address: Address) -> bool:
    """A cloud metadata address, itself or embedded in an IPv6 form (::ffff:169.254.169.254, 2002:a9fe:a9fe::)."""
    return address in METADATA_ADDRESSES or any(a in METADATA_ADDRESSES for a in embedded_ipv4(address))


def refusal(address: Address) -> str | None:
    """Why `address` must not be contacted, or None when it is a public address."""
    inner = embedded_ipv4(address)
    if inner:  # judged by where the packets go: every embedded address must be public
        for a in inner:
            why = refusal(a)
            if why:
                return f"{why} ({a}, embedded in {address})"
        return None
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address) and address in NAT64_LOCAL_USE:
        return "a local-use NAT64 address"
    for kind in ("loopback", "link_local", "multicast", "private", "unspecified", "reserved"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not address.is_global:  # shared (CGNAT), documentation, benchmarking ranges...
        return "not a public address"
    return None


def check_host(host: str, port: int, limits: FetchLimits, field: str, deadline: float) -> str:
    """Resolve `host` and return the address to connect to; refuse if ANY address is forbidden."""
    allowed = [ipaddress.ip_network(n) for n in limits.allow_networks]
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]  # a literal: nothing to resolve
    except ValueError:
        future = _dns.submit(limits.resolver, host, port)
        try:
            found = future.result(timeout=max(0.01, min(limits.connect_timeout_s, deadline - time.monotonic())))
        except FutureTimeout:
            raise JobFailed(f"{field}: resolving {host} timed out", field=field) from None
        except (OSError, UnicodeError):
            raise InvalidInput(f"{field}: host {host} does not resolve", field=field) from None
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in found]
    if not addresses:
        raise InvalidInput(f"{field}: host {host} does not resolve", field=field)
    for a in addresses:
        why = refusal(a)
        if why and (is_metadata(a) or not any(a in n for n in allowed if n.version == a.version)):
            raise InvalidInput(f"{field}: host {host} resolves to {why}; refused", field=field)
    return str(addresses[0])


# --- http(s) --------------------------------------------------------------------------------------

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


def _target(url: str, limits: FetchLimits, field: str, deadline: float, hop: int) -> tuple:
    """(split URL, port, checked address) for one hop, or raise InvalidInput (JobFailed: DNS timed out)."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https"):  # a redirect may try file:, ftp:, gopher:...
        if hop:
            raise InvalidInput(f"{field}: redirected to a {u.scheme or 'relative'}: URL; refused", field=field)
        raise InvalidInput(f"{field}: scheme {u.scheme + ':' if u.scheme else '(none)'} not allowed "
                           "(use https:// or http://)", field=field)
    if u.username or u.password:
        raise InvalidInput(f"{field}: credentials in the URL are not accepted", field=field)
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput(f"{field}: bad port in {describe(url)}", field=field) from None
    if not u.hostname:
        raise InvalidInput(f"{field}: URL has no host", field=field)
    return u, port, check_host(u.hostname, port, limits, field, deadline)


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


def _fetch_http(url: str, limits: FetchLimits, field: str, deadline: float) -> bytes:
    for hop in range(limits.max_redirects + 1):
        u, port, address = _target(url, limits, field, deadline, hop)
        body, location = _get_once(u, port, address, url, limits, field, deadline)
        if location is None:
            return body
        url = urljoin(url, location)
    raise InvalidInput(f"{field}: more than {limits.max_redirects} redirects", field=field)


def _get_once(u, port: int, address: str, url: str, limits: FetchLimits, field: str,
              deadline: float) -> tuple[bytes, str | None]:
    """One GET to a checked address: (body, None) or (b"", redirect location)."""
    conn = _connection(u, port, address, limits, deadline)
    timer, fired = _watchdog(conn, deadline)
    where = describe(url)
    try:
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        conn.request("GET", path, headers={"User-Agent": "diffusion-worker", "Accept-Encoding": "identity",
                                           "Accept": ", ".join(sorted(MIME_TYPES)) if limits.formats else "*/*"})
        conn.sock.settimeout(_read_timeout(limits, deadline))
        resp = conn.getresponse()
        if resp.status in REDIRECTS:
            location = resp.getheader("Location")
            if not location:
                raise InvalidInput(f"{field}: redirect without a Location from {where}", field=field)
            return b"", location
        if resp.status != 200:
            err = JobFailed if resp.status >= 500 or resp.status == 429 else InvalidInput
            raise err(f"{field}: {where} answered HTTP {resp.status}", field=field)
        _check_type(resp.getheader("Content-Type"), limits, field)
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > limits.max_bytes:
            raise InvalidInput(f"{field}: {limits.what} is {int(length)} bytes, over the {limits.max_bytes} "
                               "byte limit", field=field)
        return _read_capped(lambda: resp.read1(CHUNK), conn, limits, field, deadline), None
    except (socket.timeout, TimeoutError):
        if fired.is_set():
            raise JobFailed(f"{field}: fetching {where} took longer than {limits.deadline_s:g} s", field=field) from None
        raise JobFailed(f"{field}: {where} timed out", field=field) from None
    except ssl.SSLError:
        raise JobFailed(f"{field}: TLS failed with {where}", field=field) from None
    except (OSError, http.client.HTTPException):
        if fired.is_set():
            raise JobFailed(f"{field}: fetching {where} took longer than {limits.deadline_s:g} s", field=field) from None
        raise JobFailed(f"{field}: connection to {where} failed", field=field) from None
    finally:
        timer.cancel()
        conn.close()


# --- outbound calls to a caller's URL (webhooks) --------------------------------------------------

def check_url(url: str, limits: FetchLimits = FetchLimits(), field: str = "webhook") -> str:
    """Refuse a URL this worker must not call, without calling it: scheme (http/https only),
    credentials, host, port, and the address guard on every address the host resolves to now.
    Returns the address it would connect to. For a URL given now and called later (a webhook),
    `post_json` checks again when it calls: a DNS answer can change in between."""
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"{field}: must be an https:// or http:// URL", field=field)
    return _target(url, limits, field, time.monotonic() + limits.deadline_s, hop=0)[2]


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
    u, port, address = _target(url, limits, field, deadline, hop=0)
    conn = _connection(u, port, address, limits, deadline)
    timer, fired = _watchdog(conn, deadline)
    where = describe(url)
    try:
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        conn.request("POST", path, body=payload, headers={
            "User-Agent": "diffusion-worker", "Content-Type": "application/json", "Accept-Encoding": "identity"})
        conn.sock.settimeout(_read_timeout(limits, deadline))
        resp = conn.getresponse()
        resp.read(CHUNK)
        return resp.status
    except (socket.timeout, TimeoutError):
        if fired.is_set():
            raise JobFailed(f"{field}: calling {where} took longer than {limits.deadline_s:g} s", field=field) from None
        raise JobFailed(f"{field}: {where} timed out", field=field) from None
    except ssl.SSLError:
        raise JobFailed(f"{field}: TLS failed with {where}", field=field) from None
    except (OSError, http.client.HTTPException):
        if fired.is_set():
            raise JobFailed(f"{field}: calling {where} took longer than {limits.deadline_s:g} s", field=field) from None
        raise JobFailed(f"{field}: connection to {where} failed", field=field) from None
    finally:
        timer.cancel()
        conn.close()


def _read_timeout(limits: FetchLimits, deadline: float) -> float:
    return max(0.01, min(limits.read_timeout_s, deadline - time.monotonic()))


def _read_capped(read: Callable[[], bytes], conn, limits: FetchLimits, field: str, deadline: float) -> bytes:
    """Read until EOF, refusing as soon as more than `limits.max_bytes` arrived."""
    buf = bytearray()
    while True:
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(_read_timeout(limits, deadline))
        if time.monotonic() > deadline:
            raise socket.timeout
        chunk = read()
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limits.max_bytes:
            raise InvalidInput(f"{field}: {limits.what} is over the {limits.max_bytes} byte limit", field=field)


def _check_type(content_type: str | None, limits: FetchLimits, field: str) -> None:
    """Refuse a declared type that is not an allowed image (HTML error pages, scripts, archives)."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if not mime or mime in GENERIC_TYPES or not limits.formats:
        return  # undeclared: the bytes are checked by decode_image
    if MIME_TYPES.get(mime) not in limits.formats:
        raise InvalidInput(f"{field}: content type {mime[:60]} is not an allowed image type "
                           f"({', '.join(limits.formats)})", field=field)


# --- data: and s3:// ------------------------------------------------------------------------------

def _fetch_data(ref: str, limits: FetchLimits, field: str) -> bytes:
    """`data:image/png;base64,...`: type checked, size capped before decoding the base64."""
    header, comma, payload = ref[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InvalidInput(f"{field}: data: URI must be base64 (data:image/png;base64,...)", field=field)
    _check_type(header[: -len(";base64")] or None, limits, field)
    if len(payload) > (limits.max_bytes + 2) // 3 * 4:
        raise InvalidInput(f"{field}: image is over the {limits.max_bytes} byte limit", field=field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field}: data: URI is not valid base64", field=field) from None


def _fetch_s3(ref: str, limits: FetchLimits, field: str, deadline: float) -> bytes:
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
        _check_type(head.get("ContentType"), limits, field)
        if head.get("ContentLength", 0) > limits.max_bytes:
            raise InvalidInput(f"{field}: {limits.what} is {head['ContentLength']} bytes, over the {limits.max_bytes} "
                               "byte limit", field=field)
        # The Range caps what the store sends even if the object grew since the HEAD.
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limits.max_bytes}")["Body"]
        try:
            return _read_capped(lambda: body.read(CHUNK), None, limits, field, deadline)
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
