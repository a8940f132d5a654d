"""Webhook security around the signature check (sans-I/O): which public URL to verify against,
which forwarded headers to trust, and a bounded replay cache.

Verification needs the URL the carrier requested. Behind a proxy or tunnel our own view of the
request (Host, scheme) differs from it, so the URL is rebuilt in this order: the configured
`publicUrl`; forwarded headers, only from a trusted source and for an allowed host; the validated
`Host` header. Trusting a forwarded or Host header blindly would let a caller choose the URL a
captured signature is checked against.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from media.clock import RealClock

__all__ = [
    "MonotonicClock",
    "ReplayCache",
    "UntrustedHost",
    "ResolvedUrl",
    "HostPort",
    "parse_host",
    "ip_in_networks",
    "is_loopback",
    "resolve_public_url",
    "FORWARDED_HOST_HEADERS",
]


# ------------------------------------------------------------------------------ replay cache


class MonotonicClock(Protocol):
    def monotonic(self) -> float: ...


class ReplayCache:
    """Keys seen in the last `ttl_seconds`, at most `max_entries` of them (oldest evicted first).

    A key's age counts from its first sighting; seeing it again does not extend it, so entries
    stay in insertion order and expiry is a pop from the front.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl_seconds: float = 600,
        clock: MonotonicClock | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0")
        self._max = max_entries
        self._ttl = ttl_seconds
        self._clock: MonotonicClock = clock if clock is not None else RealClock()
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        self._expire(self._clock.monotonic())
        return key in self._seen

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            first_key, first_at = next(iter(seen.items()))
            if now - first_at < self._ttl:
                break
            del seen[first_key]

    def check_and_remember(self, key: str) -> bool:
        """True if `key` was already seen within the window (a replay); else remember it."""
        now = self._clock.monotonic()
        self._expire(now)
        if key in self._seen:
            return True
        self._seen[key] = now
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return False

    def clear(self) -> None:
        self._seen.clear()


# ------------------------------------------------------------------------ host validation


class UntrustedHost(ValueError):
    """The request's host cannot be used to rebuild the public URL (reason is safe to show)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str  # lowercase; IPv6 literals keep their brackets
    port: int | None

    def netloc(self, port: int | None = None) -> str:
        return self.host if port is None else f"{self.host}:{port}"


_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _valid_hostname(host: str) -> bool:
    if not host or len(host) > 253:
        return False
    return all(_LABEL.match(label) for label in host.split("."))


def parse_host(value: str) -> HostPort:
    """Validate a Host-style value ('name', 'name:port', '[v6]:port'); raise UntrustedHost."""
    text = value.strip()
    if not text:
        raise UntrustedHost("empty host")
    if "@" in text:
        raise UntrustedHost("host contains userinfo")
    if any(ch.isspace() for ch in text) or any(ch in text for ch in "/\\?#%,;\"'<>"):
        raise UntrustedHost("host contains forbidden characters")
    if not text.isascii():
        raise UntrustedHost("host is not ASCII")
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise UntrustedHost("unterminated IPv6 literal")
        literal, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise UntrustedHost("invalid IPv6 literal") from None
        host = f"[{literal.lower()}]"
        if rest:
            if not rest.startswith(":"):
                raise UntrustedHost("invalid host")
            port_text = rest[1:]
    else:
        host, sep, after = text.partition(":")
        if sep:
            port_text = after
        host = host.lower()
        if not _valid_hostname(host):
            raise UntrustedHost("host is not a valid hostname")
    port: int | None = None
    if port_text is not None:
        if not (port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) <= 65535):
            raise UntrustedHost("invalid port")
        port = int(port_text)
    return HostPort(host, port)


def _allowed(host: HostPort, allowed_hosts: Sequence[str]) -> bool:
    for entry in allowed_hosts:
        candidate = entry.strip().lower().rstrip(".")
        if candidate == host.host or (host.port is not None and candidate == host.netloc(host.port)):
            return True
    return False


# ----------------------------------------------------------------------------- proxy trust


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(value.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def ip_in_networks(remote_ip: str, entries: Sequence[str]) -> bool:
    """True if remote_ip equals an entry or lies in an entry's CIDR; bad entries never match."""
    addr = _ip(remote_ip) if remote_ip else None
    if addr is None:
        return False
    for entry in entries:
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            continue
        if addr.version == network.version and addr in network:
            return True
    return False


def is_loopback(remote_ip: str) -> bool:
    addr = _ip(remote_ip) if remote_ip else None
    return addr is not None and addr.is_loopback


# ---------------------------------------------------------------------- URL reconstruction

FORWARDED_HOST_HEADERS = ("X-Forwarded-Host", "X-Original-Host", "Ngrok-Forwarded-Host")


@dataclass(frozen=True, slots=True)
class ResolvedUrl:
    url: str
    variants: list[str] = field(default_factory=list)

    @property
    def candidates(self) -> list[str]:
        """The URL first, then its variants: what to hand to a signature verifier."""
        return [self.url, *self.variants]


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    # Every value of a repeated header (two Host headers are refused): WebhookRequest keeps only the
    # first of each name, so this reads the raw multi-dict, before a WebhookRequest exists.
    wanted = name.lower()
    return [value for key, value in headers.items() if key.lower() == wanted]


def _first_header(headers: Mapping[str, str], name: str) -> str | None:
    values = _header_values(headers, name)
    if not values:
        return None
    # A proxy chain appends: "a, b". The first entry is what the client asked for.
    first = values[0].split(",", 1)[0].strip()
    return first or None


def _forwarded_proto(headers: Mapping[str, str]) -> str | None:
    proto = _first_header(headers, "X-Forwarded-Proto")
    if proto is None:
        return None
    proto = proto.lower()
    return proto if proto in ("http", "https") else None


def _forwarded_host(headers: Mapping[str, str], allowed_hosts: Sequence[str]) -> HostPort | None:
    for name in FORWARDED_HOST_HEADERS:
        value = _first_header(headers, name)
        if value is None:
            continue
        try:
            host = parse_host(value)
        except UntrustedHost:
            continue
        if allowed_hosts and not _allowed(host, allowed_hosts):
            continue
        return host
    return None


def _build(scheme: str, netloc: str, path_qs: str) -> str:
    if not path_qs.startswith("/"):
        path_qs = "/" + path_qs
    return f"{scheme}://{netloc}{path_qs}"


def resolve_public_url(
    *,
    path_qs: str,
    headers: Mapping[str, str],
    remote_ip: str,
    public_url: str | None,
    allowed_hosts: Sequence[str],
    trust_forwarding_headers: bool,
    trusted_proxy_ips: Sequence[str],
    ngrok_loopback_bypass: bool = False,
) -> ResolvedUrl:
    """Rebuild the URL the carrier requested: publicUrl, trusted forwarded headers, then Host.

    Forwarded headers count only when (allowed_hosts or trust_forwarding_headers) and the peer is
    a trusted proxy (any peer when trusted_proxy_ips is empty), or when the ngrok bypass is on and
    the peer is loopback (the local ngrok agent). With allowed_hosts set, the forwarded host and
    the Host header must be listed. Raises UntrustedHost when the Host header cannot be used.
    Variants: the URL with its port stripped, with publicUrl's port and with the Host port.
    """
    host_values = _header_values(headers, "Host")
    if len(host_values) > 1:
        raise UntrustedHost("multiple Host headers")
    host_header: HostPort | None = None
    host_error: UntrustedHost | None = None
    if host_values:
        try:
            host_header = parse_host(host_values[0])
        except UntrustedHost as exc:
            host_error = exc

    public_port: int | None = None
    if public_url:
        parts = urlsplit(public_url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("publicUrl must be an absolute http(s) URL")
        public_host = parse_host(parts.netloc)
        public_port = public_host.port
        scheme, primary = parts.scheme, public_host
    else:
        forwarding_on = bool(allowed_hosts) or trust_forwarding_headers
        proxy_ok = not trusted_proxy_ips or ip_in_networks(remote_ip, trusted_proxy_ips)
        trust = (forwarding_on and proxy_ok) or (ngrok_loopback_bypass and is_loopback(remote_ip))
        forwarded = _forwarded_host(headers, allowed_hosts) if trust else None
        scheme = (_forwarded_proto(headers) if trust else None) or "https"
        if forwarded is not None:
            primary = forwarded
        else:
            if host_error is not None:
                raise host_error
            if host_header is None:
                raise UntrustedHost("missing Host header")
            if allowed_hosts and not _allowed(host_header, allowed_hosts):
                raise UntrustedHost("host is not in allowedHosts")
            # The Host port is usually our bind port, not the public one; it becomes a variant.
            primary = HostPort(host_header.host, None)

    url = _build(scheme, primary.netloc(primary.port), path_qs)
    variants: list[str] = []
    host_port = host_header.port if host_header is not None else None
    for port in (None, public_port, host_port):
        variant = _build(scheme, primary.netloc(port), path_qs)
        if variant != url and variant not in variants:
            variants.append(variant)
    return ResolvedUrl(url, variants)
