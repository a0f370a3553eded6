"""app.fetch against a real HTTP server on loopback serving hostile images, and moto S3.

The address guard refuses loopback, so the tests that must reach the server open exactly
127.0.0.1/32 through FetchLimits.allow_networks (the documented test seam); the redirect tests
leave every other address, 127.0.0.2 included, to the default refusal.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import threading
import time
import zlib
import struct
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from app.errors import InvalidInput, JobFailed
from app.fetch import FetchLimits, check_url, decode_image, describe, fetch_bytes, fetch_image, refusal

MiB = 1024 * 1024


def png_bytes(w=64, h=48, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(side=20000) -> bytes:
    """A real decompression bomb: a side x side greyscale PNG of zeros, a few hundred KB on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row_block = b"\0" * ((side + 1) * 500)
    idat = b"".join(z.compress(row_block) for _ in range(side // 500)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


OK_PNG = png_bytes()
BOMB = bomb_png(5000)  # 25 Mpx: over our 16.7 Mpx cap, under PIL's own 89 Mpx warning
HUGE_BOMB = bomb_png(20000)  # 400 Mpx: PIL's header check fires first; same answer


class Routes(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: endless streams are possible
    hits: list = []
    other = ""  # base URL of the second server (127.0.0.2), filled by the fixture

    def log_message(self, *a):
        pass

    def send(self, status, body=b"", ctype="image/png", headers=None, length=True):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def stream(self, seconds_max=10, size_max=64 * MiB, chunk=64 * 1024, pause=0.0):
        """Bounded 'endless' body: stops when the client hangs up, or at the size/time bound."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        sent, t0 = 0, time.monotonic()
        try:
            while sent < size_max and time.monotonic() - t0 < seconds_max:
                self.wfile.write(b"\0" * chunk)
                sent += chunk
                time.sleep(pause)
        except OSError:
            pass

    def do_GET(self):
        self.hits.append((self.server.server_address[0], self.path, self.headers.get("Host")))
        path = self.path.split("?")[0]
        if path == "/ok.png":
            self.send(200, OK_PNG)
        elif path == "/generic":
            self.send(200, OK_PNG, ctype="application/octet-stream")
        elif path == "/big":  # honest Content-Length over the cap
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(50 * MiB))
            self.end_headers()
        elif path == "/endless":  # no length, never ends on its own
            self.stream()
        elif path == "/slow":  # headers never come within the read timeout
            time.sleep(3)
            self.send(200, OK_PNG)
        elif path == "/drip":  # each byte in time, the whole never: only the deadline stops it
            self.stream(seconds_max=8, chunk=1, pause=0.1)
        elif path == "/bomb.png":
            self.send(200, BOMB)
        elif path == "/html":
            self.send(200, b"<html>nope</html>", ctype="text/html; charset=utf-8")
        elif path == "/gif":
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, "GIF")
            self.send(200, buf.getvalue(), ctype="application/octet-stream")
        elif path == "/garbage":
            self.send(200, b"\x89PNG\r\n\x1a\n" + b"\x07" * 300, ctype="image/png")
        elif path == "/500":
            self.send(500, b"oops", ctype="text/plain")
        elif path == "/404":
            self.send(404, b"no", ctype="text/plain")
        elif path.startswith("/to/"):  # /to/<name>: redirect to a named target
            target = {
                "loopback2": f"{self.other}/ok.png",  # another loopback address: refused
                "metadata": "http://169.254.169.254/latest/meta-data/iam/",
                "metadata6": "http://[fd00:ec2::254]/latest/meta-data/",
                "private": "http://10.0.0.7/ok.png",
                "file": "file:///etc/passwd",
                "same": "/ok.png",  # relative, same allowed host: followed
                "loop": self.path,
            }[path[4:]]
            self.send(302, b"", headers={"Location": target})
        else:
            self.send(404, b"", ctype="text/plain")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-body is the point of these tests


@pytest.fixture(scope="module")
def servers():
    """A server on 127.0.0.1 (reachable through the seam) and one on 127.0.0.2 (never reachable)."""
    Routes.hits = []
    started = []
    for ip in ("127.0.0.1", "127.0.0.2"):
        srv = QuietServer((ip, 0), Routes)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
    Routes.other = f"http://127.0.0.2:{started[1].server_address[1]}"
    yield f"http://127.0.0.1:{started[0].server_address[1]}"
    for srv in started:
        srv.shutdown()
        srv.server_close()


LIMITS = FetchLimits(allow_networks=("127.0.0.1/32",), max_bytes=1 * MiB, connect_timeout_s=1.0,
                     read_timeout_s=0.5, deadline_s=2.0)


def refused(ref, limits=LIMITS, err=InvalidInput, within=None):
    """Fetch `ref`, expect `err`; return (message, seconds taken)."""
    t0 = time.monotonic()
    with pytest.raises(err) as info:
        fetch_image(ref, limits, field="image")
    took = time.monotonic() - t0
    assert info.value.field == "image"
    if within is not None:
        assert took < within, f"{ref} took {took:.2f} s"
    return info.value.message, took


def test_fetches_an_image_through_the_seam(servers):
    im = fetch_image(f"{servers}/ok.png", LIMITS)
    assert im.size == (64, 48) and im.getpixel((0, 0)) == (200, 30, 30)
    assert fetch_image(f"{servers}/generic", LIMITS).format == "PNG"  # octet-stream: the bytes decide


def test_loopback_refused_by_default_without_contacting_it(servers):
    before = len(Routes.hits)
    msg, _ = refused(f"{servers}/ok.png", FetchLimits(), within=1)
    assert "loopback" in msg and len(Routes.hits) == before


@pytest.mark.parametrize("target, why", [("loopback2", "loopback"), ("metadata", "metadata"),
                                         ("metadata6", "metadata"), ("private", "private")])
def test_redirect_to_forbidden_address_refused(servers, target, why):
    """The redirect hop is re-checked with the default rule: 127.0.0.2 serves the image but is never hit."""
    msg, _ = refused(f"{servers}/to/{target}", within=1)
    assert why in msg and "refused" in msg
    assert not any(ip == "127.0.0.2" for ip, _, _ in Routes.hits)


def test_redirect_to_file_scheme_refused(servers):
    msg, _ = refused(f"{servers}/to/file", within=1)
    assert "file:" in msg


def test_allowed_redirect_followed_and_loops_bounded(servers):
    assert fetch_image(f"{servers}/to/same", LIMITS).size == (64, 48)
    msg, _ = refused(f"{servers}/to/loop", within=2)
    assert "redirects" in msg


def test_oversize_refused_from_content_length(servers):
    msg, took = refused(f"{servers}/big", within=1)
    assert "over the 1048576 byte limit" in msg and "52428800" in msg


def test_endless_stream_stopped_at_the_byte_cap(servers):
    msg, _ = refused(f"{servers}/endless", within=LIMITS.deadline_s)
    assert "over the 1048576 byte limit" in msg


def test_stalled_server_hits_the_read_timeout(servers):
    msg, took = refused(f"{servers}/slow", err=JobFailed, within=LIMITS.read_timeout_s + 0.5)
    assert "timed out" in msg


def test_dripping_server_hits_the_overall_deadline(servers):
    msg, took = refused(f"{servers}/drip", err=JobFailed, within=LIMITS.deadline_s + 0.5)
    assert took >= LIMITS.deadline_s - 0.1 and "longer than 2 s" in msg


def test_decompression_bomb_refused_before_decoding(servers):
    assert len(BOMB) < 1 * MiB  # small on the wire: only the pixel cap catches it
    msg, took = refused(f"{servers}/bomb.png", within=1)
    assert "5000x5000" in msg and "decompression-bomb" in msg


def test_huge_bomb_refused_the_same_way():
    with pytest.raises(InvalidInput, match="decompression-bomb"):
        fetch_image(data_uri(HUGE_BOMB), LIMITS)


@pytest.mark.parametrize("path, words", [("/html", "content type text/html"), ("/gif", "not a PNG or JPEG or WEBP"),
                                         ("/garbage", "not a PNG or JPEG or WEBP"), ("/404", "HTTP 404")])
def test_wrong_content_refused(servers, path, words):
    msg, _ = refused(f"{servers}{path}", within=1)
    assert words in msg


def test_server_error_is_a_failed_fetch_and_hides_the_query(servers):
    msg, _ = refused(f"{servers}/500?X-Amz-Signature=deadbeefcafe&token=abc", err=JobFailed, within=1)
    assert "HTTP 500" in msg and "deadbeefcafe" not in msg and "?" not in msg


def test_dns_answer_is_pinned_against_rebinding(servers):
    """The name is resolved once; the connection goes to that checked address, never to a second answer."""
    port = int(servers.rsplit(":", 1)[1])
    answers = iter([["127.0.0.1"], ["169.254.169.254"], ["169.254.169.254"]])
    calls = []

    def rebinding_resolver(host, p):  # DNS cannot be steered on this machine: the resolver is the seam
        calls.append(host)
        return next(answers)

    limits = FetchLimits(allow_networks=("127.0.0.1/32",), resolver=rebinding_resolver, read_timeout_s=1)
    assert fetch_image(f"http://images.example.test:{port}/ok.png", limits).size == (64, 48)
    assert calls == ["images.example.test"]
    assert Routes.hits[-1] == ("127.0.0.1", "/ok.png", f"images.example.test:{port}")


def test_any_forbidden_address_refuses_the_host():
    limits = FetchLimits(resolver=lambda h, p: ["93.184.216.34", "10.1.1.1"])
    with pytest.raises(InvalidInput, match="private"):
        fetch_bytes("https://mixed.example.test/a.png", limits)


@pytest.mark.parametrize("ip, ok", [("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False),
                                    ("::1", False), ("10.0.0.1", False), ("172.16.5.4", False),
                                    ("192.168.1.1", False), ("169.254.169.254", False), ("fd00:ec2::254", False),
                                    ("fe80::1", False), ("224.0.0.251", False), ("ff02::1", False),
                                    ("0.0.0.0", False), ("100.64.0.1", False), ("::ffff:127.0.0.1", False)])
def test_address_guard(ip, ok):
    assert (refusal(ipaddress.ip_address(ip)) is None) == ok


def test_seam_never_opens_metadata():
    limits = FetchLimits(allow_networks=("169.254.0.0/16", "0.0.0.0/0"))
    with pytest.raises(InvalidInput, match="metadata"):
        fetch_bytes("http://169.254.169.254/latest/meta-data/", limits)


@pytest.mark.parametrize("ref, words", [("ftp://example.com/a.png", "scheme ftp:"), ("file:///etc/passwd", "scheme file:"),
                                        ("/etc/passwd", "scheme (none)"), ("gopher://x/", "scheme gopher:"),
                                        ("http://user:pw@example.com/a.png", "credentials")])
def test_schemes_and_credentials_refused(ref, words):
    with pytest.raises(InvalidInput) as info:
        fetch_bytes(ref, FetchLimits())
    assert words in info.value.message and "pw" not in info.value.message


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_data_uris_under_the_same_caps():
    assert fetch_image(data_uri(OK_PNG), LIMITS).size == (64, 48)
    for ref, words in [(data_uri(b"\0" * (2 * MiB)), "byte limit"), (data_uri(BOMB), "decompression-bomb"),
                       (data_uri(OK_PNG, "text/html"), "content type"), ("data:image/png;base64,@@@", "base64"),
                       ("data:image/png,rawbytes", "must be base64")]:
        with pytest.raises(InvalidInput) as info:
            fetch_image(ref, LIMITS)
        assert words in info.value.message, (words, info.value.message)


def test_s3_objects_under_the_same_caps(bucket):
    import boto3

    from app.storage import s3_client

    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="in/ok.png", Body=OK_PNG, ContentType="image/png")
    s3.put_object(Bucket=bucket, Key="in/big.png", Body=b"\0" * (2 * MiB), ContentType="image/png")
    s3.put_object(Bucket=bucket, Key="in/bomb.png", Body=BOMB)
    s3.put_object(Bucket=bucket, Key="in/page.html", Body=b"<html/>", ContentType="text/html")
    limits = FetchLimits(max_bytes=1 * MiB, s3_client=s3_client(max_attempts=1))
    assert fetch_image(f"s3://{bucket}/in/ok.png", limits).size == (64, 48)
    for key, words in [("big.png", "byte limit"), ("bomb.png", "decompression-bomb"),
                       ("page.html", "content type"), ("missing.png", "not found")]:
        with pytest.raises(InvalidInput) as info:
            fetch_image(f"s3://{bucket}/in/{key}", limits)
        assert words in info.value.message, (key, info.value.message)


def test_decode_reads_only_allowed_formats():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "BMP")
    with pytest.raises(InvalidInput, match="not a PNG"):
        decode_image(buf.getvalue())
    assert decode_image(OK_PNG).size == (64, 48)


def test_describe_drops_query_and_userinfo():
    assert describe("https://u:p@h.example:8443/a/b.png?X-Amz-Signature=s") == "https://h.example:8443/a/b.png"


# --- IPv6 forms that embed an IPv4 address: judged by where the packets go --------------------------

def teredo(server: str, client: str, port: int = 40000) -> str:
    """A Teredo address (2001::/32): server in the clear, client port and address XOR-obfuscated."""
    s, c = int(ipaddress.IPv4Address(server)), int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (s << 64) | (0x8000 << 48) | ((port ^ 0xFFFF) << 32) | c))


EMBEDDED_FORBIDDEN = [  # (address, what it carries)
    ("2002:7f00:1::", "loopback"), ("2002:7f00:1:ffff::1", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::", "metadata"), ("2002:0a00:0001::", "private"), ("2002:c0a8:0101::", "private"),
    ("2002:6440:0001::", "not a public address"),  # 6to4 of CGNAT 100.64.0.1
    ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::a9fe:a9fe", "metadata"), ("64:ff9b::a00:1", "private"),  # NAT64
    ("64:ff9b:1::808:808", "local-use NAT64"),  # RFC 8215: layout unknown, refused whole
    ("::7f00:1", "loopback"), ("::a9fe:a9fe", "metadata"),  # IPv4-compatible (deprecated)
    ("::ffff:0:7f00:1", "loopback"), ("::ffff:0:a9fe:a9fe", "metadata"),  # SIIT IPv4-translated
    ("::ffff:169.254.169.254", "metadata"), ("::ffff:10.1.2.3", "private"),  # IPv4-mapped
    (teredo("65.54.227.120", "127.0.0.1"), "loopback"), (teredo("65.54.227.120", "169.254.169.254"), "metadata"),
    (teredo("10.0.0.1", "8.8.8.8"), "private"),  # the server counts as well as the client
]
EMBEDDED_PUBLIC = ["2002:808:808::1", "64:ff9b::808:808", "::ffff:8.8.8.8", teredo("65.54.227.120", "8.8.4.4")]


@pytest.mark.parametrize("ip, why", EMBEDDED_FORBIDDEN)
def test_embedded_ipv4_is_judged_by_the_embedded_address(ip, why):
    reason = refusal(ipaddress.ip_address(ip))
    assert reason is not None and why in reason, (ip, reason)


@pytest.mark.parametrize("ip", EMBEDDED_PUBLIC)
def test_embedded_public_ipv4_is_public(ip):
    assert refusal(ipaddress.ip_address(ip)) is None


def test_teredo_client_is_deobfuscated():
    from app.fetch import embedded_ipv4

    assert embedded_ipv4(ipaddress.ip_address(teredo("65.54.227.120", "169.254.169.254"))) == (
        ipaddress.IPv4Address("65.54.227.120"), ipaddress.IPv4Address("169.254.169.254"))


WIDE_OPEN = FetchLimits(allow_networks=("0.0.0.0/0", "::/0"), connect_timeout_s=0.5)
METADATA_FORMS = ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254", "::ffff:a9fe:a9fe",
                  "2002:a9fe:a9fe::", "2002:a9fe:a9fe:1234::5", "64:ff9b::a9fe:a9fe", "::a9fe:a9fe",
                  "::ffff:0:a9fe:a9fe", teredo("65.54.227.120", "169.254.169.254"), "169.254.170.2",
                  "::ffff:100.100.100.200", "2002:6464:64c8::"]


@pytest.mark.parametrize("ip", METADATA_FORMS)
def test_metadata_stays_refused_with_the_seam_wide_open(ip):
    """The test-only allow-list opened to everything still never lets a metadata address through,
    whichever IPv6 form carries it: as a literal and as a name's DNS answer. (The guard's decision
    alone, through check_url: nothing is ever connected to, so a broken guard cannot reach out.)"""
    host = f"[{ip}]" if ":" in ip else ip
    with pytest.raises(InvalidInput, match="metadata"):
        check_url(f"http://{host}/latest/meta-data/", WIDE_OPEN, field="image")
    resolved = FetchLimits(allow_networks=WIDE_OPEN.allow_networks, resolver=lambda h, p: [ip])
    with pytest.raises(InvalidInput, match="metadata"):
        check_url("http://rebind.example.test/latest/", resolved, field="image")


def test_the_seam_opens_what_it_names_and_nothing_else():
    """Wide open, a 6to4 loopback passes (the seam's job); 127.0.0.1/32 opens none of its IPv6 spellings."""
    assert check_url("http://[2002:7f00:1::]:9/x.png", WIDE_OPEN) == "2002:7f00:1::"
    for ip in ("2002:7f00:1::", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "::7f00:1"):
        with pytest.raises(InvalidInput, match="loopback"):
            check_url(f"http://[{ip}]:9/x.png", LIMITS)
