"""The address guard against server-side request forgery: a URL is refused unless every address its
host resolves to is public, and the caller connects to the address that was checked.

The host is resolved once and refused when ANY of its addresses is loopback, private, link-local,
multicast, unspecified/reserved or a cloud metadata address (169.254.169.254, fd00:ec2::254, ...);
the connection then goes to the address we checked, not to a second resolution (a DNS-rebinding
server answers "public" to the check and "169.254.169.254" to the connect). An IPv6 address that
embeds an IPv4 one (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, SIIT ::ffff:0:a.b.c.d,
NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32 with its obfuscated client) is judged by the
embedded address: 2002:7f00:1:: is 127.0.0.1, 2002:a9fe:a9fe:: is 169.254.169.254.
"""

from __future__ import annotations

import ipaddress
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlsplit

from app.errors import InvalidInput, JobFailed
from app.fetch.policy import FetchLimits, describe

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata services (AWS/GCP/Azure/OpenStack IPv4, AWS IPv6, AWS ECS task, Alibaba).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200",
))
_dns = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetch-dns")  # getaddrinfo has no timeout

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


def target(url: str, limits: FetchLimits, field: str, deadline: float, hop: int) -> tuple:
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
