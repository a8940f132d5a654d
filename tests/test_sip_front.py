"""The SIP front: a stateless, record-routing proxy in front of several pjsua2 worker processes.

Sans-I/O tests feed the core complete SIP messages (as baresip, pjsua and sipp write them) and
assert on the exact bytes of every header it edits; the asyncio edge runs on real UDP sockets; and
sipp (a UAC calling through the front to one, then two, sipp UAS "workers") proves real peers
complete calls through it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import socket
import subprocess
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from itertools import cycle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carriers.sip import proxy as sip_proxy
from carriers.sip.front import SipFront
from carriers.sip.proxy import Addr, Forward, SipFrontCore
from tests.peers.ports import bridge_sip, sipp_media, sipp_uac
from tests.peers.ports import sipp_uas as uas_port

ADV: Addr = ("203.0.113.5", 5060)  # the front's public address
W1: Addr = ("127.0.0.1", 5401)
W2: Addr = ("127.0.0.1", 5402)
CALLER: Addr = ("198.51.100.7", 34567)  # the caller's NATed source address
TRUNK: Addr = ("198.51.100.50", 5060)
INT: Addr = ("10.0.0.5", 5070)  # where the workers reach the front when the public address does not hairpin
RR = b"Record-Route: <sip:203.0.113.5:5060;lr>"
RR_INT = b"Record-Route: <sip:10.0.0.5:5070;lr>"
OUR_VIA = re.compile(rb"Via: SIP/2\.0/UDP 203\.0\.113\.5:5060;branch=(z9hG4bK-vcf-[0-9a-f]{20,})\Z")

SDP = (
    b"v=0\r\no=- 1738 2241 IN IP4 192.168.1.20\r\ns=-\r\nc=IN IP4 192.168.1.20\r\nt=0 0\r\n"
    b"m=audio 10004 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n"
)
WORKER_SDP = (
    b"v=0\r\no=- 3921 3922 IN IP4 203.0.113.5\r\ns=pjmedia\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"
    b"m=audio 20000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
)


# ---------------------------------------------------------------- helpers


class Picker:
    """pick_worker for tests: answers in turn from `answers`, records the Call-IDs it was asked."""

    def __init__(self, *answers: Addr | None) -> None:
        self.asked: list[str] = []
        self._answers = cycle(answers or (W1,))

    def __call__(self, call_id: str) -> Addr | None:
        self.asked.append(call_id)
        return next(self._answers)


def core_with(*answers: Addr | None, ttl: float = 64.0, workers: tuple[Addr, ...] = (W1, W2)) -> tuple[SipFrontCore, Picker]:
    picker = Picker(*answers)
    return SipFrontCore(ADV, workers, picker, local_hosts=("127.0.0.1",), dialog_ttl_s=ttl), picker


def sip(start: str, headers: list[str], body: bytes = b"", *, length: str = "Content-Length") -> bytes:
    lines = [start, *headers, f"{length}: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def head(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def named(data: bytes, *names: str) -> list[bytes]:
    wanted = {n.lower().encode() for n in names}
    return [line for line in head(data)[1:] if line.split(b":", 1)[0].strip().lower() in wanted]


def one(out: list[Forward]) -> Forward:
    assert len(out) == 1, out
    return out[0]


def sent_by(data: bytes) -> bytes:
    """The sent-by of our (top) Via."""
    m = re.match(rb"Via: SIP/2\.0/UDP (\S+);branch=z9hG4bK-vcf-[0-9a-f]+\Z", head(data)[1])
    assert m, head(data)[1]
    return m.group(1)


def our_branch(data: bytes) -> str:
    m = OUR_VIA.match(head(data)[1])
    assert m, head(data)[1]
    return m.group(1).decode()


def invite(
    call_id: str = "3c26b2f0a7e94f1c",
    *,
    branch: str = "z9hG4bK8a1b2c3d4",
    cseq: int = 7061,
    max_forwards: str | None = "70",
    via: str | None = None,
    extra: tuple[str, ...] = (),
) -> bytes:
    """An inbound INVITE as baresip sends it from behind a NAT (private sent-by, rport)."""
    headers = [
        via or f"Via: SIP/2.0/UDP 192.168.1.20:5060;branch={branch};rport",
        *extra,
        "Contact: <sip:alice-0x5581@192.168.1.20:5060;transport=udp>",
        *([f"Max-Forwards: {max_forwards}"] if max_forwards is not None else []),
        "To: <sip:bot@203.0.113.5>",
        'From: "Alice" <sip:alice@example.com>;tag=f9c1e2a7b3',
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} INVITE",
        "User-Agent: baresip v3.10.1 (x86_64/Linux)",
        "Allow: INVITE,ACK,BYE,CANCEL,OPTIONS,NOTIFY,SUBSCRIBE,INFO,MESSAGE,UPDATE,REFER",
        "Supported: replaces,norefersub",
        "Content-Type: application/sdp",
    ]
    return sip("INVITE sip:bot@203.0.113.5 SIP/2.0", headers, SDP)


def caller_request(
    method: str,
    uri: str,
    *,
    call_id: str = "3c26b2f0a7e94f1c",
    branch: str,
    cseq: int,
    to_tag: str | None = None,
    route: str | None = None,
    max_forwards: str = "70",
) -> bytes:
    """CANCEL / ACK / BYE / OPTIONS from the caller (baresip)."""
    to = "To: <sip:bot@203.0.113.5>" + (f";tag={to_tag}" if to_tag else "")
    headers = [
        f"Via: SIP/2.0/UDP 192.168.1.20:5060;branch={branch};rport",
        *([f"Route: {route}"] if route else []),
        f"Max-Forwards: {max_forwards}",
        to,
        'From: "Alice" <sip:alice@example.com>;tag=f9c1e2a7b3',
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        "User-Agent: baresip v3.10.1 (x86_64/Linux)",
    ]
    return sip(f"{method} {uri} SIP/2.0", headers)


def reply(
    request: bytes, status: int, reason: str, *, to_tag: str | None = None, contact: str | None = None, sdp: bytes = b""
) -> bytes:
    """A response as a UAS (pjsua) builds it: Via lines, From, To (+tag), Call-ID, CSeq copied in
    order, Record-Route copied on 18x/2xx."""
    lines = head(request)[1:]
    copied = []
    for line in lines:
        name = line.split(b":", 1)[0].strip().lower()
        if name in (b"via", b"v", b"from", b"f", b"call-id", b"i", b"cseq"):
            copied.append(line.decode())
        elif name in (b"to", b"t"):
            copied.append(line.decode() + (f";tag={to_tag}" if to_tag and b"tag=" not in line else ""))
        elif name == b"record-route" and 100 < status < 300:
            copied.append(line.decode())
    if contact:
        copied.append(f"Contact: {contact}")
    copied.append("Server: voicecall-worker (pjsua2 2.15.1)")
    if sdp:
        copied.append("Content-Type: application/sdp")
    return sip(f"SIP/2.0 {status} {reason}", copied, sdp)


def established(core: SipFrontCore, call_id: str = "3c26b2f0a7e94f1c") -> tuple[bytes, bytes]:
    """Run INVITE -> 200 through the core; returns (INVITE as the worker got it, 200 as the caller got it)."""
    at_worker = one(core.datagram(invite(call_id), CALLER, 0.0)).data
    ok = reply(at_worker, 200, "OK", to_tag="pjW1tag", contact="<sip:127.0.0.1:5401;ob>", sdp=WORKER_SDP)
    at_caller = one(core.datagram(ok, W1, 0.1)).data
    return at_worker, at_caller


# ---------------------------------------------------------------- inbound requests


def test_inbound_invite_gets_via_record_route_and_max_forwards_and_keeps_everything_else() -> None:
    core, picker = core_with(W2)
    sent = invite()
    fwd = one(core.datagram(sent, CALLER, 0.0))
    assert fwd.to == W2
    assert picker.asked == ["3c26b2f0a7e94f1c"]
    lines = head(fwd.data)
    assert lines[0] == b"INVITE sip:bot@203.0.113.5 SIP/2.0"
    our_branch(fwd.data)
    # rport filled in and received added (RFC 3581), our Record-Route below the Via block
    assert lines[2] == b"Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK8a1b2c3d4;rport=34567;received=198.51.100.7"
    assert lines[3] == RR
    original = head(sent)[2:]
    assert lines[4:] == [b"Max-Forwards: 69" if line.startswith(b"Max-Forwards") else line for line in original]
    assert body(fwd.data) == SDP
    assert fwd.data.count(b"\r\n") == sent.count(b"\r\n") + 2  # exactly two lines added, CRLF throughout
    assert core.worker_of("3c26b2f0a7e94f1c") == W2


def test_received_is_added_only_when_the_sent_by_host_is_not_the_source() -> None:
    core, _ = core_with(W1)
    public = invite("c1", via="Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKpub1")
    assert head(one(core.datagram(public, ("198.51.100.7", 5060), 0.0)).data)[2] == (
        b"Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKpub1"
    )
    named_host = invite("c2", via="Via: SIP/2.0/UDP pbx.example.com;branch=z9hG4bKpub2")
    assert head(one(core.datagram(named_host, ("198.51.100.9", 5060), 0.0)).data)[2] == (
        b"Via: SIP/2.0/UDP pbx.example.com;branch=z9hG4bKpub2;received=198.51.100.9"
    )


def test_responses_pop_our_via_and_go_back_to_received_and_rport() -> None:
    core, _ = core_with(W1)
    at_worker = one(core.datagram(invite(), CALLER, 0.0)).data
    caller_via = head(at_worker)[2]
    for status, reason, sdp in ((100, "Trying", b""), (180, "Ringing", b""), (200, "OK", WORKER_SDP)):
        resp = reply(at_worker, status, reason, to_tag="pjW1tag", contact="<sip:127.0.0.1:5401;ob>", sdp=sdp)
        fwd = one(core.datagram(resp, W1, 0.1))
        assert fwd.to == CALLER
        assert named(fwd.data, "via") == [caller_via]
        assert head(fwd.data) == [line for line in head(resp) if not OUR_VIA.match(line)]
        assert body(fwd.data) == sdp
    assert named(fwd.data, "record-route") == [RR]  # the caller learns the route set from the 200


def test_comma_joined_via_values_are_edited_and_popped_one_value_at_a_time() -> None:
    core, _ = core_with(W1)
    sbc: Addr = ("198.51.100.50", 5060)
    joined = "Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK-sbc-1;rport, SIP/2.0/UDP 10.9.9.9:5062;branch=z9hG4bKue77"
    at_worker = one(core.datagram(invite(via=joined), sbc, 0.0)).data
    assert head(at_worker)[2] == (
        b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK-sbc-1;rport=5060;received=198.51.100.50,"
        b" SIP/2.0/UDP 10.9.9.9:5062;branch=z9hG4bKue77"
    )
    # A UA that joins all Via values on one line in its response: only our value goes.
    ours = head(at_worker)[1].removeprefix(b"Via: ").decode()
    rest = head(at_worker)[2].removeprefix(b"Via: ").decode()
    resp = sip(
        "SIP/2.0 180 Ringing",
        [f"Via: {ours}, {rest}", "To: <sip:bot@203.0.113.5>;tag=w1", 'From: "Alice" <sip:alice@example.com>;tag=f9c1e2a7b3',
         "Call-ID: 3c26b2f0a7e94f1c", "CSeq: 7061 INVITE"],
    )  # fmt: skip
    fwd = one(core.datagram(resp, W1, 0.1))
    assert fwd.to == sbc  # received + numeric rport of the next Via
    assert named(fwd.data, "via") == [f"Via: {rest}".encode()]


def test_a_response_whose_top_via_is_not_ours_is_dropped() -> None:
    core, _ = core_with(W1)
    at_worker = one(core.datagram(invite(), CALLER, 0.0)).data
    resp = reply(at_worker, 200, "OK", to_tag="t")
    forged = resp.replace(b"z9hG4bK-vcf-", b"z9hG4bK-xxx-", 1)
    elsewhere = resp.replace(b"203.0.113.5:5060;branch", b"203.0.113.6:5060;branch", 1)
    only_caller_via = reply(invite(), 200, "OK", to_tag="t")
    for bad in (forged, elsewhere, only_caller_via):
        assert core.datagram(bad, W1, 0.1) == []
    assert core.stats["not_ours"] == 3 and core.stats["dropped"] == 3


def test_in_dialog_requests_from_the_caller_follow_the_request_uri_and_lose_our_route() -> None:
    core, _ = core_with(W2)
    at_worker, _ = established(core)
    invite_branch = our_branch(at_worker)
    ack = caller_request(
        "ACK", "sip:127.0.0.1:5401;ob", branch="z9hG4bKack2xx", cseq=7061, to_tag="pjW1tag",
        route="<sip:203.0.113.5:5060;lr>",
    )  # fmt: skip
    fwd = one(core.datagram(ack, CALLER, 0.2))
    assert fwd.to == W1  # the Request-URI names the worker (its Contact), whatever pick_worker said before
    assert named(fwd.data, "route", "record-route") == []
    assert our_branch(fwd.data) != invite_branch  # 2xx ACK: its own transaction
    core.forget("3c26b2f0a7e94f1c")  # no state needed: the BYE is routed by its Request-URI
    bye = caller_request(
        "BYE", "sip:127.0.0.1:5401;ob", branch="z9hG4bKbye1", cseq=7062, to_tag="pjW1tag",
        route="<sip:203.0.113.5:5060;lr>",
    )  # fmt: skip
    fwd = one(core.datagram(bye, CALLER, 5.0))
    assert fwd.to == W1
    assert named(fwd.data, "route") == [] and named(fwd.data, "record-route") == []
    assert head(fwd.data)[0] == b"BYE sip:127.0.0.1:5401;ob SIP/2.0"


def test_route_values_to_us_are_removed_and_the_next_one_is_followed_for_a_worker() -> None:
    core, _ = core_with(W1)
    both = "Route: <sip:203.0.113.5:5060;lr>, <sip:127.0.0.1;lr>,<sip:edge.example.net:5070;lr>"
    bye = worker_bye(uri="sip:alice@192.168.1.20").replace(b"Route: <sip:203.0.113.5:5060;lr>", both.encode())
    fwd = one(core.datagram(bye, W1, 0.0))
    assert fwd.to == ("edge.example.net", 5070)
    assert named(fwd.data, "route") == [b"Route: <sip:edge.example.net:5070;lr>"]
    # Another port on 127.0.0.1 is not us: kept, and it is the next hop.
    other = worker_bye(uri="sip:alice@192.168.1.20").replace(b"203.0.113.5:5060;lr", b"127.0.0.1:5070;lr")
    fwd = one(core.datagram(other, W1, 0.0))
    assert fwd.to == ("127.0.0.1", 5070)
    assert named(fwd.data, "route") == [b"Route: <sip:127.0.0.1:5070;lr>"]
    assert core.stats["relay_refused"] == 0


def test_route_values_to_us_are_removed_from_an_outside_request_and_the_rest_kept_but_not_followed() -> None:
    core, picker = core_with(W2)
    both = "Route: <sip:203.0.113.5:5060;lr>, <sip:127.0.0.1;lr>,<sip:edge.example.net:5070;lr>"
    bye = caller_request("BYE", "sip:alice@192.168.1.20", branch="z9hG4bKr1", cseq=2, to_tag="x", route=None)
    bye = bye.replace(b"Max-Forwards", both.encode() + b"\r\nMax-Forwards", 1)
    fwd = one(core.datagram(bye, CALLER, 0.0))
    assert fwd.to == W1  # the first worker answers 481 for a dialog it does not know
    assert named(fwd.data, "route") == [b"Route: <sip:edge.example.net:5070;lr>"]
    assert core.stats["relay_refused"] == 1 and picker.asked == []


def test_an_outside_request_is_never_relayed_to_a_third_party() -> None:
    core, picker = core_with(W2)
    evil = invite("relay-1", extra=("Route: <sip:evil.example:5060;lr>",)).replace(
        b"INVITE sip:bot@203.0.113.5 SIP/2.0", b"INVITE sip:victim@evil.example SIP/2.0"
    )
    fwd = one(core.datagram(evil, CALLER, 0.0))
    assert fwd.to == W2 and picker.asked == ["relay-1"]
    lines = head(fwd.data)
    assert lines[0] == b"INVITE sip:victim@evil.example SIP/2.0"  # the worker rejects it
    assert lines[3:5] == [RR, b"Route: <sip:evil.example:5060;lr>"]
    assert core.stats["relay_refused"] == 1
    # Behind our own Route, in a known dialog: the dialog's worker.
    bye = caller_request(
        "BYE", "sip:victim@evil.example", call_id="relay-1", branch="z9hG4bKrb", cseq=2, to_tag="w",
        route="<sip:203.0.113.5;lr>, <sip:evil.example;lr>",
    )  # fmt: skip
    fwd = one(core.datagram(bye, CALLER, 1.0))
    assert fwd.to == W2 and named(fwd.data, "route") == [b"Route: <sip:evil.example;lr>"]
    # No Route at all: a foreign Request-URI (maddr too) is no destination either.
    options = caller_request("OPTIONS", "sip:victim@198.51.100.66:5060", call_id="relay-2", branch="z9hG4bKro", cseq=1)
    assert one(core.datagram(options, CALLER, 2.0)).to == W1
    maddr = invite("relay-3").replace(b"sip:bot@203.0.113.5 SIP", b"sip:bot@203.0.113.5;maddr=198.51.100.66 SIP")
    assert one(core.datagram(maddr, CALLER, 3.0)).to == W2
    assert core.stats["relay_refused"] == 2 and picker.asked == ["relay-1", "relay-3"]
    assert core.stats["forwarded"] == 4


def test_max_forwards_decrement_insert_and_483() -> None:
    core, _ = core_with(W1)
    assert named(one(core.datagram(invite("m1", max_forwards="1"), CALLER, 0.0)).data, "max-forwards") == [
        b"Max-Forwards: 0"
    ]
    assert named(one(core.datagram(invite("m2", max_forwards=None), CALLER, 0.0)).data, "max-forwards") == [
        b"Max-Forwards: 70"
    ]
    hops = one(core.datagram(invite("m3", max_forwards="0"), CALLER, 0.0))
    assert hops.to == CALLER
    assert head(hops.data)[0] == b"SIP/2.0 483 Too Many Hops"
    assert core.worker_of("m3") is None
    ack0 = caller_request("ACK", "sip:bot@203.0.113.5", branch="z9hG4bKa0", cseq=1, call_id="m1", max_forwards="0")
    assert core.datagram(ack0, CALLER, 0.0) == []
    # From a worker: the 483 goes back to the worker.
    bye = worker_bye(max_forwards="0")
    hops = one(core.datagram(bye, W1, 0.0))
    assert hops.to == W1 and head(hops.data)[0] == b"SIP/2.0 483 Too Many Hops"
    assert core.stats["too_many_hops"] == 2


def test_invite_cancel_and_non_2xx_ack_share_our_branch() -> None:
    core, picker = core_with(W1, W2)
    at_worker = one(core.datagram(invite(), CALLER, 0.0))
    again = one(core.datagram(invite(), CALLER, 0.5))  # retransmission
    assert again == at_worker and picker.asked == ["3c26b2f0a7e94f1c"]
    cancel = caller_request("CANCEL", "sip:bot@203.0.113.5", branch="z9hG4bK8a1b2c3d4", cseq=7061)
    fwd_cancel = one(core.datagram(cancel, CALLER, 1.0))
    assert fwd_cancel.to == W1  # the INVITE's worker, not the next pick (W2)
    assert our_branch(fwd_cancel.data) == our_branch(at_worker.data)
    assert named(fwd_cancel.data, "record-route") == []
    # The worker answers 487; that final response keeps the routing state for the ACK.
    terminated = reply(at_worker.data, 487, "Request Terminated", to_tag="pjW1tag")
    assert one(core.datagram(terminated, W1, 1.1)).to == CALLER
    ack = caller_request("ACK", "sip:bot@203.0.113.5", branch="z9hG4bK8a1b2c3d4", cseq=7061, to_tag="pjW1tag")
    fwd_ack = one(core.datagram(ack, CALLER, 1.2))
    assert fwd_ack.to == W1 and our_branch(fwd_ack.data) == our_branch(at_worker.data)
    ack2xx = caller_request("ACK", "sip:bot@203.0.113.5", branch="z9hG4bKnew", cseq=7061, to_tag="pjW1tag")
    assert our_branch(one(core.datagram(ack2xx, CALLER, 1.3)).data) != our_branch(at_worker.data)


def test_branch_without_magic_cookie_uses_the_rfc2543_fields() -> None:
    core, _ = core_with(W1)
    old = invite(via="Via: SIP/2.0/UDP 198.51.100.7:5060")
    first = our_branch(one(core.datagram(old, CALLER, 0.0)).data)
    cancel = caller_request("CANCEL", "sip:bot@203.0.113.5", branch="z9hG4bK-ignored", cseq=7061)
    cancel = re.sub(rb"Via: [^\r]*", b"Via: SIP/2.0/UDP 198.51.100.7:5060", cancel)
    assert our_branch(one(core.datagram(cancel, CALLER, 0.1)).data) == first
    other_call = our_branch(one(core.datagram(old.replace(b"3c26b2f0", b"99999999"), CALLER, 0.0)).data)
    assert other_call != first


def test_no_free_worker_gets_486_with_a_to_tag_and_the_ack_is_absorbed() -> None:
    core, picker = core_with(None)
    busy = one(core.datagram(invite(), CALLER, 0.0))
    assert busy.to == CALLER
    to_tag = re.search(rb";tag=([0-9a-f]+)\Z", named(busy.data, "to")[0])
    assert to_tag is not None
    assert head(busy.data) == [
        b"SIP/2.0 486 Busy Here",
        b"Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK8a1b2c3d4;rport=34567;received=198.51.100.7",
        b'From: "Alice" <sip:alice@example.com>;tag=f9c1e2a7b3',
        b"To: <sip:bot@203.0.113.5>;tag=" + to_tag.group(1),
        b"Call-ID: 3c26b2f0a7e94f1c",
        b"CSeq: 7061 INVITE",
        b"Content-Length: 0",
    ]
    assert body(busy.data) == b""
    assert one(core.datagram(invite(), CALLER, 0.5)) == busy  # retransmission: the same 486
    assert picker.asked == ["3c26b2f0a7e94f1c"]
    ack = caller_request(
        "ACK", "sip:bot@203.0.113.5", branch="z9hG4bK8a1b2c3d4", cseq=7061, to_tag=to_tag.group(1).decode()
    )
    assert core.datagram(ack, CALLER, 0.6) == []
    assert core.stats["absorbed"] == 1 and core.stats["rejected_busy"] == 2
    other = one(core.datagram(invite("another-call"), CALLER, 0.7))
    assert named(other.data, "to")[0] != named(busy.data, "to")[0]  # tags differ per Call-ID


def test_a_new_invite_after_486_with_a_higher_cseq_asks_pick_worker_again() -> None:
    core, picker = core_with(None, W2)
    assert head(one(core.datagram(invite(), CALLER, 0.0)).data)[0] == b"SIP/2.0 486 Busy Here"
    assert one(core.datagram(invite(cseq=7062, branch="z9hG4bKretry"), CALLER, 3.0)).to == W2
    assert len(picker.asked) == 2


def test_unknown_cancel_gets_481_unknown_ack_is_dropped_other_requests_go_to_the_first_worker() -> None:
    core, picker = core_with(W2)
    cancel = caller_request("CANCEL", "sip:bot@203.0.113.5", branch="z9hG4bKc", cseq=1, call_id="nobody")
    no_tx = one(core.datagram(cancel, CALLER, 0.0))
    assert no_tx.to == CALLER
    assert head(no_tx.data)[0] == b"SIP/2.0 481 Call/Transaction Does Not Exist"
    assert named(no_tx.data, "cseq") == [b"CSeq: 1 CANCEL"]
    ack = caller_request("ACK", "sip:bot@203.0.113.5", branch="z9hG4bKa", cseq=1, call_id="nobody2", to_tag="t")
    assert core.datagram(ack, CALLER, 0.0) == []
    options = caller_request("OPTIONS", "sip:203.0.113.5", branch="z9hG4bKo", cseq=1, call_id="ping")
    assert one(core.datagram(options, TRUNK, 0.0)).to == W1
    bye = caller_request("BYE", "sip:bot@203.0.113.5", branch="z9hG4bKb", cseq=2, call_id="gone", to_tag="t")
    assert one(core.datagram(bye, CALLER, 0.0)).to == W1
    assert picker.asked == []


# ---------------------------------------------------------------- requests from workers


def worker_bye(*, max_forwards: str = "70", uri: str = "sip:alice-0x5581@192.168.1.20:5060;transport=udp") -> bytes:
    """pjsua's BYE for an inbound call: Request-URI = the caller's Contact, Route = our Record-Route."""
    return sip(
        f"BYE {uri} SIP/2.0",
        [
            "Via: SIP/2.0/UDP 127.0.0.1:5401;rport;branch=z9hG4bKPj3b9e6c1a",
            f"Max-Forwards: {max_forwards}",
            "From: <sip:bot@203.0.113.5>;tag=pjW1tag",
            "To: \"Alice\" <sip:alice@example.com>;tag=f9c1e2a7b3",
            "Call-ID: 3c26b2f0a7e94f1c",
            "CSeq: 1822 BYE",
            "Route: <sip:203.0.113.5:5060;lr>",
            "User-Agent: voicecall-worker (pjsua2 2.15.1)",
        ],
    )


def test_worker_bye_goes_to_the_callers_contact_and_its_200_comes_back() -> None:
    core, _ = core_with(W1)
    established(core)
    # The caller's Contact is reachable at its public address here (a NAT-aware carrier writes that).
    bye = worker_bye(uri="sip:alice@198.51.100.7:34567")
    fwd = one(core.datagram(bye, W1, 3.0))
    assert fwd.to == CALLER
    lines = head(fwd.data)
    assert lines[0] == b"BYE sip:alice@198.51.100.7:34567 SIP/2.0"
    our_branch(fwd.data)
    assert lines[2] == b"Via: SIP/2.0/UDP 127.0.0.1:5401;rport=5401;branch=z9hG4bKPj3b9e6c1a;received=127.0.0.1"
    assert named(fwd.data, "route", "record-route") == []
    assert named(fwd.data, "max-forwards") == [b"Max-Forwards: 69"]
    ok = reply(fwd.data, 200, "OK")
    back = one(core.datagram(ok, CALLER, 3.1))
    assert back.to == W1
    assert named(back.data, "via") == [lines[2]]


def test_worker_outbound_invite_is_record_routed_and_sent_by_route_or_request_uri() -> None:
    core, picker = core_with(W1)

    def outbound(uri: str, *routes: str, call_id: str = "pj-out-1") -> bytes:
        return sip(
            f"INVITE {uri} SIP/2.0",
            [
                "Via: SIP/2.0/UDP 127.0.0.1:5402;rport;branch=z9hG4bKPjout1",
                "Max-Forwards: 70",
                "From: <sip:bot@voicecall.example.com>;tag=pjOut",
                f"To: <{uri}>",
                "Contact: <sip:127.0.0.1:5402;ob>",
                f"Call-ID: {call_id}",
                "CSeq: 100 INVITE",
                *(f"Route: {r}" for r in routes),
                "Content-Type: application/sdp",
            ],
            WORKER_SDP,
        )

    via_front = outbound("sip:+15551234567@trunk.example.com;user=phone", "<sip:203.0.113.5:5060;lr>")
    fwd = one(core.datagram(via_front, W2, 0.0))
    assert fwd.to == ("trunk.example.com", 5060)
    assert named(fwd.data, "route") == []
    assert named(fwd.data, "record-route") == [RR]
    assert body(fwd.data) == WORKER_SDP
    assert core.worker_of("pj-out-1") == W2 and picker.asked == []
    # A further Route is the next hop; maddr overrides the host; transport= is ignored.
    sbc = outbound("sip:+15551234567@trunk.example.com", "<sip:203.0.113.5;lr>", "<sip:sbc.example.net:5080;lr>", call_id="o2")
    assert one(core.datagram(sbc, W2, 0.0)).to == ("sbc.example.net", 5080)
    maddr = outbound("sip:bob@example.com;maddr=198.51.100.60;transport=udp", "<sip:203.0.113.5:5060;lr>", call_id="o3")
    assert one(core.datagram(maddr, W2, 0.0)).to == ("198.51.100.60", 5060)
    # The callee's answer reaches the worker; its in-dialog BYE (Route = our Record-Route,
    # Request-URI = the worker's Contact) too.
    ok = reply(fwd.data, 200, "OK", to_tag="callee", contact="<sip:+15551234567@198.51.100.50>", sdp=SDP)
    assert one(core.datagram(ok, TRUNK, 1.0)).to == W2
    bye = caller_request(
        "BYE", "sip:127.0.0.1:5402;ob", branch="z9hG4bKtrunkbye", cseq=2, call_id="pj-out-1", to_tag="pjOut",
        route="<sip:203.0.113.5:5060;lr>",
    )  # fmt: skip
    assert one(core.datagram(bye, TRUNK, 2.0)).to == W2


def test_a_request_that_would_come_back_to_us_is_dropped() -> None:
    core, _ = core_with(W1)
    loop = worker_bye(uri="sip:bot@127.0.0.1:5060").replace(b"Route: <sip:203.0.113.5:5060;lr>\r\n", b"")
    assert core.datagram(loop, W1, 0.0) == []
    assert core.stats["loops"] == 1


# ---------------------------------------------------------------- internal address: double Record-Route (RFC 5658)


def double_core(*answers: Addr | None) -> tuple[SipFrontCore, Picker]:
    picker = Picker(*answers)
    return SipFrontCore(ADV, (W1, W2), picker, local_hosts=("127.0.0.1",), internal=INT), picker


def test_inbound_call_with_an_internal_address_gets_internal_over_advertised_record_route() -> None:
    core, _ = double_core(W1)
    sbc_rr = "Record-Route: <sip:sbc.example.net;lr>"
    at_worker = one(core.datagram(invite(extra=(sbc_rr,)), CALLER, 0.0))
    assert at_worker.to == W1
    lines = head(at_worker.data)
    assert sent_by(at_worker.data) == b"10.0.0.5:5070"  # the worker answers to the internal address
    # The worker (UAS) routes by the top value, the caller (UAC) by the reversed list.
    assert lines[3:6] == [RR_INT, RR, sbc_rr.encode()]
    ok = reply(at_worker.data, 200, "OK", to_tag="pjW1tag", contact="<sip:127.0.0.1:5401;ob>", sdp=WORKER_SDP)
    at_caller = one(core.datagram(ok, W1, 0.1))
    assert at_caller.to == CALLER and named(at_caller.data, "record-route") == [RR_INT, RR, sbc_rr.encode()]
    # The worker's BYE: Route = its route set, both our values first; they are popped together.
    worker_route = "Route: <sip:10.0.0.5:5070;lr>, <sip:203.0.113.5:5060;lr>, <sip:sbc.example.net;lr>"
    bye = worker_bye(uri="sip:alice@192.168.1.20")
    bye = bye.replace(b"Route: <sip:203.0.113.5:5060;lr>", worker_route.encode())
    fwd = one(core.datagram(bye, W1, 1.0))
    assert fwd.to == ("sbc.example.net", 5060)
    assert named(fwd.data, "route") == [b"Route: <sip:sbc.example.net;lr>"]
    assert sent_by(fwd.data) == b"203.0.113.5:5060"
    # The caller's BYE, through the SBC: the reversed list, advertised before internal.
    caller_bye = caller_request(
        "BYE", "sip:127.0.0.1:5401;ob", branch="z9hG4bKdbye", cseq=7062, to_tag="pjW1tag",
        route="<sip:203.0.113.5:5060;lr>, <sip:10.0.0.5:5070;lr>",
    )  # fmt: skip
    fwd = one(core.datagram(caller_bye, ("198.51.100.50", 5060), 2.0))
    assert fwd.to == W1 and named(fwd.data, "route") == [] and sent_by(fwd.data) == b"10.0.0.5:5070"
    assert named(fwd.data, "max-forwards") == [b"Max-Forwards: 69"]
    back = one(core.datagram(reply(fwd.data, 200, "OK"), W1, 2.1))
    assert back.to == ("198.51.100.50", 5060) and head(back.data)[0] == b"SIP/2.0 200 OK"
    assert core.stats["relay_refused"] == 0 and core.stats["loops"] == 0


def test_outbound_call_with_an_internal_address_gets_advertised_over_internal_record_route() -> None:
    core, picker = double_core()
    invite_out = sip(
        "INVITE sip:+15551234567@trunk.example.com SIP/2.0",
        [
            "Via: SIP/2.0/UDP 127.0.0.1:5402;rport;branch=z9hG4bKPjout1",
            "Route: <sip:10.0.0.5:5070;lr>",  # the worker's outbound proxy: the internal address
            "Max-Forwards: 70",
            "From: <sip:bot@voicecall.example.com>;tag=pjOut",
            "To: <sip:+15551234567@trunk.example.com>",
            "Contact: <sip:127.0.0.1:5402;ob>",
            "Call-ID: pj-out-2",
            "CSeq: 100 INVITE",
            "Content-Type: application/sdp",
        ],
        WORKER_SDP,
    )
    fwd = one(core.datagram(invite_out, W2, 0.0))
    assert fwd.to == ("trunk.example.com", 5060)
    assert sent_by(fwd.data) == b"203.0.113.5:5060"
    assert named(fwd.data, "route") == []
    # The callee (UAS) routes by the top value, the worker (UAC) by the reversed list.
    assert named(fwd.data, "record-route") == [RR, RR_INT]
    ok = reply(fwd.data, 200, "OK", to_tag="callee", contact="<sip:+15551234567@198.51.100.50>", sdp=SDP)
    assert one(core.datagram(ok, TRUNK, 1.0)).to == W2
    ack = sip(
        "ACK sip:+15551234567@198.51.100.50 SIP/2.0",
        [
            "Via: SIP/2.0/UDP 127.0.0.1:5402;rport;branch=z9hG4bKPjack1",
            "Route: <sip:10.0.0.5:5070;lr>, <sip:203.0.113.5:5060;lr>",
            "Max-Forwards: 70",
            "From: <sip:bot@voicecall.example.com>;tag=pjOut",
            "To: <sip:+15551234567@trunk.example.com>;tag=callee",
            "Call-ID: pj-out-2",
            "CSeq: 100 ACK",
        ],
    )
    fwd_ack = one(core.datagram(ack, W2, 1.1))
    assert fwd_ack.to == TRUNK and named(fwd_ack.data, "route") == []
    assert sent_by(fwd_ack.data) == b"203.0.113.5:5060"
    bye = caller_request(
        "BYE", "sip:127.0.0.1:5402;ob", branch="z9hG4bKtrunkbye", cseq=2, call_id="pj-out-2", to_tag="pjOut",
        route="<sip:203.0.113.5:5060;lr>, <sip:10.0.0.5:5070;lr>",
    )  # fmt: skip
    fwd_bye = one(core.datagram(bye, TRUNK, 2.0))
    assert fwd_bye.to == W2 and named(fwd_bye.data, "route") == [] and sent_by(fwd_bye.data) == b"10.0.0.5:5070"
    assert picker.asked == []


def test_responses_are_ours_through_either_address_and_only_those() -> None:
    core, _ = double_core(W1)
    at_worker = one(core.datagram(invite(), CALLER, 0.0)).data
    ringing = reply(at_worker, 180, "Ringing", to_tag="pjW1tag")
    assert one(core.datagram(ringing, W1, 0.1)).to == CALLER
    as_advertised = ringing.replace(b"Via: SIP/2.0/UDP 10.0.0.5:5070;", b"Via: SIP/2.0/UDP 203.0.113.5;", 1)
    assert one(core.datagram(as_advertised, W1, 0.2)).to == CALLER
    other_port = ringing.replace(b"Via: SIP/2.0/UDP 10.0.0.5:5070;", b"Via: SIP/2.0/UDP 10.0.0.5:5060;", 1)
    assert core.datagram(other_port, W1, 0.3) == []
    assert core.stats["not_ours"] == 1


@pytest.mark.parametrize("internal", [None, ADV, ("203.0.113.5", 5060)])
def test_without_a_distinct_internal_address_there_is_one_record_route(internal: Addr | None) -> None:
    core = SipFrontCore(ADV, (W1,), Picker(W1), internal=internal)
    fwd = one(core.datagram(invite(), CALLER, 0.0))
    assert named(fwd.data, "record-route") == [RR] and sent_by(fwd.data) == b"203.0.113.5:5060"


# ---------------------------------------------------------------- the worker set


def worker_register(source: Addr = W1) -> bytes:
    return sip(
        "REGISTER sip:sip.carrier.example SIP/2.0",
        [
            f"Via: SIP/2.0/UDP {source[0]}:{source[1]};rport;branch=z9hG4bKPjreg1",
            "Route: <sip:203.0.113.5:5060;lr>",
            "Max-Forwards: 70",
            "From: <sip:bot@sip.carrier.example>;tag=pjReg",
            "To: <sip:bot@sip.carrier.example>",
            "Call-ID: pj-reg-1",
            "CSeq: 1 REGISTER",
            f"Contact: <sip:bot@{source[0]}:{source[1]};ob>",
            "Expires: 300",
        ],
    )


def test_without_workers_new_calls_get_503_with_retry_after_and_nothing_is_relayed() -> None:
    core, picker = core_with(W1, workers=())
    unavailable = one(core.datagram(invite(), CALLER, 0.0))
    assert unavailable.to == CALLER
    to_tag = re.search(rb";tag=([0-9a-f]{16})\Z", named(unavailable.data, "to")[0])
    assert to_tag is not None
    assert head(unavailable.data) == [
        b"SIP/2.0 503 Service Unavailable",
        b"Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK8a1b2c3d4;rport=34567;received=198.51.100.7",
        b'From: "Alice" <sip:alice@example.com>;tag=f9c1e2a7b3',
        b"To: <sip:bot@203.0.113.5>;tag=" + to_tag.group(1),
        b"Call-ID: 3c26b2f0a7e94f1c",
        b"CSeq: 7061 INVITE",
        b"Retry-After: 1",
        b"Content-Length: 0",
    ]
    core.set_workers([W1])
    # The INVITE's retransmission gets the same answer, its ACK is absorbed, its CANCEL gets 200.
    assert one(core.datagram(invite(), CALLER, 0.5)) == unavailable
    ack = caller_request(
        "ACK", "sip:bot@203.0.113.5", branch="z9hG4bK8a1b2c3d4", cseq=7061, to_tag=to_tag.group(1).decode()
    )
    assert core.datagram(ack, CALLER, 0.6) == []
    cancel = caller_request("CANCEL", "sip:bot@203.0.113.5", branch="z9hG4bK8a1b2c3d4", cseq=7061)
    assert head(one(core.datagram(cancel, CALLER, 0.7)).data)[0] == b"SIP/2.0 200 OK"
    assert picker.asked == [] and core.stats["no_workers"] == 2 and core.stats["absorbed"] == 1
    # The caller tries again (a new CSeq): now there is a worker.
    assert one(core.datagram(invite(cseq=7062, branch="z9hG4bKagain"), CALLER, 2.0)).to == W1
    assert picker.asked == ["3c26b2f0a7e94f1c"]


def test_without_workers_other_requests_get_503_and_an_ack_is_dropped() -> None:
    core, _ = core_with(W1, workers=())
    options = caller_request("OPTIONS", "sip:203.0.113.5", branch="z9hG4bKo", cseq=1, call_id="ping")
    busy = one(core.datagram(options, TRUNK, 0.0))
    assert busy.to == TRUNK
    assert head(busy.data)[0] == b"SIP/2.0 503 Service Unavailable"
    assert named(busy.data, "retry-after") == [b"Retry-After: 1"]
    assert re.fullmatch(rb"To: <sip:bot@203\.0\.113\.5>;tag=[0-9a-f]{16}", named(busy.data, "to")[0])
    ack = caller_request("ACK", "sip:bot@203.0.113.5", branch="z9hG4bKa", cseq=1, call_id="late", to_tag="t")
    assert core.datagram(ack, CALLER, 0.0) == []
    # A worker the front does not know yet is just another outside peer: its REGISTER is not
    # relayed to the registrar.
    assert head(one(core.datagram(worker_register(), W1, 0.0)).data)[0] == b"SIP/2.0 503 Service Unavailable"
    assert core.stats["no_workers"] == 2 and core.stats["forwarded"] == 0


def test_set_workers_replaces_the_set_and_drops_routing_for_removed_workers() -> None:
    core, picker = core_with(W1, W2, workers=())
    restarted: Addr = ("127.0.0.1", 5403)
    core.set_workers([W1, W2])
    fwd = one(core.datagram(worker_register(), W1, 0.0))
    assert fwd.to == ("sip.carrier.example", 5060) and named(fwd.data, "route") == []
    one(core.datagram(invite("on-w1"), CALLER, 0.0))
    one(core.datagram(invite("on-w2"), CALLER, 0.0))
    assert (core.worker_of("on-w1"), core.worker_of("on-w2")) == (W1, W2)
    # W1 crashed and came back on another port.
    core.set_workers([restarted, W2])
    assert (core.worker_of("on-w1"), core.worker_of("on-w2")) == (None, W2)
    assert core.workers == [restarted, W2]
    cancel = caller_request("CANCEL", "sip:bot@203.0.113.5", call_id="on-w1", branch="z9hG4bK8a1b2c3d4", cseq=7061)
    assert head(one(core.datagram(cancel, CALLER, 1.0)).data)[0] == b"SIP/2.0 481 Call/Transaction Does Not Exist"
    assert one(core.datagram(worker_register(restarted), restarted, 1.0)).to == ("sip.carrier.example", 5060)
    # Request-URIs naming the old port no longer reach a worker by it; the new port does.
    in_dialog = caller_request("BYE", "sip:127.0.0.1:5403;ob", branch="z9hG4bKb3", cseq=3, call_id="x", to_tag="t")
    assert one(core.datagram(in_dialog, CALLER, 1.0)).to == restarted
    stale = caller_request("BYE", "sip:127.0.0.1:5401;ob", branch="z9hG4bKb1", cseq=3, call_id="y", to_tag="t")
    assert one(core.datagram(stale, CALLER, 1.0)).to == restarted  # the first worker, which answers 481
    assert picker.asked == ["on-w1", "on-w2"]


def test_a_picked_worker_outside_the_set_gets_503() -> None:
    core, picker = core_with(("127.0.0.1", 5499))
    refused = one(core.datagram(invite(), CALLER, 0.0))
    assert head(refused.data)[0] == b"SIP/2.0 503 Service Unavailable" and refused.to == CALLER
    assert core.worker_of("3c26b2f0a7e94f1c") is None
    assert core.stats["unroutable"] == 1 and core.stats["no_workers"] == 1 and picker.asked == ["3c26b2f0a7e94f1c"]


# ---------------------------------------------------------------- parsing


def test_compact_header_forms() -> None:
    core, picker = core_with(W1)
    compact = sip(
        "INVITE sip:bot@203.0.113.5 SIP/2.0",
        [
            "v: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bKcompact;rport",
            "Max-Forwards: 70",
            "f: <sip:alice@example.com>;tag=cf1",
            "t: <sip:bot@203.0.113.5>",
            "i: compact-call@192.168.1.20",
            "CSeq: 1 INVITE",
            "m: <sip:alice@192.168.1.20>",
            "c: application/sdp",
        ],
        SDP,
        length="l",
    )
    fwd = one(core.datagram(compact, CALLER, 0.0))
    assert picker.asked == ["compact-call@192.168.1.20"]
    lines = head(fwd.data)
    our_branch(fwd.data)
    assert lines[2] == b"v: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bKcompact;rport=34567;received=198.51.100.7"
    assert lines[3] == RR
    assert body(fwd.data) == SDP and lines[-1] == f"l: {len(SDP)}".encode()
    # A compact response from the worker: our Via (written long) is popped.
    resp = reply(fwd.data, 180, "Ringing", to_tag="w").replace(b"Via: SIP", b"v: SIP")
    back = one(core.datagram(resp, W1, 0.1))
    assert back.to == CALLER and named(back.data, "v", "via") == [lines[2]]
    # A 486 reply keeps the compact names it copies.
    busy, _ = core_with(None)
    assert head(one(busy.datagram(compact, CALLER, 0.0)).data)[1].startswith(b"v: SIP/2.0/UDP")


def test_lf_only_and_folded_headers_are_understood_and_output_uses_crlf() -> None:
    core, picker = core_with(W1)
    folded = invite().replace(b"Call-ID: 3c26b2f0a7e94f1c", b"Call-ID:\r\n  folded-id")
    fwd = one(core.datagram(folded, CALLER, 0.0))
    assert picker.asked == ["folded-id"]
    assert b"Call-ID:\r\n  folded-id\r\n" in fwd.data  # an unedited header stays as received
    lf = invite("lf-call").split(b"\r\n\r\n")[0].replace(b"\r\n", b"\n") + b"\n\n" + SDP
    fwd = one(core.datagram(lf, CALLER, 0.0))
    assert b"\n" not in fwd.data.split(b"\r\n\r\n")[0].replace(b"\r\n", b"")
    assert body(fwd.data) == SDP


GARBAGE = [
    b"\x00\xff" * 40,
    b"hello world\r\n\r\n",
    b"INVITE sip:bot@203.0.113.5 SIP/2.0\r\n\r\n",  # no Via, Call-ID, ...
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-vcf-1\r\n\r\n",
    b"SIP/2.0 999 Nope\r\n\r\n",
    invite()[:-10],  # body shorter than Content-Length
    invite()[:200],  # cut inside the headers
    invite().replace(b"Content-Length: ", b"Content-Length: x"),
    invite().replace(b"Max-Forwards: 70", b"Max-Forwards: \xc2\xb2"),
    invite().replace(b"CSeq: 7061 INVITE", b"CSeq: INVITE"),
    invite().replace(b"Via: SIP/2.0/UDP 192.168.1.20:5060", b"Via: SIP/3.0/UDP 192.168.1.20:5060"),
    invite().replace(b"To: <sip:bot@203.0.113.5>", b"To: <sip:bot@203.0.113.5"),
    invite().replace(b"User-Agent:", b"User Agent:"),
    b" leading continuation\r\n" + invite(),
]


@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_dropped_and_counted(data: bytes) -> None:
    core, picker = core_with(W1)
    assert core.datagram(data, CALLER, 0.0) == []
    assert core.stats["dropped"] == 1 and picker.asked == []


def test_crlf_keepalives_are_ignored() -> None:
    core, _ = core_with(W1)
    assert core.datagram(b"\r\n\r\n", CALLER, 0.0) == []
    assert core.datagram(b"\r\n", CALLER, 0.0) == []
    assert core.stats["keepalive"] == 2 and core.stats["dropped"] == 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1500))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    core, _ = core_with(W1, None)
    out = core.datagram(data, CALLER, 0.0)
    assert all(isinstance(f, Forward) for f in out)


SIPPY = st.text(alphabet=' \t;:,<>"=@[]._-/abcz09SIPUDrptlvmadgh\\', max_size=50)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from([b"Via: ", b"To: ", b"From: ", b"CSeq: ", b"Call-ID: ", b"Max-Forwards: ", b"INVITE "]),
    value=SIPPY,
    from_worker=st.booleans(),
    route=st.none() | SIPPY,
)
def test_mangled_fields_never_raise(field: bytes, value: str, from_worker: bool, route: str | None) -> None:
    core, _ = core_with(W1, None)
    data = invite(extra=(f"Route: {route}",) if route is not None else ())
    start = data.index(field) + len(field)
    end = data.index(b"\r\n", start)
    data = data[:start] + value.encode() + data[end:]
    for out in (core.datagram(data, W1 if from_worker else CALLER, 0.0),):
        for fwd in out:
            assert fwd.data.startswith((b"INVITE ", b"SIP/2.0 "))
    # ... and whatever went to a worker parses again as a response source would see it.
    resp = data.replace(b"INVITE sip:bot@203.0.113.5 SIP/2.0", b"SIP/2.0 200 OK", 1)
    core.datagram(resp, W1, 0.0)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(invite())), junk=st.binary(max_size=20))
def test_truncated_or_spliced_invites_never_raise(cut: int, junk: bytes) -> None:
    core, _ = core_with(W1)
    core.datagram(invite()[:cut], CALLER, 0.0)
    core.datagram(invite()[:cut] + junk + invite()[cut:], CALLER, 0.0)


# ---------------------------------------------------------------- routing state


def test_routing_state_expires_after_the_ttl_and_on_forget() -> None:
    core, picker = core_with(W2, ttl=64.0)
    one(core.datagram(invite(), CALLER, 0.0))
    cancel = caller_request("CANCEL", "sip:bot@203.0.113.5", branch="z9hG4bK8a1b2c3d4", cseq=7061)
    assert one(core.datagram(cancel, CALLER, 63.0)).to == W2  # refreshes the entry
    assert one(core.datagram(cancel, CALLER, 126.9)).to == W2
    late = one(core.datagram(cancel, CALLER, 126.9 + 64.0))
    assert head(late.data)[0] == b"SIP/2.0 481 Call/Transaction Does Not Exist"
    assert core.stats["expired"] == 1
    one(core.datagram(invite("x2"), CALLER, 200.0))
    core.forget("x2")
    assert core.worker_of("x2") is None
    assert len(picker.asked) == 2


def test_the_call_table_is_bounded_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sip_proxy, "MAX_DIALOGS", 3)
    core, _ = core_with(W1)
    for n in range(4):
        one(core.datagram(invite(f"call-{n}"), CALLER, float(n)))
    assert [core.worker_of(f"call-{n}") for n in range(4)] == [None, W1, W1, W1]


def test_final_responses_keep_routing_state_for_retransmissions() -> None:
    core, _ = core_with(W1)
    at_worker = one(core.datagram(invite(), CALLER, 0.0)).data
    busy = reply(at_worker, 486, "Busy Here", to_tag="pj")
    assert one(core.datagram(busy, W1, 0.1)).to == CALLER
    assert one(core.datagram(busy, W1, 0.6)).to == CALLER  # the worker retransmits until ACKed
    ack = caller_request("ACK", "sip:bot@203.0.113.5", branch="z9hG4bK8a1b2c3d4", cseq=7061, to_tag="pj")
    assert one(core.datagram(ack, CALLER, 0.7)).to == W1
    assert core.worker_of("3c26b2f0a7e94f1c") == W1


# ---------------------------------------------------------------- the asyncio edge, real sockets


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Addr]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, (addr[0], addr[1])))

    @property
    def address(self) -> Addr:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def send(self, data: bytes, to: Addr) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)

    async def recv(self, timeout: float = 2.0) -> tuple[bytes, Addr]:
        return await asyncio.wait_for(self.queue.get(), timeout)


@contextlib.asynccontextmanager
async def peer() -> AsyncIterator[Peer]:
    _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        yield protocol
    finally:
        assert protocol.transport is not None
        protocol.transport.close()


async def test_edge_carries_a_whole_call_over_real_udp_sockets(caplog: pytest.LogCaptureFixture) -> None:
    async with peer() as caller, peer() as worker:
        port = bridge_sip()
        front_addr: Addr = ("127.0.0.1", port)
        picker = Picker(worker.address)
        front = SipFront(SipFrontCore(front_addr, [worker.address], picker), front_addr)
        await front.start()
        try:
            assert front.address == front_addr
            cport, wport = caller.address[1], worker.address[1]
            inv = invite(via=f"Via: SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bKedge1;rport").replace(
                b"203.0.113.5", f"127.0.0.1:{port}".encode()
            )
            caller.send(inv, front_addr)
            got, source = await worker.recv()
            assert source == front_addr
            lines = head(got)
            assert re.fullmatch(rf"Via: SIP/2\.0/UDP 127\.0\.0\.1:{port};branch=z9hG4bK-vcf-[0-9a-f]+".encode(), lines[1])
            assert lines[2] == f"Via: SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bKedge1;rport={cport};received=127.0.0.1".encode()
            assert lines[3] == f"Record-Route: <sip:127.0.0.1:{port};lr>".encode()
            assert body(got) == SDP

            contact = f"<sip:127.0.0.1:{wport}>"
            for status, reason in ((100, "Trying"), (200, "OK")):
                worker.send(reply(got, status, reason, to_tag="wt", contact=contact, sdp=WORKER_SDP if status == 200 else b""), front_addr)
                resp, source = await caller.recv()
                assert source == front_addr
                assert head(resp)[0] == f"SIP/2.0 {status} {reason}".encode()
                assert named(resp, "via") == [lines[2]]
            assert body(resp) == WORKER_SDP and named(resp, "record-route") == [lines[3]]

            route = f"<sip:127.0.0.1:{port};lr>"
            for method, cseq in (("ACK", 7061), ("BYE", 7062)):
                req = caller_request(
                    method, f"sip:127.0.0.1:{wport}", branch=f"z9hG4bKedge{method}", cseq=cseq, to_tag="wt", route=route
                ).replace(b"192.168.1.20:5060", f"127.0.0.1:{cport}".encode())
                caller.send(req, front_addr)
                at_worker, _ = await worker.recv()
                assert head(at_worker)[0] == f"{method} sip:127.0.0.1:{wport} SIP/2.0".encode()
                assert named(at_worker, "route") == []
            worker.send(reply(at_worker, 200, "OK"), front_addr)
            bye_ok, _ = await caller.recv()
            assert head(bye_ok)[0] == b"SIP/2.0 200 OK" and named(bye_ok, "cseq") == [b"CSeq: 7062 BYE"]

            # A DNS name as destination: resolved off the loop, then sent.
            by_name = worker_bye(uri=f"sip:alice@localhost:{cport}").replace(
                b"<sip:203.0.113.5:5060;lr>", route.encode()
            ).replace(b"127.0.0.1:5401", f"127.0.0.1:{wport}".encode())
            worker.send(by_name, front_addr)
            got_bye, _ = await caller.recv()
            assert head(got_bye)[0] == f"BYE sip:alice@localhost:{cport} SIP/2.0".encode()

            # Garbage and a failing core do not stop the server; the failure is logged.
            caller.send(b"\x00garbage", front_addr)
            await asyncio.sleep(0.1)
            real = front.core.datagram

            def broken(data: bytes, source: Addr, now: float) -> list[Forward]:
                front.core.datagram = real  # type: ignore[method-assign]
                raise RuntimeError("boom")

            front.core.datagram = broken  # type: ignore[method-assign]
            with caplog.at_level(logging.ERROR, logger="voicecall.sip"):
                caller.send(inv, front_addr)
                await asyncio.sleep(0.1)
            assert "dropped a datagram" in caplog.text
            caller.send(inv.replace(b"3c26b2f0a7e94f1c", b"after-error"), front_addr)
            again, _ = await worker.recv()
            assert b"Call-ID: after-error" in again
            assert worker.queue.empty() and caller.queue.empty()
            assert front.core.stats["malformed"] == 1 and picker.asked == ["3c26b2f0a7e94f1c", "after-error"]
        finally:
            await front.close()


async def test_edge_names_the_address_when_the_port_is_taken() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        addr = taken.getsockname()
        front = SipFront(SipFrontCore(addr, [W1], Picker()), addr)
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{addr[1]}"):
            await front.start()
    front = SipFront(SipFrontCore(("127.0.0.1", 5060), [W1], Picker()), ("127.0.0.1", 0))
    await front.start()
    try:
        assert front.address[1] != 0
    finally:
        await front.close()


# ---------------------------------------------------------------- sipp through the front

SIPP = shutil.which("sipp")
needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) not installed")


class RecordingCore(SipFrontCore):
    """The real core, noting (first word of the start line, Call-ID, destination) of what it sends."""

    sent: list[tuple[str, str, Addr]]

    def datagram(self, data: bytes, source: Addr, now: float) -> list[Forward]:
        out = super().datagram(data, source, now)
        for fwd in out:
            call_id = re.search(rb"^(?:Call-ID|i)\s*:\s*(\S+)", fwd.data, re.MULTILINE | re.IGNORECASE)
            self.sent.append((fwd.data.split(b" ", 1)[0].decode(), call_id.group(1).decode() if call_id else "", fwd.to))
        return out


def _bound(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@contextlib.asynccontextmanager
async def background_uas(workdir: Path) -> AsyncIterator[tuple[Addr, Path]]:
    """A sipp UAS ("worker") in the background; yields its address and its message trace."""
    assert SIPP
    port = uas_port()
    trace = workdir / f"uas-{port}.log"
    log = (workdir / f"{trace.stem}.out").open("wb")
    proc = await asyncio.create_subprocess_exec(
        SIPP, "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1", "-mp", str(sipp_media()),
        "-nostdin", "-timeout", "25s", "-trace_msg", "-message_file", str(trace),
        cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for _ in range(100):
            if _bound(port) or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.returncode is None and _bound(port), f"sipp UAS did not start on {port}"
        yield ("127.0.0.1", port), trace
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def run_uac(front: Addr, workdir: Path, calls: int = 20, limit: int = 10) -> tuple[int, str]:
    assert SIPP
    errors = workdir / "uac-errors.log"
    proc = await asyncio.create_subprocess_exec(
        SIPP, "-sn", "uac", "-i", "127.0.0.1", "-p", str(sipp_uac()), "-mi", "127.0.0.1", "-mp", str(sipp_media()),
        "-m", str(calls), "-l", str(limit), "-r", "50", "-d", "200", "-nostdin", "-timeout", "20s", "-timeout_error",
        "-trace_err", "-error_file", str(errors), f"{front[0]}:{front[1]}",
        cwd=workdir, stdin=subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")[-3000:]
    if errors.exists():
        text += "\n" + errors.read_text(errors="replace")[-3000:]
    return proc.returncode or 0, text


def trace_requests(trace: Path) -> dict[str, Counter[str]]:
    """Call-ID -> methods the sipp UAS received, from its -trace_msg file."""
    seen: dict[str, Counter[str]] = defaultdict(Counter)
    text = trace.read_text(errors="replace") if trace.exists() else ""
    for block in text.split("UDP message received")[1:]:
        lines = block.split("\n", 3)
        start = lines[2].strip() if len(lines) > 2 else ""
        call_id = re.search(r"^Call-ID:\s*(\S+)", block, re.MULTILINE)
        if call_id and not start.startswith("SIP/2.0"):
            seen[call_id.group(1)][start.split(" ", 1)[0]] += 1
    return seen


@contextlib.asynccontextmanager
async def running_front(
    workers: list[Addr], pick: Picker, *, internal: bool = False
) -> AsyncIterator[tuple[SipFront, RecordingCore]]:
    """With `internal`, the advertised address is 127.0.0.2 (the front's socket does not serve it,
    like a public address that does not hairpin) and the workers reach the front at 127.0.0.1."""
    port = bridge_sip()
    bound = ("127.0.0.1", port)
    advertised = ("127.0.0.2", port) if internal else bound
    core = RecordingCore(advertised, workers, pick, local_hosts=("localhost",), internal=bound if internal else None)
    core.sent = []
    front = SipFront(core, ("127.0.0.1", port))
    await front.start()
    try:
        yield front, core
    finally:
        await front.close()


@needs_sipp
@pytest.mark.parametrize("internal", [False, True], ids=["single-rr", "double-rr"])
async def test_sipp_calls_through_the_front_to_one_worker(tmp_path: Path, internal: bool) -> None:
    async with background_uas(tmp_path) as (uas, trace):
        pick = Picker(uas)
        async with running_front([uas], pick, internal=internal) as (front, core):
            code, output = await run_uac(front.address, tmp_path)
            assert code == 0, output
        await asyncio.sleep(0.3)  # let the UAS write its trace before it is stopped
    assert len(pick.asked) == 20 and len(set(pick.asked)) == 20
    to_worker = Counter(method for method, _, to in core.sent if to == uas)
    assert to_worker["INVITE"] >= 20 and to_worker["ACK"] >= 20 and to_worker["BYE"] >= 20
    assert core.stats["dropped"] == 0 and core.stats["not_ours"] == 0
    # sipp's UAS answers a BYE it does not expect, so the UAC's success alone proves little:
    # check what the worker itself received for every call.
    seen = trace_requests(trace)
    assert set(seen) == set(pick.asked)
    assert all(m["INVITE"] >= 1 and m["ACK"] >= 1 and m["BYE"] >= 1 for m in seen.values()), seen
    port = front.bind[1]
    expected = [f"<sip:127.0.0.1:{port};lr>"] + ([f"<sip:127.0.0.2:{port};lr>"] if internal else [])
    text = trace.read_text(errors="replace")
    our_vias = re.findall(r"^Via: SIP/2\.0/UDP ([0-9.:]+);branch=z9hG4bK-vcf-", text, re.MULTILINE)
    assert len(our_vias) >= 60 and set(our_vias) == {f"127.0.0.1:{port}"}  # the internal address
    invites = [b for b in text.split("UDP message received")[1:] if re.search(r"^INVITE ", b, re.MULTILINE)]
    assert len(invites) >= 20
    assert all(re.findall(r"^Record-Route: (\S+)", b, re.MULTILINE) == expected for b in invites)


@needs_sipp
async def test_sipp_calls_spread_over_two_workers_and_in_dialog_requests_follow(tmp_path: Path) -> None:
    async with background_uas(tmp_path) as (uas1, trace1), background_uas(tmp_path) as (uas2, trace2):
        pick = Picker(uas1, uas2)
        async with running_front([uas1, uas2], pick) as (front, core):
            code, output = await run_uac(front.address, tmp_path)
            assert code == 0, output
        await asyncio.sleep(0.3)  # let the UAS write its trace before it is stopped
    placed = {call_id: (uas1, uas2)[n % 2] for n, call_id in enumerate(pick.asked)}
    assert len(placed) == 20
    # Where the front sent each call's INVITE, ACK and BYE: always the worker its INVITE went to.
    for method, call_id, to in core.sent:
        if method in ("INVITE", "ACK", "BYE"):
            assert to == placed[call_id], (method, call_id)
    # What each sipp worker actually received, from its own trace.
    for worker, trace in ((uas1, trace1), (uas2, trace2)):
        seen = trace_requests(trace)
        mine = {c for c, w in placed.items() if w == worker}
        assert len(mine) == 10 and set(seen) == mine
        assert all(methods["INVITE"] >= 1 and methods["ACK"] >= 1 and methods["BYE"] >= 1 for methods in seen.values())
