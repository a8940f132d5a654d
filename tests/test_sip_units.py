"""SIP carrier pieces that need no peer: URI and end-reason mapping, settings, the jitter queue
between the asyncio side and pjsua2's media thread, and start-up failures."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import cast

import pytest
from pydantic import ValidationError

from bridge.calls import CallState
from carriers.base import CarrierError, CarrierHost
from carriers.sip.carrier import (
    JITTER_MAX_FRAMES,
    SipCarrier,
    SipMediaTransport,
    caller_id,
    dial_uri,
    outbound_end_reason,
)
from carriers.sip.settings import SipSettings
from media.formats import AudioEncoding, AudioFormat
from tests.peers.harness import skip_reason
from tests.peers.host import TestHost


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('"Alice" <sip:alice@127.0.0.1:5070>;tag=abc', "sip:alice@127.0.0.1"),
        ("<sip:+15551234567@trunk.example.com;user=phone>", "+15551234567"),
        ("sip:15551234567@trunk.example.com", "15551234567"),
        ("<sip:1234@pbx.local>", "1234"),
        ("<sip:12@pbx.local>", "sip:12@pbx.local"),
        ("sips:bob@example.com;transport=tls", "sips:bob@example.com"),
        ("<sip:example.com>", "sip:example.com"),
        ("<sip:bob;ext=1@10.0.0.1:5060>", "sip:bob@10.0.0.1"),
        ("sip:carol@[2001:db8::1]:5060;tag=1", "sip:carol@[2001:db8::1]"),
        ("Anonymous <sip:anonymous@anonymous.invalid>", "sip:anonymous@anonymous.invalid"),
        ("not a uri", "not a uri"),
    ],
)
def test_caller_id(header: str, expected: str) -> None:
    assert caller_id(header) == expected


def test_dial_uri() -> None:
    plain = SipSettings()
    assert dial_uri("sip:alice@127.0.0.1:5070", plain) == "sip:alice@127.0.0.1:5070"
    with pytest.raises(CarrierError, match="account"):
        dial_uri("+15551234567", plain)
    with pytest.raises(CarrierError, match="cannot dial"):
        dial_uri("alice", plain)
    trunk = SipSettings.model_validate(
        {"account": {"username": "bot", "password": "s3cret", "domain": "trunk.example.com"}, "transport": "tcp"}
    )
    assert dial_uri("+15551234567", trunk) == "sip:+15551234567@trunk.example.com;transport=tcp"
    assert dial_uri("sip:a@b;transport=udp", trunk) == "sip:a@b;transport=udp"


@pytest.mark.parametrize(
    ("status", "answered", "local", "ring_timeout", "reason"),
    [
        (200, True, False, False, CallState.HANGUP_USER),
        (200, True, True, False, CallState.HANGUP_BOT),
        (486, False, False, False, CallState.BUSY),
        (600, False, False, False, CallState.BUSY),
        (408, False, False, False, CallState.NO_ANSWER),
        (480, False, False, False, CallState.NO_ANSWER),
        (487, False, False, True, CallState.NO_ANSWER),
        (487, False, True, False, CallState.HANGUP_BOT),
        (404, False, False, False, CallState.FAILED),
        (503, False, False, False, CallState.FAILED),
        (603, False, False, False, CallState.FAILED),
    ],
)
def test_outbound_end_reason(status: int, answered: bool, local: bool, ring_timeout: bool, reason: CallState) -> None:
    assert outbound_end_reason(status, answered=answered, local=local, ring_timeout=ring_timeout) is reason


def test_settings_defaults_and_rules() -> None:
    s = SipSettings()
    assert (s.bindAddress, s.port, s.transport, s.clockRate, s.rejectCode) == ("127.0.0.1", 5062, "udp", 8000, 403)
    assert s.codecs == ["PCMU", "PCMA", "G722"]
    assert SipSettings(codecs=["g722", "pcmu", "PCMU"]).codecs == ["G722", "PCMU"]
    bad_sections = (
        {"codecs": ["opus"]},
        {"transport": "tls"},
        {"clockRate": 44100},
        {"unknownKey": 1},
        {"rtpPortStart": 65000, "rtpPortRange": 1000},
        {"account": {"username": "u", "domain": "d", "registrar": "pbx"}},
    )
    for bad in bad_sections:
        with pytest.raises(ValidationError):
            SipSettings.model_validate(bad)


def test_password_never_shows() -> None:
    s = SipSettings.model_validate({"account": {"username": "bot", "password": "hunter2", "domain": "d.example"}})
    assert "hunter2" not in repr(s) and "hunter2" not in s.model_dump_json()
    assert "hunter2" not in str(SipCarrier(s).describe())


def _transport() -> SipMediaTransport:
    return SipMediaTransport(AudioFormat(AudioEncoding.L16, 8000), asyncio.get_running_loop())


async def test_jitter_queue_prebuffers_and_clears() -> None:
    t = _transport()
    frame = b"\x01\x02" * 160
    assert t._pull() is None  # nothing queued: silence
    await t.send_media(frame)
    assert t._pull() is None  # one frame waits one tick for a second one
    assert t._pull() == frame  # ...then plays anyway
    assert t._pull() is None and t.underruns == 1
    for _ in range(3):
        await t.send_media(frame)
    assert t._pull() == frame  # two queued: plays at once
    await t.send_clear()
    assert t.queued_frames == 0 and t._pull() is None


async def test_jitter_queue_splits_odd_sizes_and_stays_bounded() -> None:
    t = _transport()
    await t.send_media(b"\x05" * 500)  # 1.5 frames: split, tail padded with silence
    assert t.queued_frames == 2
    assert t._pull() == b"\x05" * 320
    assert t._pull() == b"\x05" * 180 + b"\x00" * 140
    for _ in range(JITTER_MAX_FRAMES + 10):
        await t.send_media(b"\x00" * 320)
    assert t.queued_frames == JITTER_MAX_FRAMES
    assert t.frames_dropped == 10


async def test_received_frames_reach_the_bridge_on_the_loop() -> None:
    t = _transport()
    got: list[tuple[bytes, int]] = []

    class Bridge:
        def receive(self, payload: bytes) -> None:
            got.append((payload, threading.get_ident()))

    t.bridge = Bridge()  # type: ignore[assignment]
    def media_thread() -> None:
        for i in range(3):
            t._push(bytes([i]) * 320)

    worker = threading.Thread(target=media_thread)
    worker.start()
    worker.join()
    await asyncio.sleep(0)  # the loop runs what the thread queued with call_soon_threadsafe, in order
    assert [p[0][0] for p in got] == [0, 1, 2]
    assert {p[1] for p in got} == {threading.get_ident()}
    assert t.first_rx_at is not None and t.first_audio_at is not None  # frames 1 and 2 are not silence
    t.closed = True
    t._push(b"\x07" * 320)
    await asyncio.sleep(0)  # had it queued anything, it would have run now
    assert len(got) == 3


_pj_reason = skip_reason()


@pytest.mark.skipif(_pj_reason is not None, reason=_pj_reason or "")
async def test_start_fails_cleanly_when_the_port_is_taken() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        settings = SipSettings(port=port)
        carrier = SipCarrier(settings)
        host = TestHost(settings)
        host.carrier = carrier
        with pytest.raises(CarrierError, match="start failed"):
            await carrier.start(cast(CarrierHost, host))
        await carrier.close()
    assert not [t for t in threading.enumerate() if t.name == "voicecall-sip"]
    # The library was destroyed: a new carrier can start in the same process.
    ok = SipCarrier(SipSettings(port=port))
    await ok.start(cast(CarrierHost, host))
    await ok.close()


class _Agent:
    def __init__(self, capacity: int, alive: bool = True) -> None:
        self.capacity = capacity
        self.alive = alive
        self.sip_address = ("127.0.0.1", 40000 + capacity)


def test_pool_spreads_calls_counts_reservations_and_skips_dead_agents() -> None:
    from carriers.sip.pool import RESERVATION_S, UaPool

    a, b = _Agent(2), _Agent(2)
    pool = UaPool(agents=[a, b])
    # A burst of INVITEs: each reservation counts at once, so they alternate instead of piling up.
    picked = [pool.reserve(f"call-{i}", now=0.0) for i in range(4)]
    assert picked == [a, b, a, b]
    assert pool.reserve("call-5", now=0.0) is None  # every agent is full
    pool.bind("call-0", a)  # the worker reported the call: a reservation becomes a call
    assert pool.load(a, now=0.0) == 2 and pool.peak_total == 1
    # Reservations that never turn into calls expire; calls do not.
    assert pool.load(a, now=RESERVATION_S + 1) == 1 and pool.load(b, now=RESERVATION_S + 1) == 0
    pool.release("call-0")
    assert pool.load(a, now=RESERVATION_S + 1) == 0
    b.alive = False  # a dead worker gets nothing, even when it is the least loaded
    pool.bind("x", a)
    assert pool.pick(now=RESERVATION_S + 1) is a
    pool.bind("y", a)
    assert pool.pick(now=RESERVATION_S + 1) is None
    assert pool.peaks[id(a)] == 2
