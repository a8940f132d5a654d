"""The Asterisk carrier against the fake ARI server over real sockets (HTTP, events WebSocket, RTP),
with a test host standing in for the manager: call flows, audio both ways, DTMF, end reasons,
auth failure, events WebSocket reconnects."""

from __future__ import annotations

import asyncio
import socket
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from bridge.calls import CallState, Direction, EventType
from carriers.asterisk.carrier import AsteriskCarrier
from carriers.asterisk.protocol import DialError, dial_endpoint, end_reason, rtp_peer
from carriers.asterisk.settings import AsteriskSettings
from carriers.base import CarrierError, OutboundRequest
from tests.fakes.ari_server import FakeAsterisk
from tests.fakes.audio import fake_speech
from tests.harness import wait_for
from tests.peers.audio import pcm16, windowed_alignment
from tests.peers.host import TestHost

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


@pytest.fixture
async def fake() -> AsyncIterator[FakeAsterisk]:
    async with FakeAsterisk() as server:
        yield server


@asynccontextmanager
async def running(fake: FakeAsterisk, policy: str = "answer", **overrides: Any) -> AsyncIterator[tuple[TestHost, AsteriskCarrier]]:
    settings = AsteriskSettings(**fake.config(rtpPortStart=43000, rtpPortRange=200, **overrides))
    host = TestHost(policy=policy)
    carrier = AsteriskCarrier(settings)
    host.carrier = carrier
    await carrier.start(host)
    try:
        yield host, carrier
    finally:
        await carrier.close()


def _outbound(to: str) -> OutboundRequest:
    return OutboundRequest(to=to, from_number="+15550001234", message="hi", mode="notify", stream=True)


# ------------------------------------------------------------------ pure ARI facts


@pytest.mark.parametrize(
    ("cause", "answered", "local", "ring_timeout", "expected"),
    [
        (16, True, None, False, CallState.HANGUP_USER),
        (16, True, CallState.HANGUP_BOT, False, CallState.HANGUP_BOT),
        (16, True, CallState.TIMEOUT, False, CallState.TIMEOUT),
        (31, True, None, False, CallState.HANGUP_USER),
        (None, True, None, False, CallState.HANGUP_USER),
        (17, False, None, False, CallState.BUSY),
        (18, False, None, False, CallState.NO_ANSWER),
        (19, False, None, False, CallState.NO_ANSWER),
        (16, False, None, True, CallState.NO_ANSWER),
        (21, False, None, False, CallState.FAILED),
        (1, False, None, False, CallState.FAILED),
        (34, False, None, False, CallState.FAILED),
        (38, True, None, False, CallState.FAILED),
        (None, False, None, False, CallState.FAILED),
    ],
)
def test_hangup_cause_maps_to_end_reason(cause: int | None, answered: bool, local: CallState | None,
                                         ring_timeout: bool, expected: CallState) -> None:
    assert end_reason(cause, answered=answered, local=local, ring_timeout=ring_timeout) is expected


def test_dial_endpoint() -> None:
    assert dial_endpoint("+15550001234", "PJSIP/{to}@trunk") == "PJSIP/+15550001234@trunk"
    assert dial_endpoint("PJSIP/alice", "PJSIP/{to}@trunk") == "PJSIP/alice"
    assert dial_endpoint("sip:bob@10.0.0.2:5060", "PJSIP/{to}@trunk") == "PJSIP/sip:bob@10.0.0.2:5060"
    for bad in ("", "a b", "{to}", "1,2"):
        with pytest.raises(DialError):
            dial_endpoint(bad, "PJSIP/{to}@trunk")


def test_rtp_peer_from_channelvars() -> None:
    assert rtp_peer({"channelvars": {"UNICASTRTP_LOCAL_ADDRESS": "10.0.0.5", "UNICASTRTP_LOCAL_PORT": "16384"}}) == (
        "10.0.0.5", 16384)
    assert rtp_peer({"channelvars": {"UNICASTRTP_LOCAL_ADDRESS": "10.0.0.5", "UNICASTRTP_LOCAL_PORT": "x"}}) is None
    assert rtp_peer({}) is None


# ------------------------------------------------------------------ calls through the fake


def _wire(pcm8k: bytes, fmt: str) -> tuple[bytes, bytes, int]:
    """(what the bridge sends for this audio, the same audio as PCM16 at the format's rate, rate)."""
    if fmt == "slin16":
        up, _ = audioop.ratecv(pcm8k, 2, 1, 8000, 16000, None)
        return up, up, 16000
    return audioop.lin2ulaw(pcm8k, 2), pcm8k, 8000


@pytest.mark.parametrize("fmt", ["ulaw", "slin16"])
async def test_inbound_call_audio_both_ways_dtmf_and_caller_hangup(fake: FakeAsterisk, fmt: str) -> None:
    voice = fake_speech("the caller says hello to the bridge", 8000)
    async with running(fake, format=fmt) as (host, carrier):
        phone = fake.inbound_call(caller="+15550009999", exten="200", audio=voice)
        initiated = (await host.wait_for(EventType.INITIATED))[0]
        assert (initiated.direction, initiated.from_number, initiated.to_number) == (Direction.INBOUND, "+15550009999", "200")
        pid = initiated.provider_call_id
        assert pid == phone.id
        await host.wait_for(EventType.ACTIVE, pid)
        kinds = [e.type for e in host.events if e.provider_call_id == pid]
        assert kinds == [EventType.INITIATED, EventType.ANSWERED, EventType.ACTIVE]
        record = host.by_pid[pid]
        assert host.events[-1].call_id == record.callId

        assert fake.calls_to("POST", f"/ari/channels/{pid}/answer")
        assert fake.calls_to("POST", "/ari/bridges")[0]["type"] == "mixing"
        media = fake.calls_to("POST", "/ari/channels/externalMedia")[0]
        port = carrier.leg_stats(pid)["rtpPeer"]  # type: ignore[index]
        assert port is not None
        assert {k: media[k] for k in ("app", "format", "encapsulation", "transport", "direction")} == {
            "app": "voicecall", "format": fmt, "encapsulation": "rtp", "transport": "udp", "direction": "both"}
        assert media["external_host"].startswith("127.0.0.1:")
        added = fake.calls_to("POST", "/ari/bridges/")[0]["channel"].split(",")
        assert added == [pid, media["channelId"]]

        # the caller's audio reaches the call's pipeline
        bridge = host.bridges[record.callId]
        _, caller_pcm, rate = _wire(voice, fmt)
        frame = rate // 50 * (2 if fmt == "slin16" else 1)
        await wait_for(lambda: len(bridge.frames) * frame >= len(caller_pcm) // (1 if fmt == "slin16" else 2) + 10 * frame)
        received = bridge.pcm if fmt == "slin16" else audioop.ulaw2lin(bridge.pcm, 2)
        median, low = windowed_alignment(pcm16(caller_pcm), pcm16(received), rate)
        assert median > 0.95 and low > 0.9, f"caller audio mismatch r={median:.3f}/{low:.3f}"

        # the bridge's audio reaches the phone
        reply, reply_pcm, _ = _wire(fake_speech("and the bot answers it", 8000), fmt)
        await bridge.play(reply)
        await wait_for(lambda: len(phone.heard) >= len(reply_pcm))
        median, low = windowed_alignment(pcm16(reply_pcm), pcm16(phone.heard), rate)
        assert median > 0.95 and low > 0.9, f"the phone did not hear the bridge r={median:.3f}/{low:.3f}"
        rtp = phone.bridged_media
        assert rtp is not None and rtp.received[0].marker and rtp.received[0].payload_type == (118 if fmt == "slin16" else 0)

        # DTMF both ways
        fake.press(pid, "12#")
        dtmf = await host.wait_for(EventType.DTMF, pid, count=3)
        assert [e.digits for e in dtmf] == ["1", "2", "#"]
        await carrier.send_dtmf(record, "9*")
        assert phone.dtmf_heard == "9*"
        with pytest.raises(CarrierError, match="DTMF digits"):
            await carrier.send_dtmf(record, "9x")

        fake.hangup(pid)
        ended = (await host.wait_for(EventType.ENDED, pid))[0]
        assert ended.reason is CallState.HANGUP_USER and ended.call_id == record.callId
        assert host.detached == [record.callId]
        await wait_for(lambda: not fake.bridges and not fake.channels)  # bridge and ExternalMedia torn down
        stats = carrier.leg_stats(pid)
        assert stats and stats["packetsIn"] > 0 and stats["packetsOut"] > 0 and stats["malformed"] == 0
        assert stats["cause"] == 16


async def test_garbage_on_the_rtp_port_is_counted_not_fatal(fake: FakeAsterisk) -> None:
    async with running(fake) as (host, carrier):
        phone = fake.inbound_call(audio=fake_speech("abc", 8000))
        await host.wait_for(EventType.ACTIVE, phone.id)
        media = fake.calls_to("POST", "/ari/channels/externalMedia")[0]
        ours = media["external_host"].rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for junk in (b"", b"\x00" * 5, b"\xff" * 40, bytes([0x80, 0]) + bytes(10) + b"\x01"):
                sock.sendto(junk, (ours[0], int(ours[1])))
        await wait_for(lambda: carrier.leg_stats(phone.id)["foreign"] + carrier.leg_stats(phone.id)["malformed"] >= 3)  # type: ignore[index]
        frames = len(host.bridges[host.by_pid[phone.id].callId].frames)
        await wait_for(lambda: len(host.bridges[host.by_pid[phone.id].callId].frames) > frames + 5)  # audio still flows


async def test_hangup_during_media_setup_leaves_nothing_behind(fake: FakeAsterisk) -> None:
    fake.media_delay_s = 0.3
    async with running(fake) as (host, carrier):
        phone = fake.inbound_call()
        await wait_for(lambda: bool(fake.calls_to("POST", "/ari/channels/externalMedia")))
        fake.hangup(phone.id)
        ended = (await host.wait_for(EventType.ENDED, phone.id))[0]
        assert ended.reason is CallState.HANGUP_USER
        await asyncio.sleep(fake.media_delay_s)  # the ExternalMedia channel is created after the hang-up
        await wait_for(lambda: not fake.channels and not fake.bridges)  # and deleted then
        assert not host.of_type(EventType.ANSWERED) and not host.bridges
        assert not carrier._ports  # the RTP port went back


async def test_inbound_reject_deletes_with_cause_21(fake: FakeAsterisk) -> None:
    async with running(fake, policy="reject") as (host, _carrier):
        phone = fake.inbound_call()
        ended = (await host.wait_for(EventType.ENDED, phone.id))[0]
        assert ended.reason is CallState.HANGUP_BOT
        assert fake.calls_to("DELETE", f"/ari/channels/{phone.id}") == [{"reason_code": "21"}]
        assert not fake.calls_to("POST", "/ari/bridges") and not fake.calls_to("POST", f"/ari/channels/{phone.id}/answer")


async def test_outbound_ring_answer_audio_and_bot_hangup(fake: FakeAsterisk) -> None:
    async with running(fake) as (host, carrier):
        record = host.outbound_record("+15550005678")
        pid = await carrier.initiate_call(record, _outbound("+15550005678"))
        channel = fake.channels[pid]
        assert channel.originate is not None
        assert {k: channel.originate[k] for k in ("endpoint", "app", "callerId", "timeout", "channelId")} == {
            "endpoint": "PJSIP/+15550005678@trunk", "app": "voicecall", "callerId": "+15550001234",
            "timeout": 30, "channelId": pid}
        fake.ring(pid)
        await host.wait_for(EventType.RINGING, pid)
        assert not host.of_type(EventType.ANSWERED)
        fake.answer(pid)
        answered = (await host.wait_for(EventType.ANSWERED, pid))[0]
        assert answered.call_id == record.callId
        await host.wait_for(EventType.ACTIVE, pid)
        message = fake_speech("your table is ready", 8000)
        await host.bridges[record.callId].play(audioop.lin2ulaw(message, 2))
        await wait_for(lambda: len(channel.heard) >= len(message))
        median, _ = windowed_alignment(pcm16(message), pcm16(channel.heard))
        assert median > 0.95
        await carrier.hangup_call(record, CallState.HANGUP_BOT)
        ended = (await host.wait_for(EventType.ENDED, pid))[0]
        assert ended.reason is CallState.HANGUP_BOT
        assert fake.calls_to("DELETE", f"/ari/channels/{pid}") == [{}]
        await wait_for(lambda: not fake.channels and not fake.bridges)
        await carrier.hangup_call(record, CallState.HANGUP_BOT)  # twice: nothing left, no error


@pytest.mark.parametrize(("outcome", "reason"), [("busy", CallState.BUSY), ("no_answer", CallState.NO_ANSWER)])
async def test_outbound_busy_and_no_answer(fake: FakeAsterisk, outcome: str, reason: CallState) -> None:
    async with running(fake) as (host, carrier):
        record = host.outbound_record("+15550000002")
        pid = await carrier.initiate_call(record, _outbound("+15550000002"))
        fake.ring(pid)
        await host.wait_for(EventType.RINGING, pid)
        getattr(fake, outcome)(pid)
        ended = (await host.wait_for(EventType.ENDED, pid))[0]
        assert ended.reason is reason
        assert not host.of_type(EventType.ANSWERED) and not fake.calls_to("POST", "/ari/bridges")


async def test_our_ring_timeout_hangs_up_with_no_answer(fake: FakeAsterisk) -> None:
    async with running(fake, ringTimeoutSec=1) as (host, carrier):
        record = host.outbound_record("+15550000003")
        pid = await carrier.initiate_call(record, _outbound("+15550000003"))
        fake.ring(pid)
        ended = (await host.wait_for(EventType.ENDED, pid, timeout=5))[0]
        assert ended.reason is CallState.NO_ANSWER
        assert fake.calls_to("DELETE", f"/ari/channels/{pid}") == [{"reason_code": "19"}]


async def test_originate_is_sent_once_and_idempotent_requests_are_retried(fake: FakeAsterisk) -> None:
    async with running(fake) as (host, carrier):
        record = host.outbound_record("x")
        with pytest.raises(CarrierError, match="asterisk: not a number"):
            await carrier.initiate_call(record, _outbound("a b"))
        fake.fail_next = [503]
        with pytest.raises(CarrierError, match="call to PJSIP/\\+15550005678@trunk failed: .*HTTP 503"):
            await carrier.initiate_call(record, _outbound("+15550005678"))
        assert fake.failed == [("POST", "/ari/channels")]  # a retry could dial twice
        assert not fake.channels and not carrier.describe()["activeCalls"]
        phone = fake.inbound_call()
        await host.wait_for(EventType.ACTIVE, phone.id)
        fake.fail_next = [500]
        with pytest.raises(CarrierError, match="HTTP 500"):
            await carrier.send_dtmf(host.by_pid[phone.id], "1")  # POST: not retried
        assert phone.dtmf_heard == "" and len(fake.failed) == 2
        fake.fail_next = [503, 503]
        status = await carrier.get_call_status(host.by_pid[phone.id])  # GET: retried
        assert status is not None and not status.terminal and len(fake.failed) == 4


async def test_get_call_status_works_before_start_and_maps_404(fake: FakeAsterisk) -> None:
    carrier = AsteriskCarrier(AsteriskSettings(**fake.config()))
    host = TestHost()
    phone = fake.inbound_call()
    record = host.outbound_record("x")
    record.providerCallId = phone.id
    try:
        status = await carrier.get_call_status(record)
        assert status is not None and not status.terminal
        record.providerCallId = "no-such-channel"
        status = await carrier.get_call_status(record)
        assert status is not None and status.terminal
    finally:
        await carrier.close()


async def test_wrong_credentials_fail_start_clearly(fake: FakeAsterisk) -> None:
    carrier = AsteriskCarrier(AsteriskSettings(**{**fake.config(), "password": "wrong-password-123"}))
    with pytest.raises(CarrierError) as info:
        await carrier.start(TestHost())
    message = str(info.value)
    assert "HTTP 401" in message and "asterisk.password" in message and "voicecall" in message
    assert "wrong-password-123" not in message and fake.password not in message
    assert fake.unauthorized >= 1 and fake.ws_connects == 0


async def test_unreachable_ari_fails_start_clearly() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    carrier = AsteriskCarrier(AsteriskSettings(url=f"http://127.0.0.1:{port}", username="u", password="p"))
    with pytest.raises(CarrierError, match=f"cannot use ARI at http://127.0.0.1:{port}"):
        await carrier.start(TestHost())


async def test_events_socket_drop_reconnects_and_keeps_the_call(fake: FakeAsterisk) -> None:
    async with running(fake) as (host, _carrier):
        first = fake.inbound_call(audio=fake_speech("first", 8000))
        second = fake.inbound_call(audio=fake_speech("second", 8000))
        await host.wait_for(EventType.ACTIVE, first.id)
        await host.wait_for(EventType.ACTIVE, second.id)
        fake.events_down = True
        await fake.drop_events()
        await asyncio.sleep(0.3)
        fake.hangup(second.id)  # while nobody listens: the ChannelDestroyed is lost
        fake.events_down = False
        await wait_for(lambda: fake.ws_connects == 2, timeout=15)
        ended = (await host.wait_for(EventType.ENDED, second.id))[0]  # found by the check after reconnecting
        assert ended.reason is CallState.HANGUP_USER
        assert not host.of_type(EventType.ENDED, first.id)
        bridge = host.bridges[host.by_pid[first.id].callId]
        frames = len(bridge.frames)
        await wait_for(lambda: len(bridge.frames) > frames + 10)  # media never depended on the socket
        fake.press(first.id, "5")
        assert (await host.wait_for(EventType.DTMF, first.id))[0].digits == "5"
        fake.hangup(first.id)
        assert (await host.wait_for(EventType.ENDED, first.id))[0].reason is CallState.HANGUP_USER
