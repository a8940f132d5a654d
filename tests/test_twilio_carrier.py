"""Twilio carrier, sans-I/O: the Media Streams codec, TwiML, webhook verification and parsing."""

from __future__ import annotations

import base64
import hashlib
import json
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from bridge.calls import CallEvent, CallRecord, CallState, Direction, EventType
from bridge.config import build_settings
from carriers.base import (
    SpeechHeard,
    StreamDtmf,
    StreamIgnored,
    StreamMark,
    StreamMedia,
    StreamProtocolError,
    StreamStart,
    StreamStop,
    WebhookRequest,
)
from carriers.twilio.carrier import TwilioCarrier
from carriers.twilio.protocol import TwilioStreamCodec, stream_verb, twiml
from media.clock import RealClock
from media.formats import ULAW_8K

TOKEN = "12345"
PUBLIC = "https://voice.example.com/voice/webhook"


class StubHost:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.clock = RealClock()
        self.calls: dict[str, CallRecord] = {}
        self.events: list[CallEvent] = []

    def webhook_url(self, **query: str) -> str:
        return f"{PUBLIC}?{urlencode(query)}" if query else PUBLIC

    def stream_url(self) -> str:
        return "wss://voice.example.com/voice/stream"

    def stream_token(self, call_id: str) -> str:
        return f"tok-{call_id}"

    def emit(self, event: CallEvent) -> None:
        self.events.append(event)

    def attach_media(self, call_id: str, transport: Any) -> None:
        return None

    def detach_media(self, call_id: str) -> None:
        return None

    def get_call(self, call_id: str) -> CallRecord | None:
        return self.calls.get(call_id)

    def find_call(self, call_id: str | None = None, provider_call_id: str | None = None) -> CallRecord | None:
        if call_id in self.calls:
            return self.calls[call_id]
        return next((c for c in self.calls.values() if provider_call_id and c.providerCallId == provider_call_id), None)


def make_carrier(**overrides: Any) -> tuple[TwilioCarrier, StubHost]:
    raw = {"provider": "twilio", "fromNumber": "+15550001234", "publicUrl": PUBLIC,
           "twilio": {"accountSid": "AC" + "0" * 32, "authToken": TOKEN}, **overrides}
    settings = build_settings(raw, {})
    carrier = TwilioCarrier(settings)
    host = StubHost(settings)
    carrier.host = host
    return carrier, host


def record(call_id: str = "call-1", **kw: Any) -> CallRecord:
    fields: dict[str, Any] = {"callId": call_id, "provider": "twilio", "direction": Direction.OUTBOUND,
                              "state": CallState.ANSWERED, "from_": "+15550001234", "to": "+15550005678",
                              "startedAt": 0.0, "providerCallId": "CA" + "1" * 32, "answeredAt": 1.0,
                              "metadata": {"mode": "conversation"}}
    fields.update(kw)
    return CallRecord(**fields)


def webhook(url: str, form: dict[str, str], signature: str = "", body: bytes | None = None) -> WebhookRequest:
    parts = urlsplit(url)
    return WebhookRequest(method="POST", path=parts.path, public_url=url,
                          headers={"X-Twilio-Signature": signature} if signature else {},
                          body=body if body is not None else urlencode(form).encode(),
                          query=parse_qsl(parts.query, keep_blank_values=True), form=list(form.items()))


# ====================================================================== codec

START = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ123",
         "start": {"accountSid": "AC1", "streamSid": "MZ123", "callSid": "CA9", "tracks": ["inbound"],
                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                   "customParameters": {"token": "secret-token", "callId": "call-1", "FirstName": "Jane"}}}


def test_codec_start_takes_token_and_call_id_from_custom_parameters() -> None:
    codec = TwilioStreamCodec()
    assert codec.parse(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})) == \
        StreamIgnored("connected")
    start = codec.parse(json.dumps(START))
    assert isinstance(start, StreamStart)
    assert (start.provider_call_id, start.stream_id, start.token, start.call_id) == \
        ("CA9", "MZ123", "secret-token", "call-1")
    assert start.format == ULAW_8K and start.custom["FirstName"] == "Jane"


def test_codec_parses_media_dtmf_mark_stop() -> None:
    codec = TwilioStreamCodec()
    codec.parse(json.dumps(START))
    payload = bytes(range(160))
    media = codec.parse(json.dumps({"event": "media", "sequenceNumber": "4", "streamSid": "MZ123", "media": {
        "track": "inbound", "chunk": "2", "timestamp": "5", "payload": base64.b64encode(payload).decode()}}))
    # the media `chunk` counts media frames only; sequenceNumber also counts dtmf/mark messages
    assert media == StreamMedia(payload, 2, 5)
    assert codec.parse('{"event":"dtmf","streamSid":"MZ123","sequenceNumber":"5",'
                       '"dtmf":{"track":"inbound_track","digit":"1"}}') == StreamDtmf("1")
    assert codec.parse('{"event":"mark","sequenceNumber":"4","streamSid":"MZ123","mark":{"name":"my label"}}') == \
        StreamMark("my label")
    assert isinstance(codec.parse('{"event":"stop","sequenceNumber":"5","stop":{"accountSid":"AC1","callSid":"CA9"},'
                                  '"streamSid":"MZ123"}'), StreamStop)


@pytest.mark.parametrize("frame", [
    "not json",
    "[1,2]",
    '{"no":"event"}',
    '{"event":"start","start":{"streamSid":"MZ1"}}',
    '{"event":"start","start":{"callSid":"CA1","streamSid":"MZ1","mediaFormat":{"encoding":"audio/x-l16","sampleRate":16000}}}',
    '{"event":"media","media":{"payload":"***"}}',
    '{"event":"media","media":{}}',
    '{"event":"mark","mark":{}}',
    '{"event":"dtmf"}',
])
def test_codec_rejects_bad_frames(frame: str) -> None:
    with pytest.raises(StreamProtocolError):
        TwilioStreamCodec().parse(frame)


def test_codec_encodes_exact_twilio_frames() -> None:
    codec = TwilioStreamCodec()
    codec.parse(json.dumps(START))
    payload = b"\xff" * 160
    assert json.loads(codec.encode_media(payload)) == {"event": "media", "streamSid": "MZ123",
                                                       "media": {"payload": base64.b64encode(payload).decode()}}
    assert base64.b64encode(payload).decode().endswith("/////w==") and len(base64.b64encode(payload)) == 216
    assert json.loads(codec.encode_mark('say "hi"')) == {"event": "mark", "streamSid": "MZ123",
                                                         "mark": {"name": 'say "hi"'}}
    assert json.loads(codec.encode_clear()) == {"event": "clear", "streamSid": "MZ123"}


# ====================================================================== TwiML


def test_stream_twiml_carries_the_token_as_a_parameter_not_in_the_url() -> None:
    doc = ET.fromstring(twiml(stream_verb("wss://h/voice/stream", {"token": "a&b\"c", "callId": "c1"})))
    stream = doc.find("Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://h/voice/stream"
    assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")} == {"token": 'a&b"c', "callId": "c1"}


async def test_answer_twiml_with_streaming_is_connect_stream() -> None:
    carrier, host = make_carrier(streaming={"enabled": True})
    call = record()
    host.calls[call.callId] = call
    result = carrier.parse_webhook(webhook(f"{PUBLIC}?callId={call.callId}",
                                           {"CallSid": call.providerCallId, "CallStatus": "in-progress",
                                            "Direction": "outbound-api"}), host)
    assert result.respond is not None
    reply = result.respond(call)
    stream = ET.fromstring(reply.body).find("Connect/Stream")
    assert stream is not None and "?" not in stream.get("url", "")
    assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")} == \
        {"token": f"tok-{call.callId}", "callId": call.callId}


async def test_inbound_rejected_by_policy_gets_reject_and_status_callbacks_get_empty_response() -> None:
    carrier, host = make_carrier()
    inbound = carrier.parse_webhook(webhook(PUBLIC, {"CallSid": "CA7", "CallStatus": "ringing", "Direction": "inbound",
                                                     "From": "+15550000001", "To": "+15550001234"}), host)
    assert [e.type for e in inbound.events] == [EventType.INITIATED, EventType.ANSWERED]
    first = inbound.events[0]
    assert (first.direction, first.from_number, first.to_number, first.provider_call_id) == \
        (Direction.INBOUND, "+15550000001", "+15550001234", "CA7")
    assert inbound.respond is not None
    assert ET.fromstring(inbound.respond(None).body).find("Reject") is not None
    status = carrier.parse_webhook(webhook(f"{PUBLIC}?callId=c1&type=status", {"CallSid": "CA7", "CallStatus": "ringing"}), host)
    assert status.respond is None and status.reply.content_type == "text/xml"
    assert list(ET.fromstring(status.reply.body)) == []


async def test_say_text_is_xml_escaped() -> None:
    carrier, host = make_carrier()
    call = record(metadata={"mode": "conversation", "initialMessage": "Tom & <Jerry>"}, direction=Direction.INBOUND)
    host.calls[call.callId] = call
    reply = carrier._answer_reply(call, inbound=True)  # noqa: SLF001
    assert ET.fromstring(reply.body).find("Say").text == "Tom & <Jerry>"  # type: ignore[union-attr]


# ====================================================================== verification


OFFICIAL_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
OFFICIAL_FORM = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
                 "From": "+14158675309", "To": "+18005551212"}


def test_verify_official_vector_and_port_variants() -> None:
    carrier, host = make_carrier()
    verdict = carrier.verify_webhook(webhook(OFFICIAL_URL, OFFICIAL_FORM, "RSOYDt4T1cUTdK1PDd93/VVr8B8="))
    assert verdict.ok and verdict.replay_key
    # Twilio signed the URL with :443; we reconstructed it without
    assert carrier.verify_webhook(webhook(OFFICIAL_URL, OFFICIAL_FORM, "kvajT1Ptam85bY51eRf/AJRuM3w=")).ok
    tampered = {**OFFICIAL_FORM, "Digits": "9999"}
    assert not carrier.verify_webhook(webhook(OFFICIAL_URL, tampered, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")).ok
    assert not carrier.verify_webhook(webhook(OFFICIAL_URL, OFFICIAL_FORM, "")).ok


def test_verify_json_body_sha256_form() -> None:
    carrier, host = make_carrier()
    body = b'{"property": "value", "boolean": true}'
    digest = hashlib.sha256(body).hexdigest()
    url = f"{OFFICIAL_URL}&bodySHA256={digest}"
    request = webhook(url, {}, "a9nBmqA0ju/hNViExpshrM61xv4=", body=body)
    assert carrier.verify_webhook(request).ok
    assert not carrier.verify_webhook(webhook(url, {}, "a9nBmqA0ju/hNViExpshrM61xv4=", body=body + b" ")).ok


def test_replay_key_is_the_same_for_the_same_delivery() -> None:
    carrier, host = make_carrier()
    a = carrier.verify_webhook(webhook(OFFICIAL_URL, OFFICIAL_FORM, "RSOYDt4T1cUTdK1PDd93/VVr8B8="))
    b = carrier.verify_webhook(webhook(OFFICIAL_URL, dict(reversed(OFFICIAL_FORM.items())),
                                       "RSOYDt4T1cUTdK1PDd93/VVr8B8="))
    assert a.replay_key == b.replay_key


# ====================================================================== parsing


@pytest.mark.parametrize(("status", "kind", "reason"), [
    ("queued", EventType.INITIATED, None),
    ("initiated", EventType.INITIATED, None),
    ("ringing", EventType.RINGING, None),
    ("in-progress", EventType.ANSWERED, None),
    ("completed", EventType.ENDED, CallState.COMPLETED),
    ("busy", EventType.ENDED, CallState.BUSY),
    ("no-answer", EventType.ENDED, CallState.NO_ANSWER),
    ("failed", EventType.ENDED, CallState.FAILED),
    ("canceled", EventType.ENDED, CallState.HANGUP_BOT),
])
def test_status_callbacks_become_events(status: str, kind: EventType, reason: CallState | None) -> None:
    carrier, host = make_carrier()
    result = carrier.parse_webhook(webhook(f"{PUBLIC}?callId=c1&type=status",
                                           {"CallSid": "CA1", "CallStatus": status, "Direction": "outbound-api"}), host)
    assert [(e.type, e.reason, e.call_id, e.provider_call_id) for e in result.events] == [(kind, reason, "c1", "CA1")]


@pytest.mark.parametrize(("answered_by", "verdict", "greeting_end"), [
    ("human", "human", None), ("machine_start", "machine", None), ("machine_end_beep", "machine", "beep"),
    ("machine_end_silence", "machine", "silence"), ("machine_end_other", "machine", "other"),
    ("fax", "machine", None), ("unknown", "unknown", None)])
def test_async_amd_callback_is_one_machine_event(answered_by: str, verdict: str, greeting_end: str | None) -> None:
    """AsyncAmdStatusCallback (type=amd) -> one carrier-neutral call.machine event, keyed once per call."""
    carrier, host = make_carrier()
    result = carrier.parse_webhook(webhook(f"{PUBLIC}?callId=c1&type=amd", {
        "CallSid": "CA1", "AccountSid": "AC1", "AnsweredBy": answered_by, "MachineDetectionDuration": "2170"}), host)
    [event] = result.events
    assert (event.type, event.call_id, event.provider_call_id) == (EventType.MACHINE, "c1", "CA1")
    assert event.machine is not None
    assert (event.machine.answered_by, event.machine.greeting_end, event.machine.decision_ms, event.machine.cause) == \
        (verdict, greeting_end, 2170, f"twilio:{answered_by}")
    assert event.dedupe_key == "twilio:CA1:call.machine"
    assert result.reply.status == 200 and result.effects == []


def test_async_amd_callback_with_an_undocumented_value_is_nothing() -> None:
    carrier, host = make_carrier()
    result = carrier.parse_webhook(webhook(f"{PUBLIC}?callId=c1&type=amd", {"CallSid": "CA1", "AnsweredBy": "robot"}),
                                   host)
    assert result.events == [] and result.reply.status == 200


def test_answered_by_on_the_voice_url_no_longer_ends_the_call() -> None:
    """AnsweredBy belongs to the asynchronous callback; on the voice URL the call is just answered."""
    carrier, host = make_carrier()
    result = carrier.parse_webhook(webhook(f"{PUBLIC}?callId=c1", {"CallSid": "CA1", "CallStatus": "in-progress",
                                                                   "AnsweredBy": "machine_start"}), host)
    assert [e.type for e in result.events] == [EventType.ANSWERED]


def test_human_answer_is_answered() -> None:
    carrier, host = make_carrier()
    result = carrier.parse_webhook(webhook(f"{PUBLIC}?callId=c1", {"CallSid": "CA1", "CallStatus": "in-progress",
                                                                   "AnsweredBy": "human"}), host)
    assert [e.type for e in result.events] == [EventType.ANSWERED]


def test_gather_result_carries_the_turn_token_and_confidence() -> None:
    carrier, host = make_carrier()
    call = record("c1")
    host.calls["c1"] = call
    result = carrier.parse_webhook(webhook(f"{PUBLIC}?callId=c1&turnToken=T1",
                                           {"CallSid": "CA1", "SpeechResult": "yes please", "Confidence": "0.81"}), host)
    [speech] = result.events
    assert (speech.type, speech.transcript, speech.turn_token, speech.confidence, speech.is_final) == \
        (EventType.SPEECH, "yes please", "T1", 0.81, True)
    assert result.respond is not None
    gather = ET.fromstring(result.respond(call).body).find("Gather")
    assert gather is not None and gather.get("input") == "speech"  # keeps listening, the call stays up
    digits = carrier.parse_webhook(webhook(f"{PUBLIC}?callId=c1&type=gather", {"CallSid": "CA1", "Digits": "42"}), host)
    assert [(e.type, e.digits) for e in digits.events] == [(EventType.DTMF, "42")]


def test_listen_twiml_puts_the_turn_token_in_the_gather_action() -> None:
    carrier, host = make_carrier()
    doc = ET.fromstring(carrier.listen_twiml("c1", "tok9"))
    gather = doc.find("Gather")
    assert gather is not None
    query = dict(parse_qsl(urlsplit(gather.get("action", "")).query))
    assert query == {"callId": "c1", "turnToken": "tok9"}
    assert doc.find("Redirect") is not None  # no speech: Twilio falls through and listens again


@pytest.mark.parametrize(("mode", "override", "flavor"), [
    ("detect", None, "Enable"), ("hangup", None, "Enable"), ("leave-message", None, "DetectMessageEnd"),
    ("detect", "DetectMessageEnd", "DetectMessageEnd")])
async def test_create_call_form(mode: str, override: str | None, flavor: str) -> None:
    """The create-call request: callId in Url, typed StatusCallback, one StatusCallbackEvent per value,
    Timeout from ringTimeoutMs, asynchronous AMD in the flavor the mode needs (twilio.machineDetection
    overrides) with its callback to type=amd."""
    twilio = {"accountSid": "AC" + "0" * 32, "authToken": TOKEN, **({"machineDetection": override} if override else {})}
    carrier, _ = make_carrier(ringTimeoutMs=45_500, twilio=twilio)
    sent: list[Any] = []

    class Http:
        base_url = "x"

        async def request(self, method: str, path: str, **kw: Any) -> Any:
            sent.append((method, path, kw["form"]))
            return type("R", (), {"body": {"sid": "CA" + "2" * 32}, "status": 201})()

    carrier.http = Http()  # type: ignore[assignment]
    from carriers.base import OutboundRequest

    sid = await carrier.initiate_call(record("c1"), OutboundRequest("+15550005678", "+15550001234", "hi", "notify", False,
                                                                   machine_detection=mode, native_amd=True))
    assert sid == "CA" + "2" * 32
    method, path, form = sent[0]
    assert (method, path) == ("POST", f"/2010-04-01/Accounts/AC{'0' * 32}/Calls.json")
    assert ("Url", f"{PUBLIC}?callId=c1") in form
    assert ("StatusCallback", f"{PUBLIC}?callId=c1&type=status") in form
    assert [v for k, v in form if k == "StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
    assert ("Timeout", "46") in form and ("MachineDetection", flavor) in form
    assert ("AsyncAmd", "true") in form and ("AsyncAmdStatusCallback", f"{PUBLIC}?callId=c1&type=amd") in form
    assert ("MachineDetectionTimeout", "30") in form
    native = carrier.native_amd(mode)
    assert native.reports_greeting_end is (flavor == "DetectMessageEnd") and native.silent_means == "unknown"
    sent.clear()
    await carrier.initiate_call(record("c2"), OutboundRequest("+15550005678", "+15550001234", "hi", "notify", False,
                                                              machine_detection=mode, native_amd=False))
    assert not [k for k, _ in sent[0][2] if "MachineDetection" in k or "Amd" in k], "local detector: nothing asked"


async def test_parse_changes_nothing_the_said_effect_wakes_the_waiter() -> None:
    carrier, host = make_carrier()
    call = record("c1")
    host.calls["c1"] = call
    say_id, say = carrier._new_say("c1", "Hello")
    said = webhook(f"{PUBLIC}?callId=c1&type=said&say={say_id}", {"CallSid": "CA1", "CallStatus": "in-progress"})
    result = carrier.parse_webhook(said, host)
    assert result.events == [] and not say.done.done(), "parsing is pure"
    assert carrier.parse_webhook(said, host).effects == result.effects == [SpeechHeard(say_id, call_id="c1")]
    carrier.apply_effects(result.effects)
    assert say.done.done()
    assert result.respond is not None and ET.fromstring(result.respond(call).body).find("Gather") is not None
