"""Replay cache, replay keys, and public-URL reconstruction (forwarded-header trust, Host checks)."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from bridge.security import (
    ReplayCache,
    ResolvedUrl,
    UntrustedHost,
    ip_in_networks,
    is_loopback,
    parse_host,
    resolve_public_url,
)
from carriers.signatures import (
    plivo_replay_key,
    telnyx_replay_key,
    twilio_replay_key,
    twilio_signature,
    verify_twilio,
)
from media.clock import FakeClock

# ------------------------------------------------------------------------------ replay cache


def test_replay_cache_detects_replay() -> None:
    cache = ReplayCache(clock=FakeClock())
    assert cache.check_and_remember("a") is False
    assert cache.check_and_remember("a") is True
    assert cache.check_and_remember("b") is False
    assert len(cache) == 2


async def test_replay_cache_defaults() -> None:
    clock = FakeClock()
    cache = ReplayCache(clock=clock)
    cache.check_and_remember("k")
    await clock.advance(599.9)
    assert cache.check_and_remember("k") is True
    await clock.advance(0.1)
    assert cache.check_and_remember("k") is False


async def test_replay_cache_age_bound() -> None:
    clock = FakeClock()
    cache = ReplayCache(max_entries=100, ttl_seconds=10, clock=clock)
    cache.check_and_remember("old")
    await clock.advance(5)
    cache.check_and_remember("young")
    await clock.advance(5)  # "old" is now exactly 10 s old: expired
    assert "old" not in cache
    assert "young" in cache
    assert len(cache) == 1
    assert cache.check_and_remember("old") is False


async def test_replay_cache_age_counts_from_first_sighting() -> None:
    clock = FakeClock()
    cache = ReplayCache(ttl_seconds=10, clock=clock)
    cache.check_and_remember("k")
    await clock.advance(9)
    assert cache.check_and_remember("k") is True
    await clock.advance(1)
    assert cache.check_and_remember("k") is False


def test_replay_cache_size_bound_evicts_oldest() -> None:
    cache = ReplayCache(max_entries=3, ttl_seconds=600, clock=FakeClock())
    for key in ("a", "b", "c", "d"):
        assert cache.check_and_remember(key) is False
    assert len(cache) == 3
    assert "a" not in cache
    assert cache.check_and_remember("d") is True
    assert cache.check_and_remember("b") is True
    assert cache.check_and_remember("a") is False  # evicted, so no longer recognised


async def test_replay_cache_stays_bounded_under_flood() -> None:
    clock = FakeClock()
    cache = ReplayCache(max_entries=1000, ttl_seconds=600, clock=clock)
    for index in range(20_000):
        cache.check_and_remember(f"k{index}")
        await clock.advance(0.001)
    assert len(cache) == 1000
    await clock.advance(601)
    cache.check_and_remember("fresh")
    assert len(cache) == 1


def test_replay_cache_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        ReplayCache(max_entries=0)
    with pytest.raises(ValueError):
        ReplayCache(ttl_seconds=0)


def test_replay_cache_default_clock_works() -> None:
    cache = ReplayCache()
    assert cache.check_and_remember("x") is False
    assert cache.check_and_remember("x") is True


# ------------------------------------------------------------------------------- replay keys

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def test_twilio_replay_key_shape_and_canonical_params() -> None:
    url = "https://example.com/voice/webhook?callId=abc"
    key = twilio_replay_key(url, [("b", "2"), ("a", "1")], "sig=")
    assert HEX64.match(key)
    assert key == twilio_replay_key(url, [("a", "1"), ("b", "2")], "sig=")
    assert key == twilio_replay_key(url, {"a": "1", "b": "2"}, "sig=")
    assert key != twilio_replay_key(url, [("a", "1"), ("b", "3")], "sig=")
    assert key != twilio_replay_key(url + "&x=1", [("a", "1"), ("b", "2")], "sig=")
    assert key != twilio_replay_key(url, [("a", "1"), ("b", "2")], "other=")


def test_replay_keys_have_unambiguous_boundaries() -> None:
    assert twilio_replay_key("https://a/x", [("ab", "c")], "s") != twilio_replay_key("https://a/x", [("a", "bc")], "s")
    assert plivo_replay_key("https://a/xy", "z") != plivo_replay_key("https://a/x", "yz")
    assert telnyx_replay_key("1", "s", b"x") != telnyx_replay_key("1", "s", b"y")


def test_telnyx_replay_key_base64_and_base64url_are_the_same_delivery() -> None:
    raw = bytes(range(64))
    std = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode()
    assert std != url
    body = b'{"data":{}}'
    key = telnyx_replay_key("1700000000", std, body)
    assert HEX64.match(key)
    assert key == telnyx_replay_key("1700000000", url, body)
    assert key == telnyx_replay_key("1700000000", url.rstrip("="), body)
    assert key != telnyx_replay_key("1700000001", std, body)
    assert key != telnyx_replay_key("1700000000", std, body + b" ")


def test_plivo_replay_key() -> None:
    key = plivo_replay_key("https://example.com/voice/webhook", "nonce-1")
    assert HEX64.match(key)
    assert key == plivo_replay_key("https://example.com/voice/webhook", "nonce-1")
    assert key != plivo_replay_key("https://example.com/voice/webhook", "nonce-2")
    assert key != plivo_replay_key("https://example.com/other", "nonce-1")


def test_replay_keys_distinct_across_providers() -> None:
    assert plivo_replay_key("u", "n") != twilio_replay_key("u", [], "n")


# ------------------------------------------------------------------------- URL reconstruction

PATH = "/voice/webhook?callId=abc"


def resolve(headers: object, remote_ip: str = "203.0.113.9", **overrides: object) -> ResolvedUrl:
    options: dict[str, object] = {
        "public_url": None,
        "allowed_hosts": [],
        "trust_forwarding_headers": False,
        "trusted_proxy_ips": [],
        "ngrok_loopback_bypass": False,
    }
    options.update(overrides)
    return resolve_public_url(path_qs=PATH, headers=headers, remote_ip=remote_ip, **options)  # type: ignore[arg-type]


def test_public_url_origin_plus_request_path() -> None:
    resolved = resolve({"Host": "internal:3334"}, public_url="https://voice.example.com/ignored/path")
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"
    assert resolved.candidates[0] == resolved.url


def test_public_url_wins_over_evil_host_and_forwarded_headers() -> None:
    headers = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
    resolved = resolve(headers, public_url="https://voice.example.com/voice/webhook", trust_forwarding_headers=True)
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"
    assert all("evil" not in candidate for candidate in resolved.candidates)


def test_public_url_with_bad_host_header_still_resolves() -> None:
    resolved = resolve({"Host": "bad host"}, public_url="https://voice.example.com")
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_port_variants_public_url_port_and_host_port() -> None:
    # seed issue 6334: the carrier may sign the URL with or without a port.
    resolved = resolve({"Host": "voice.example.com:8443"}, public_url="https://voice.example.com:9443/x")
    assert resolved.url == "https://voice.example.com:9443/voice/webhook?callId=abc"
    assert resolved.variants == [
        "https://voice.example.com/voice/webhook?callId=abc",
        "https://voice.example.com:8443/voice/webhook?callId=abc",
    ]


def test_port_variant_from_public_url_port_when_host_has_none() -> None:
    headers = {"Host": "internal", "X-Forwarded-Host": "voice.example.com"}
    resolved = resolve(headers, public_url=None, trust_forwarding_headers=True)
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"
    assert resolved.variants == []


def test_host_header_port_dropped_and_kept_as_variant() -> None:
    resolved = resolve({"Host": "Voice.Example.com:3334"})
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"
    assert resolved.variants == ["https://voice.example.com:3334/voice/webhook?callId=abc"]


def test_proto_defaults_to_https() -> None:
    assert resolve({"Host": "voice.example.com"}).url.startswith("https://")


def test_host_injection_rejected_with_allowed_hosts() -> None:
    with pytest.raises(UntrustedHost, match="allowedHosts"):
        resolve({"Host": "evil.example"}, allowed_hosts=["voice.example.com"])


def test_allowed_host_accepted_case_insensitively() -> None:
    resolved = resolve({"host": "VOICE.example.com"}, allowed_hosts=["voice.example.com"])
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_forwarded_headers_ignored_without_opt_in() -> None:
    headers = {"Host": "voice.example.com", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
    resolved = resolve(headers)
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_forwarded_headers_trusted_with_trust_forwarding_headers() -> None:
    headers = {"Host": "127.0.0.1:3334", "X-Forwarded-Host": "voice.example.com", "X-Forwarded-Proto": "http"}
    resolved = resolve(headers, trust_forwarding_headers=True)
    assert resolved.url == "http://voice.example.com/voice/webhook?callId=abc"
    assert "http://voice.example.com:3334/voice/webhook?callId=abc" in resolved.variants


def test_forwarded_headers_from_untrusted_ip_ignored() -> None:
    headers = {"Host": "voice.example.com", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
    resolved = resolve(headers, remote_ip="198.51.100.7", trust_forwarding_headers=True, trusted_proxy_ips=["100.64.0.1"])
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_forwarded_headers_from_untrusted_ip_with_evil_host_rejected() -> None:
    headers = {"Host": "evil.example", "X-Forwarded-Host": "voice.example.com"}
    with pytest.raises(UntrustedHost):
        resolve(headers, remote_ip="198.51.100.7", allowed_hosts=["voice.example.com"], trusted_proxy_ips=["100.64.0.1"])


def test_trusted_proxy_honored() -> None:
    headers = {"Host": "backend:3334", "X-Forwarded-Host": "voice.example.com", "X-Forwarded-Proto": "https"}
    resolved = resolve(headers, remote_ip="100.64.0.1", allowed_hosts=["voice.example.com"], trusted_proxy_ips=["100.64.0.1"])
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_trusted_proxy_cidr_and_ipv4_mapped() -> None:
    headers = {"Host": "backend", "X-Forwarded-Host": "voice.example.com"}
    for remote in ("10.1.2.3", "::ffff:10.1.2.3"):
        resolved = resolve(headers, remote_ip=remote, trust_forwarding_headers=True, trusted_proxy_ips=["10.0.0.0/8"])
        assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_forwarded_host_not_in_allowed_hosts_ignored() -> None:
    headers = {"Host": "voice.example.com", "X-Forwarded-Host": "evil.example"}
    resolved = resolve(headers, allowed_hosts=["voice.example.com"])
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_forwarded_host_not_allowed_and_host_not_allowed_rejected() -> None:
    headers = {"Host": "backend:3334", "X-Forwarded-Host": "evil.example"}
    with pytest.raises(UntrustedHost):
        resolve(headers, allowed_hosts=["voice.example.com"])


def test_forwarded_host_chain_uses_first_entry() -> None:
    headers = {"Host": "backend", "X-Forwarded-Host": "voice.example.com, proxy.internal", "X-Forwarded-Proto": "https, http"}
    resolved = resolve(headers, trust_forwarding_headers=True)
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_x_original_host_honored() -> None:
    resolved = resolve({"Host": "backend", "X-Original-Host": "voice.example.com"}, allowed_hosts=["voice.example.com"])
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_forwarded_host_with_userinfo_ignored() -> None:
    headers = {"Host": "voice.example.com", "X-Forwarded-Host": "evil.example@voice.example.com"}
    resolved = resolve(headers, trust_forwarding_headers=True)
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_bogus_forwarded_proto_falls_back_to_https() -> None:
    headers = {"Host": "backend", "X-Forwarded-Host": "voice.example.com", "X-Forwarded-Proto": "javascript"}
    resolved = resolve(headers, trust_forwarding_headers=True)
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_ngrok_loopback_bypass_trusts_forwarded_from_loopback() -> None:
    headers = {"Host": "127.0.0.1:3334", "Ngrok-Forwarded-Host": "abc.ngrok.app", "X-Forwarded-Proto": "https"}
    for remote in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        resolved = resolve(headers, remote_ip=remote, ngrok_loopback_bypass=True)
        assert resolved.url == "https://abc.ngrok.app/voice/webhook?callId=abc"


def test_ngrok_loopback_bypass_ignores_non_loopback() -> None:
    headers = {"Host": "voice.example.com", "Ngrok-Forwarded-Host": "evil.ngrok.app"}
    resolved = resolve(headers, remote_ip="203.0.113.5", ngrok_loopback_bypass=True)
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_ngrok_loopback_bypass_off_ignores_loopback_forwarding() -> None:
    headers = {"Host": "voice.example.com", "Ngrok-Forwarded-Host": "abc.ngrok.app"}
    resolved = resolve(headers, remote_ip="127.0.0.1")
    assert resolved.url == "https://voice.example.com/voice/webhook?callId=abc"


def test_ngrok_loopback_bypass_still_honours_allowed_hosts() -> None:
    headers = {"Host": "localhost:3334", "Ngrok-Forwarded-Host": "evil.ngrok.app"}
    with pytest.raises(UntrustedHost):
        resolve(headers, remote_ip="127.0.0.1", ngrok_loopback_bypass=True, allowed_hosts=["abc.ngrok.app"])


@pytest.mark.parametrize(
    "host",
    [
        "evil.example@voice.example.com",
        "user:pass@voice.example.com",
        "voice.example.com@",
        "voice example.com",
        "voice.exa\tmple.com",
        "voice.example.com:0",
        "voice.example.com:65536",
        "voice.example.com:abc",
        "voice.example.com:",
        "voice.example.com:80:80",
        "voice.example.com/evil",
        "voice.example.com\\evil",
        "voice.example.com?x",
        "voice.example.com#x",
        "-voice.example.com",
        "voice..example.com",
        "voice_example.com",
        "vöice.example.com",
        "[::1",
        "[not-ipv6]:80",
        "a" * 64 + ".example.com",
        "",
    ],
)
def test_bad_host_headers_rejected(host: str) -> None:
    with pytest.raises(UntrustedHost):
        resolve({"Host": host})


def test_missing_host_rejected() -> None:
    with pytest.raises(UntrustedHost, match="missing"):
        resolve({})


def test_multiple_host_headers_rejected() -> None:
    headers = CIMultiDict([("Host", "voice.example.com"), ("host", "evil.example")])
    with pytest.raises(UntrustedHost, match="multiple"):
        resolve(CIMultiDictProxy(headers))


def test_aiohttp_headers_accepted() -> None:
    headers = CIMultiDictProxy(CIMultiDict([("HOST", "voice.example.com"), ("x-forwarded-proto", "http")]))
    assert resolve(headers).url == "https://voice.example.com/voice/webhook?callId=abc"
    assert resolve(headers, trust_forwarding_headers=True).url == "http://voice.example.com/voice/webhook?callId=abc"


def test_ipv6_host_literal_accepted() -> None:
    resolved = resolve({"Host": "[2001:DB8::1]:8080"})
    assert resolved.url == "https://[2001:db8::1]/voice/webhook?callId=abc"
    assert resolved.variants == ["https://[2001:db8::1]:8080/voice/webhook?callId=abc"]


def test_bad_public_url_is_a_config_error() -> None:
    with pytest.raises(ValueError):
        resolve({"Host": "voice.example.com"}, public_url="voice.example.com/no-scheme")


def test_parse_host_and_ip_helpers() -> None:
    assert parse_host("Example.COM:443").host == "example.com"
    assert parse_host("Example.COM:443").port == 443
    assert parse_host("10.0.0.1").port is None
    assert ip_in_networks("192.168.1.5", ["192.168.1.0/24"])
    assert not ip_in_networks("192.168.2.5", ["192.168.1.0/24", "not-a-network"])
    assert not ip_in_networks("", ["0.0.0.0/0"])
    assert not ip_in_networks("garbage", ["0.0.0.0/0"])
    assert ip_in_networks("2001:db8::5", ["2001:db8::/32"])
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("10.0.0.1") and not is_loopback("")


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=40))
def test_parse_host_never_accepts_userinfo_or_whitespace(value: str) -> None:
    try:
        parsed = parse_host(value)
    except UntrustedHost:
        return
    rebuilt = parsed.netloc(parsed.port)
    assert "@" not in rebuilt
    assert not any(ch.isspace() for ch in rebuilt)
    assert rebuilt.isascii()


# -------------------------------------------------------------- end to end with verification

TOKEN = "test-auth-token"
FORM = [("CallSid", "CS123"), ("CallStatus", "completed"), ("From", "+15550000000")]
SIGNED_URL = "https://voice.example.com/voice/webhook?callId=abc"


def test_twilio_verifies_behind_trusted_proxy() -> None:
    signature = twilio_signature(TOKEN, SIGNED_URL, FORM)
    headers = {"Host": "10.0.0.5:3334", "X-Forwarded-Host": "voice.example.com", "X-Forwarded-Proto": "https"}
    resolved = resolve(headers, remote_ip="10.0.0.1", allowed_hosts=["voice.example.com"], trusted_proxy_ips=["10.0.0.1"])
    assert verify_twilio(TOKEN, resolved.candidates, FORM, signature)


def test_twilio_signed_with_port_verifies_via_host_port_variant() -> None:
    signed = "https://voice.example.com:8443/voice/webhook?callId=abc"
    signature = twilio_signature(TOKEN, signed, FORM)
    resolved = resolve({"Host": "voice.example.com:8443"}, public_url="https://voice.example.com")
    assert verify_twilio(TOKEN, resolved.candidates, FORM, signature)


def test_twilio_captured_signature_fails_on_spoofed_forwarded_host() -> None:
    # A signature captured for another host must not verify by spoofing forwarding headers.
    other = "https://other.example/voice/webhook?callId=abc"
    signature = twilio_signature(TOKEN, other, FORM)
    headers = {"Host": "voice.example.com", "X-Forwarded-Host": "other.example"}
    resolved = resolve(headers, remote_ip="198.51.100.7", trust_forwarding_headers=True, trusted_proxy_ips=["10.0.0.1"])
    assert not verify_twilio(TOKEN, resolved.candidates, FORM, signature)
    with pytest.raises(UntrustedHost):
        resolve({"Host": "other.example"}, allowed_hosts=["voice.example.com"])


def test_seed_computed_twilio_vector_through_public_url() -> None:
    # seed-system.md section 9: the request arrives on a local port; publicUrl gives the origin.
    resolved = resolve({"Host": "127.0.0.1:3334"}, public_url="https://example.com/voice/webhook")
    assert resolved.url == "https://example.com/voice/webhook?callId=abc"
    assert verify_twilio(TOKEN, resolved.candidates, FORM, "vonREHy+OojVJW0au8iM4cqoW3E=")
