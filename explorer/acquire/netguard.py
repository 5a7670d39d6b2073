"""SSRF guard: the fetcher may only reach public addresses, plus an explicit allow-list of host:port.

A URL found on the web must not make the agent talk to its own machine, its network or a cloud
metadata service. Two checks, both after DNS resolution:

    NetGuard.refusal(url)        before each request (the first URL and every redirect hop): scheme,
                                 allow-list, then every address the host resolves to must be public;
                                 a refusal is a reason string and no connection is made
    GuardedNetworkBackend        inside the HTTP client, at connect time: resolves the host again,
                                 checks every address and connects to the checked IP itself

DNS rebinding (a name that resolves to a public address for the check and to 127.0.0.1 for the
connection) is closed by the second check: the socket is opened to an address that was checked in
the same step, never by name, so no later resolution can change where it goes. TLS still verifies
the certificate and sends SNI for the host name (httpcore takes both from the URL, not the socket).
Connections of an allow-listed host:port skip the address check but also go to `resolve`'s answer.
The search clients are synchronous: `guarded_sync_transport` is the same check for httpx.Client.

Not covered: proxies (the guarded client ignores proxy environment variables, so it connects
directly), and the guard cannot see where a permitted public host forwards requests itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Iterable
from urllib.parse import urlsplit

import httpcore
import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598, not is_private in 3.11
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address


class BlockedDestination(Exception):
    """A connection was refused by the guard before any socket was opened; str() is the reason."""


def blocked_category(ip: Address) -> str | None:
    """Why `ip` is not a public address ('loopback', 'link-local', ...), or None when it is public."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return blocked_category(embedded)
    for category, test in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),  # 169.254.169.254 (cloud metadata) is here
        ("multicast", ip.is_multicast),
        ("carrier-grade NAT", ip in _CARRIER_GRADE_NAT),
        ("reserved", ip.is_reserved),  # 240.0.0.0/4 and IETF-reserved IPv6 blocks
        ("private", ip.is_private),  # RFC 1918, fc00::/7 and the other special-purpose blocks
        ("not globally routable", not ip.is_global),
    ):
        if test:
            return category
    return None


def _embedded_ipv4(ip: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped ::ffff:a.b.c.d, 6to4, NAT64), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def parse_address(text: str) -> Address | None:
    """An IP literal (IPv6 scope ids allowed), or None for a host name."""
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def netloc_of(url: str) -> str:
    """'host:port' of a URL (port filled in from the scheme; IPv6 hosts bracketed), as
    `NetGuard`'s allow-list spells it."""
    host, port = host_port(url)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_port(netloc_or_url: str) -> tuple[str, int]:
    """('host', port) of 'host:port', '[v6]:port' or a URL; a URL without a port gets its scheme's."""
    text = netloc_or_url if "//" in netloc_or_url else f"//{netloc_or_url}"
    parts = urlsplit(text)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    if not parts.hostname or port is None:
        raise ValueError(f"{netloc_or_url!r} is not a host:port")
    return parts.hostname.lower().rstrip("."), port


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver, run off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))  # unique, in resolver order


class NetGuard:
    """Refuses non-public destinations; `allowed_hosts` are 'host:port' netlocs exempt from it."""

    def __init__(self, allowed_hosts: Iterable[str] = ()):
        self.allowed = frozenset(host_port(netloc) for netloc in allowed_hosts)

    def is_allowed(self, host: str, port: int) -> bool:
        return (host.lower().rstrip("."), port) in self.allowed

    async def refusal(self, url: str) -> str | None:
        """None when `url` may be requested, else the reason. A name that does not resolve is let
        through: the connection then fails as a network error, which may be retried."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            return f"scheme {parts.scheme or '(none)'!r} is not http(s)"
        try:
            host, port = host_port(url)
        except ValueError:
            return "URL has no host or a bad port"
        if self.is_allowed(host, port):
            return None
        try:
            await self.public_addresses(host, port)
        except BlockedDestination as e:
            return str(e)
        except OSError:
            return None
        return None

    async def public_addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to; raises BlockedDestination unless all of them are public."""
        literal = parse_address(host) is not None
        return _all_public(host, [host.strip("[]")] if literal else await resolve(host, port), literal)

    def public_addresses_sync(self, host: str, port: int) -> list[str]:
        """`public_addresses` for synchronous clients (the system resolver, in this thread)."""
        literal = parse_address(host) is not None
        return _all_public(host, [host.strip("[]")] if literal else resolve_sync(host, port), literal)


def resolve_sync(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _all_public(host: str, addresses: list[str], literal: bool) -> list[str]:
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    for text in addresses:
        category = blocked_category(ipaddress.ip_address(text))
        if category is not None:
            if literal:
                raise BlockedDestination(f"{text} is a {category} address")
            raise BlockedDestination(f"{host} resolves to {text}, a {category} address")
    return addresses


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the address check at connect time (see the module doc)."""

    def __init__(self, guard: NetGuard, inner: httpcore.AsyncNetworkBackend | None = None):
        self.guard, self.inner = guard, inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None):
        if self.guard.is_allowed(host, port):
            addresses = [host] if parse_address(host) else await resolve(host, port)
        else:
            addresses = await self.guard.public_addresses(host, port)
        error: Exception | None = None
        for address in addresses:  # every one was checked: try them in the resolver's order
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout,
                                                    local_address=local_address,
                                                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError) as e:
                error = e
        raise error if error is not None else OSError(f"{host} resolves to no address")

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise BlockedDestination("unix sockets are not reachable through the guarded fetcher")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedSyncNetworkBackend(httpcore.NetworkBackend):
    """GuardedNetworkBackend for synchronous clients (the search clients)."""

    def __init__(self, guard: NetGuard, inner: httpcore.NetworkBackend | None = None):
        self.guard, self.inner = guard, inner or httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options=None):
        if self.guard.is_allowed(host, port):
            addresses = [host] if parse_address(host) else resolve_sync(host, port)
        else:
            addresses = self.guard.public_addresses_sync(host, port)
        error: Exception | None = None
        for address in addresses:
            try:
                return self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                              socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError) as e:
                error = e
        raise error if error is not None else OSError(f"{host} resolves to no address")

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise BlockedDestination("unix sockets are not reachable through the guarded client")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def _swap_backend(transport, pool_type, backend_type, guard: NetGuard):
    # httpx offers no network-backend argument; httpcore's pool takes one, so swap it in (and fail
    # loudly if a future httpx builds its pool differently).
    pool = transport._pool
    if not isinstance(pool, pool_type) or not hasattr(pool, "_network_backend"):
        raise RuntimeError(f"cannot guard httpx transport pool {type(pool).__name__}")
    pool._network_backend = backend_type(guard, pool._network_backend)
    return transport


def guarded_transport(guard: NetGuard, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection goes through GuardedNetworkBackend."""
    return _swap_backend(httpx.AsyncHTTPTransport(limits=limits), httpcore.AsyncConnectionPool,
                         GuardedNetworkBackend, guard)


def guarded_sync_transport(guard: NetGuard, limits: httpx.Limits = httpx.Limits()) -> httpx.HTTPTransport:
    """The same for httpx.Client: every connection through GuardedSyncNetworkBackend."""
    return _swap_backend(httpx.HTTPTransport(limits=limits), httpcore.ConnectionPool,
                         GuardedSyncNetworkBackend, guard)
