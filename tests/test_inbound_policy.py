"""The inbound policy as a pure function: who may call in, how numbers and SIP identities match."""

from __future__ import annotations

import pytest

from bridge.inbound_policy import mask_number, refusal, same_caller, sip_identity


@pytest.mark.parametrize(("caller", "allowed", "same"), [
    ("+1 (555) 000-9999", "+15550009999", True),      # formatting aside, the digits decide
    ("15550009999", "+15550009999", True),
    ("+15550009998", "+15550009999", False),
    ("anonymous", "", False),                          # no digits never matches an empty entry
    ("sip:Alice@Example.com;transport=tcp", "sip:alice@example.com", True),
    ("<sips:alice@example.com:5061>", "sip:alice@example.com", True),
    ("sip:bob@example.com", "sip:alice@example.com", False),
    ("sip:+15550009999@trunk.example", "+15550009999", False),  # a SIP caller is matched as a SIP identity
])
def test_same_caller(caller: str, allowed: str, same: bool) -> None:
    assert same_caller(caller, allowed) is same


def test_sip_identity_keeps_user_and_host_only() -> None:
    assert sip_identity("<sip:Alice@Host.example:5080;transport=udp>") == "alice@host.example"
    assert sip_identity("sip:host.example:5080") == "host.example:5080"  # no user: the port stays


@pytest.mark.parametrize(("policy", "caller", "active", "reason"), [
    ("disabled", "+15550009999", 0, "inbound calls are disabled"),
    ("allowlist", None, 0, "no caller id"),
    ("allowlist", "+15550001111", 0, "caller not in allowFrom"),
    ("pairing", "+15550001111", 0, "caller not in allowFrom"),
    ("allowlist", "+15550009999", 0, None),
    ("allowlist", "+15550009999", 2, "maximum concurrent calls (2) reached"),
    ("open", None, 1, None),
    ("open", "+15550001111", 2, "maximum concurrent calls (2) reached"),
])
def test_refusal(policy: str, caller: str | None, active: int, reason: str | None) -> None:
    assert refusal(policy, ["+15550009999", "sip:alice@example.com"], caller, active=active, limit=2) == reason


def test_masked_numbers_keep_no_last_four() -> None:
    assert mask_number("+15550009999") == "+1555000****"
    assert mask_number("12345") == "****"
    assert mask_number(None) == "(unknown)"
