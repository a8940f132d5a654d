"""Telnyx: signature verification (vector + over the real server), webhook parsing, the stream
codec, and call-control edge cases against the fake."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.calls import CallRecord, CallState, Direction, EventType
from bridge.config import build_settings
from carriers.base import (
    CallGone,
    CarrierError,
    StreamDtmf,
    StreamIgnored,
    StreamMark,
    StreamMedia,
    StreamProtocolError,
    StreamStart,
    StreamStop,
    WebhookRequest,
)
from carriers.signatures import telnyx_replay_key
from carriers.telnyx.carrier import TelnyxCarrier
from carriers.telnyx.protocol import (
    TelnyxStreamCodec,
    choose_codec,
    decode_state,
    encode_state,
    end_reason,
    is_already_ended,
    split_text,
)
from media.clock import FakeClock
from media.formats import ALAW_8K, ULAW_8K
from tests.fakes.telnyx_server import (
    FakeCall,
    FakeMediaStream,
    FakeTelnyx,
    g711_decode,
    g711_encode,
)
from tests.harness import rpc_client, run_bridge, wait_for

# carriers.md 2.2: the self-made deterministic vector (RFC 8032 test-1 key)
VECTOR_KEY = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
VECTOR_TS = "1700000000"
VECTOR_BODY = (b'{"data":{"event_type":"call.initiated","id":"0ccc7b54-4df3-4bca-a65a-3da1ecc777f0",'
               b'"payload":{"call_control_id":"v3:abc"},"record_type":"event"}}')
VECTOR_SIG = "s27Ouq2Yg5YFgFiP0BVtQJ8N5CXTGi4zCJ0d3TmPSo9PFdeSoNi5SDLaubcVU2iEVWt1We3UobtJDC9P+N5fCA=="


class Host:
    """The slice of CarrierHost the parser and REST paths use."""

    def __init__(self, settings: Any, now: float = 1_700_000_000.0) -> None:
        self.settings = settings
        self.clock = FakeClock(now)
        self.calls: dict[str, CallRecord] = {}

    def webhook_url(self, **query: str) -> str:
        return "https://voice.example.com/voice/webhook?" + "&".join(f"{k}={v}" for k, v in query.items())

    def stream_url(self) -> str:
        return "wss://voice.example.com/voice/stream"

    def stream_token(self, call_id: str) -> str:
        return f"token-{call_id}"

    def emit(self, event: Any) -> None: ...

    def get_call(self, call_id: str) -> CallRecord | None:
        return self.calls.get(call_id)

    def find_call(self, call_id: str | None = None, provider_call_id: str | None = None) -> CallRecord | None:
        if call_id in self.calls:
            return self.calls[call_id]
        return next((c for c in self.calls.values() if provider_call_id and c.providerCallId == provider_call_id), None)


def settings(**telnyx: Any) -> Any:
    return build_settings({"provider": "telnyx", "fromNumber": "+15550001234",
                           "streaming": {"enabled": True, "provider": "none"},
                           "telnyx": {"apiKey": "KEY", "connectionId": "conn", "publicKey": VECTOR_KEY, **telnyx}}, {})


async def carrier(now: float = 1_700_000_000.0, **telnyx: Any) -> tuple[TelnyxCarrier, Host]:
    s = settings(**telnyx)
    c = TelnyxCarrier(s)
    host = Host(s, now)
    await c.start(host)  # type: ignore[arg-type]
    return c, host


def hook(body: bytes | dict[str, Any], *, query: list[tuple[str, str]] | None = None,
         headers: dict[str, str] | None = None) -> WebhookRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return WebhookRequest("POST", "/voice/webhook", "https://voice.example.com/voice/webhook",
                          headers or {}, raw, query=query or [])


def event(event_type: str, event_id: str | None = None, **payload: Any) -> dict[str, Any]:
    return {"data": {"record_type": "event", "event_type": event_type, "id": event_id or str(uuid.uuid4()),
                     "payload": {"call_control_id": "v3:abc", **payload}}, "meta": {"attempt": 1}}


def record(call_id: str, direction: Direction, **metadata: Any) -> CallRecord:
    return CallRecord(call_id, "telnyx", direction, CallState.ANSWERED, "+1555", "+1666", 0.0,
                      providerCallId="v3:abc", metadata=dict(metadata))


# ------------------------------------------------------------------ signatures


async def test_carriers_md_vector_verifies_within_300s_and_gives_the_replay_key() -> None:
    c, host = await carrier(now=1_700_000_000 + 300)
    headers = {"telnyx-signature-ed25519": VECTOR_SIG, "telnyx-timestamp": VECTOR_TS}
    verdict = c.verify_webhook(hook(VECTOR_BODY, headers=headers))
    assert verdict.ok and verdict.replay_key == telnyx_replay_key(VECTOR_TS, VECTOR_SIG, VECTOR_BODY)
    host.clock = FakeClock(1_700_000_000 + 301)
    assert c.verify_webhook(hook(VECTOR_BODY, headers=headers)).reason == "stale timestamp"
    host.clock = FakeClock(1_700_000_000 - 301)
    assert c.verify_webhook(hook(VECTOR_BODY, headers=headers)).reason == "future timestamp"
    host.clock = FakeClock(1_700_000_000)
    assert c.verify_webhook(hook(VECTOR_BODY + b" ", headers=headers)).reason == "bad signature"
    # the same signature in base64url is the same delivery
    url_sig = VECTOR_SIG.replace("+", "-").replace("/", "_").rstrip("=")
    assert c.verify_webhook(hook(VECTOR_BODY, headers={**headers, "telnyx-signature-ed25519": url_sig})).ok
    await c.close()


def test_bad_public_key_is_a_clear_error() -> None:
    from bridge.config import ConfigError

    with pytest.raises((CarrierError, ConfigError), match="telnyx.publicKey"):  # config validation names it first
        TelnyxCarrier(settings(publicKey="not-a-key"))


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelnyx]:
    async with FakeTelnyx() as server:
        yield server


def bridge_config(fake: FakeTelnyx, **extra: Any) -> dict[str, Any]:
    return {"provider": "telnyx", "fromNumber": "+15550001234", "inboundPolicy": "open",
            "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
            "responseModel": "offline", "telnyx": fake.config(), **extra}


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_webhook_gate_signature_timestamps_replays(tmp_path: Path, fake: FakeTelnyx) -> None:
    async with run_bridge(bridge_config(fake), tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/voice/webhook"
        fake.connection_webhook_url = url
        call = FakeCall(fake, "incoming", "+15550009999", "+15550001234", url)
        fake.calls[call.ccid] = call
        body = json.dumps({"data": call.data("call.initiated", direction="incoming", state="parked"),
                           "meta": {"attempt": 1}}).encode()
        now = str(int(time.time()))

        def signed(ts: str, data: bytes = body) -> dict[str, str]:
            return {"Content-Type": "application/json", "telnyx-timestamp": ts,
                    "telnyx-signature-ed25519": fake.sign(data, ts)}

        assert await post(url, body, {"Content-Type": "application/json"}) == (401, "Missing signature")
        other = signed(now, b"{}")
        assert (await post(url, body, other))[0] == 401, "signature of another body"
        assert (await post(url, body, signed(str(int(time.time()) - 400))))[0] == 401, "stale"
        assert (await post(url, body, signed(str(int(time.time()) + 400))))[0] == 401, "from the future"
        assert (await post(url, b"not json", signed(now, b"not json")))[0] == 400
        assert runtime.manager.calls == {}
        headers = signed(now)
        assert await post(url, body, headers) == (200, "OK")
        assert await post(url, body, headers) == (200, "OK"), "a replay is acknowledged"
        await wait_for(lambda: call.state == "answered", timeout=5)
        await runtime.manager.drain()  # whatever either delivery started has finished
        assert call.command_names() == ["answer"], "the replay had no side effect"
        assert len(runtime.manager.calls) == 1
        await call.hang_up()
        await wait_for(lambda: not runtime.manager.active_calls())


async def test_stream_with_bad_token_or_unknown_call_is_closed_1008(tmp_path: Path, fake: FakeTelnyx) -> None:
    async with run_bridge(bridge_config(fake), tmp_path) as runtime:
        stream_url = f"ws://127.0.0.1:{runtime.port}/voice/stream"
        call_id = (await rpc_client(runtime).call("voicecall.initiate",
                                                   {"to": "+15550005678", "message": "Hi", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        tx = next(iter(fake.calls.values()))
        intruder = FakeMediaStream(tx, stream_url, "wrong-token", "PCMU", "PCMU")
        await intruder.connect()
        await asyncio.wait_for(intruder.closed.wait(), 5)
        assert intruder.close_code == 1008
        ghost = FakeCall(fake, "outgoing", "+1555", "+1666", "")
        stranger = FakeMediaStream(ghost, stream_url, call.metadata["streamToken"], "PCMU", "PCMU")
        await stranger.connect()
        await asyncio.wait_for(stranger.closed.wait(), 5)
        assert stranger.close_code == 1008
        assert runtime.manager.voice(call_id) is not None, "the real stream is untouched"
        await tx.hang_up()
        await wait_for(lambda: call.terminal)


# ------------------------------------------------------------------ webhook parsing


async def test_inbound_call_initiated_carries_direction_from_to() -> None:
    c, host = await carrier()
    body = event("call.initiated", "ev-1", direction="incoming", state="parked", to="+15550001234",
                 **{"from": "+15550009999"}, offered_codecs="PCMA,PCMU")
    (ev,) = c.parse_webhook(hook(body), host).events
    assert (ev.type, ev.direction, ev.from_number, ev.to_number) == (EventType.INITIATED, Direction.INBOUND,
                                                                      "+15550009999", "+15550001234")
    assert ev.provider_call_id == "v3:abc" and ev.call_id is None and ev.dedupe_key == "telnyx:ev-1"
    await c.close()


async def test_outbound_events_find_our_call_id_in_query_or_client_state() -> None:
    c, host = await carrier()
    (ev,) = c.parse_webhook(hook(event("call.answered"), query=[("callId", "c-1")]), host).events
    assert (ev.type, ev.call_id, ev.direction) == (EventType.ANSWERED, "c-1", None)
    (ev,) = c.parse_webhook(hook(event("call.bridged", client_state=encode_state("c-2", "speak-1"))), host).events
    assert (ev.type, ev.call_id) == (EventType.ACTIVE, "c-2")
    (ev,) = c.parse_webhook(hook(event("call.initiated", direction="outgoing"), query=[("callId", "c-1")]), host).events
    assert ev.direction is None, "an outgoing call.initiated never registers a new call"
    assert c.parse_webhook(hook(b"{not json"), host).reply.status == 400
    assert c.parse_webhook(hook({"data": {"event_type": "call.answered"}}), host).reply.status == 400
    assert c.parse_webhook(hook(event("call.playback.ended")), host).events == []
    await c.close()


@pytest.mark.parametrize(("cause", "source", "direction", "reason"), [
    ("normal_clearing", "unknown", Direction.OUTBOUND, CallState.COMPLETED),
    ("normal_clearing", "callee", Direction.OUTBOUND, CallState.HANGUP_USER),
    ("normal_clearing", "caller", Direction.OUTBOUND, CallState.HANGUP_BOT),
    ("normal_clearing", "caller", Direction.INBOUND, CallState.HANGUP_USER),
    ("originator_cancel", "unknown", Direction.OUTBOUND, CallState.HANGUP_BOT),
    ("originator_cancel", "caller", Direction.INBOUND, CallState.HANGUP_USER),
    ("user_busy", "callee", Direction.OUTBOUND, CallState.BUSY),
    ("call_rejected", "callee", Direction.OUTBOUND, CallState.BUSY),
    ("no_answer", "unknown", Direction.OUTBOUND, CallState.NO_ANSWER),
    ("timeout", "unknown", Direction.OUTBOUND, CallState.NO_ANSWER),
    ("time_limit", "unknown", Direction.OUTBOUND, CallState.TIMEOUT),
    ("not_found", "unknown", Direction.OUTBOUND, CallState.FAILED),
    ("normal_clearing", "callee", None, CallState.COMPLETED),
])
def test_hangup_cause_map(cause: str, source: str, direction: Direction | None, reason: CallState) -> None:
    assert end_reason(cause, source, direction) == reason


async def test_hangup_uses_the_call_direction_found_by_call_id_or_call_control_id() -> None:
    c, host = await carrier()
    host.calls["c-1"] = record("c-1", Direction.INBOUND)
    hangup = event("call.hangup", hangup_cause="normal_clearing", hangup_source="caller")
    by_call_id = c.parse_webhook(hook(hangup, query=[("callId", "c-1")]), host)
    by_ccid = c.parse_webhook(hook(hangup), host)  # an inbound call hung up before we answered it
    for result in (by_call_id, by_ccid):
        (ev,) = result.events
        assert (ev.type, ev.reason) == (EventType.ENDED, CallState.HANGUP_USER)
        assert result.effects == [CallGone(provider_call_id="v3:abc")]
    assert by_call_id.events[0].key == by_ccid.events[0].key == f"telnyx:{hangup['data']['id']}"
    await c.close()


async def test_transcription_becomes_speech_with_the_turn_token() -> None:
    c, host = await carrier()
    data = {"transcript": " two please ", "is_final": True, "confidence": 0.9, "transcription_track": "inbound"}
    (ev,) = c.parse_webhook(hook(event("call.transcription", client_state=encode_state("c-1", "listen:tok"),
                                       transcription_data=data)), host).events
    assert (ev.type, ev.call_id, ev.transcript, ev.is_final, ev.confidence, ev.turn_token) == (
        EventType.SPEECH, "c-1", "two please", True, 0.9, "tok")
    (ev,) = c.parse_webhook(hook(event("call.transcription", client_state=encode_state("c-1", "speak-2"),
                                       transcription_data={**data, "is_final": False})), host).events
    assert ev.turn_token is None and ev.is_final is False
    ours = {**data, "transcription_track": "outbound"}
    assert c.parse_webhook(hook(event("call.transcription", transcription_data=ours)), host).events == []
    await c.close()


@pytest.mark.parametrize(("event_type", "result", "verdict", "greeting_end"), [
    ("call.machine.detection.ended", "human", "human", None),
    ("call.machine.detection.ended", "machine", "machine", None),
    ("call.machine.detection.ended", "not_sure", "unknown", None),
    ("call.machine.premium.detection.ended", "human_residence", "human", None),
    ("call.machine.premium.detection.ended", "human_business", "human", None),
    ("call.machine.premium.detection.ended", "machine", "machine", None),
    ("call.machine.premium.detection.ended", "fax_detected", "machine", None),
    ("call.machine.premium.detection.ended", "silence", "unknown", None),
    ("call.machine.greeting.ended", "beep_detected", None, "beep"),
    ("call.machine.greeting.ended", "ended", None, "silence"),
    ("call.machine.greeting.ended", "not_sure", None, "other"),
    ("call.machine.premium.greeting.ended", "beep_detected", None, "beep"),
    ("call.machine.premium.greeting.ended", "no_beep_detected", None, "other"),
])
async def test_machine_webhooks_are_carrier_neutral_machine_events(event_type: str, result: str, verdict: str | None,
                                                                   greeting_end: str | None) -> None:
    """Each answering-machine webhook is one call.machine event (verdict or end of greeting) and no
    effect: what follows (a hang-up, a message) is the manager's, as for the local detector."""
    c, host = await carrier()
    parsed = c.parse_webhook(hook(event(event_type, "amd-1", result=result, call_control_id="v3:cc",
                                        client_state=encode_state("c-1"))), host)
    (ev,) = parsed.events
    assert (ev.type, ev.call_id, ev.provider_call_id, ev.key) == (EventType.MACHINE, "c-1", "v3:cc", "telnyx:amd-1")
    assert ev.machine is not None and (ev.machine.answered_by, ev.machine.greeting_end) == (verdict, greeting_end)
    assert ev.machine.cause.startswith("telnyx:") and ev.machine.cause.endswith(result)
    assert parsed.effects == []
    odd = c.parse_webhook(hook(event(event_type, "amd-2", result="banana", call_control_id="v3:cc")), host)
    assert odd.events == []
    await c.close()


@pytest.mark.parametrize(("mode", "override", "sent", "greeting_end"), [
    ("detect", None, "detect", False), ("hangup", None, "detect", False),
    ("leave-message", None, "greeting_end", True), ("leave-message", "premium", "premium", True),
    ("detect", "detect_beep", "detect_beep", True)])
async def test_native_amd_mode_by_machine_detection_mode(mode: str, override: str | None, sent: str,
                                                         greeting_end: bool) -> None:
    c, _ = await carrier(**({"answeringMachineDetection": override} if override else {}))
    native = c.native_amd(mode)
    assert native is not None and native.reports_greeting_end is greeting_end
    assert c._amd_mode(mode) == sent  # noqa: SLF001
    disabled, _ = await carrier(answeringMachineDetection="disabled")
    assert disabled.native_amd(mode) is None, "disabled: the local detector instead"
    await c.close()
    await disabled.close()


async def test_dtmf_webhook_counts_only_without_a_media_stream() -> None:
    c, host = await carrier()
    host.calls["c-1"] = record("c-1", Direction.OUTBOUND)
    (ev,) = c.parse_webhook(hook(event("call.dtmf.received", digit="7"), query=[("callId", "c-1")]), host).events
    assert (ev.type, ev.digits) == (EventType.DTMF, "7")
    host.calls["c-1"].metadata["mediaAttached"] = True
    assert c.parse_webhook(hook(event("call.dtmf.received", digit="7"), query=[("callId", "c-1")]), host).events == []
    await c.close()


# ------------------------------------------------------------------ media-stream codec


def test_codec_start_takes_token_from_connected_and_call_id_from_client_state() -> None:
    codec = TelnyxStreamCodec(lambda ccid: "PCMA")
    assert isinstance(codec.parse(json.dumps({"event": "connected", "version": "1.0.0",
                                              "x-telnyx-streaming-auth-token": "tok"})), StreamIgnored)
    start = codec.parse(json.dumps({
        "event": "start", "sequence_number": "1", "stream_id": "S-1",
        "start": {"call_control_id": "v3:abc", "client_state": encode_state("c-1"),
                  "custom_parameters": {"x": "1"},
                  "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}}))
    assert isinstance(start, StreamStart)
    assert (start.provider_call_id, start.stream_id, start.format, start.token, start.call_id, start.custom) == (
        "v3:abc", "S-1", ALAW_8K, "tok", "c-1", {"x": "1"})


def test_codec_frames() -> None:
    codec = TelnyxStreamCodec()
    with pytest.raises(StreamProtocolError, match="media before start"):
        codec.parse(json.dumps({"event": "media", "media": {"payload": ""}}))
    start = codec.parse(json.dumps({"event": "start", "start": {
        "call_control_id": "v3:abc", "custom_parameters": [{"name": "token", "value": "t2"}],
        "media_format": {"encoding": "PCMU", "sample_rate": 8000}}}))
    assert isinstance(start, StreamStart) and start.token == "t2" and start.format == ULAW_8K
    payload = bytes(range(160))
    media = codec.parse(json.dumps({"event": "media", "sequence_number": "9", "media": {
        "track": "inbound", "chunk": "7", "timestamp": "120", "payload": base64.b64encode(payload).decode()}}))
    assert media == StreamMedia(payload, 7, 120), "chunk orders media (sequence_number also counts dtmf/mark)"
    media = codec.parse(json.dumps({"event": "media", "sequence_number": "9", "media": {
        "payload": base64.b64encode(payload).decode()}}))
    assert isinstance(media, StreamMedia) and media.sequence == 9
    assert isinstance(codec.parse(json.dumps({"event": "media", "media": {"track": "outbound", "payload": ""}})),
                      StreamIgnored)
    assert codec.parse(json.dumps({"event": "dtmf", "dtmf": {"digit": "#"}})) == StreamDtmf("#")
    assert codec.parse(json.dumps({"event": "mark", "mark": {"name": "play-1"}})) == StreamMark("play-1")
    assert isinstance(codec.parse(json.dumps({"event": "stop", "stop": {}})), StreamStop)
    assert isinstance(codec.parse(json.dumps({"event": "error", "payload": {"code": 100002, "title": "x"}})),
                      StreamIgnored)
    for bad in ("nope", "[]", '{"event": "dtmf", "dtmf": {"digit": "x"}}',
                '{"event": "media", "media": {"payload": "***"}}', '{"event": "mark"}', "{}"):
        with pytest.raises(StreamProtocolError):
            codec.parse(bad)
    with pytest.raises(StreamProtocolError, match="unsupported media format"):
        TelnyxStreamCodec().parse(json.dumps({"event": "start", "start": {
            "call_control_id": "v3:abc", "media_format": {"encoding": "OPUS", "sample_rate": 48000}}}))
    assert json.loads(codec.encode_media(b"\xff\x00")) == {"event": "media", "media": {"payload": "/wA="}}
    assert json.loads(codec.encode_mark("m")) == {"event": "mark", "mark": {"name": "m"}}
    assert json.loads(codec.encode_clear()) == {"event": "clear"}


def test_codec_transcodes_playback_to_the_declared_codec() -> None:
    """Telnyx streams the call's own codec when it cannot transcode; playback must still be in
    the declared bidirectional codec, or the caller hears static."""
    codec = TelnyxStreamCodec(lambda ccid: "PCMA")
    start = codec.parse(json.dumps({"event": "start", "start": {
        "call_control_id": "v3:abc", "media_format": {"encoding": "PCMU", "sample_rate": 8000}}}))
    assert isinstance(start, StreamStart) and start.format == ULAW_8K
    pcm = b"".join(int(v).to_bytes(2, "little", signed=True) for v in (0, 1000, -1000, 8000) * 40)
    sent = base64.b64decode(json.loads(codec.encode_media(g711_encode(pcm, "PCMU")))["media"]["payload"])
    assert sent == g711_encode(g711_decode(g711_encode(pcm, "PCMU"), "PCMU"), "PCMA")


# ------------------------------------------------------------------ helpers and REST edges


def test_helpers() -> None:
    assert choose_codec(None, "PCMA, PCMU") == "PCMA"
    assert choose_codec(None, "G722,PCMU,PCMA") == "PCMU"
    assert choose_codec(None, "OPUS") == choose_codec(None, None) == "PCMU"
    assert choose_codec("PCMA", "PCMU") == "PCMA"
    assert decode_state(encode_state("abc", "listen:t")) == ("abc", "listen:t")
    for junk in (None, "", "***", base64.b64encode(b"\x00\x01").decode(), base64.b64encode(b" x").decode()):
        assert decode_state(junk) == (None, None)
    long = "word " * 1000
    pieces = split_text(long)
    assert all(len(p) <= 3000 for p in pieces) and " ".join(pieces) == long.strip()
    assert is_already_ended(422, {"errors": [{"code": "90018"}]}) and is_already_ended(404, {})
    assert not is_already_ended(422, {"errors": [{"code": "10015"}]})


async def test_commands_carry_unique_command_ids_and_ended_calls_hang_up_cleanly(fake: FakeTelnyx) -> None:
    c, host = await carrier(apiBaseUrl=fake.base_url, apiKey=fake.api_key)
    tx = FakeCall(fake, "outgoing", "+1555", "+1666", "")
    tx.state = "answered"
    fake.calls[tx.ccid] = tx
    call = record("c-1", Direction.OUTBOUND)
    call.providerCallId = tx.ccid
    await c.send_dtmf(call, "12#")
    await c.hangup_call(call, CallState.HANGUP_BOT)
    await wait_for(lambda: not tx.alive)
    await c.hangup_call(call, CallState.HANGUP_BOT)  # 422 90018: already ended is success
    ids = [body["command_id"] for _, _, body in fake.requests]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert tx.dtmf_sent == ["12#"]
    status = await c.get_call_status(call)
    assert status is not None and status.terminal
    with pytest.raises(CarrierError, match="HTTP 422"):
        await c.start_listening(call, "tok")
    call.providerCallId = "v3:unknown"
    await c.hangup_call(call, CallState.HANGUP_BOT)  # 404: unknown call counts as ended too
    bad, _ = await carrier(apiBaseUrl=fake.base_url, apiKey="wrong")
    with pytest.raises(CarrierError, match="401"):
        await bad.send_dtmf(record("c-2", Direction.OUTBOUND), "1")
    await bad.close()
    await c.close()
