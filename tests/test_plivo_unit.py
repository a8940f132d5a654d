"""Plivo carrier, sans-I/O: callback parsing and end reasons, signature verification (V3 with the
multi-signature header, V2 fallback), XML answers and the Audio Stream codec."""

from __future__ import annotations

import base64
import json
import re
import secrets
from xml.etree import ElementTree as ET

import pytest

from bridge.calls import CallState, Direction, EventType
from carriers.base import (
    StreamCleared,
    StreamDtmf,
    StreamIgnored,
    StreamMark,
    StreamMedia,
    StreamProtocolError,
    StreamStart,
    WebhookRequest,
)
from carriers.plivo.protocol import (
    PlivoStreamCodec,
    callback_events,
    decode_extra_headers,
    encode_extra_headers,
    parse_callback,
    verify_request,
    xml_hangup,
    xml_listen,
    xml_speak_then_redirect,
    xml_stream,
)
from media.formats import ULAW_8K
from tests.fakes.plivo_server import sign_v2, sign_v3

TOKEN = "plivo-unit-token"
URL = "https://bridge.example.com/voice/webhook?callId=abc&flow=answer"
PARAMS = {"CallUUID": "uuid-1", "RequestUUID": "req-1", "CallStatus": "in-progress", "Event": "StartApp",
          "Direction": "outbound", "From": "+15550000000", "To": "+15551112222"}


def _request(headers: dict[str, str], *, url: str = URL, params: dict[str, str] | None = None,
             variants: list[str] | None = None) -> WebhookRequest:
    form = list((params if params is not None else PARAMS).items())
    query = [tuple(p.split("=", 1)) for p in url.split("?", 1)[1].split("&")] if "?" in url else []
    return WebhookRequest(method="POST", path="/voice/webhook", public_url=url, headers=headers, body=b"",
                          query=query, form=form, url_variants=variants or [])  # type: ignore[arg-type]


def _v3_headers(url: str = URL, params: dict[str, str] | None = None, token: str = TOKEN) -> dict[str, str]:
    nonce = "31627761595286130198"
    return {"X-Plivo-Signature-V3": sign_v3(token, url, params if params is not None else PARAMS, nonce),
            "X-Plivo-Signature-V3-Nonce": nonce}


# ------------------------------------------------------------------ verification


def test_v3_signed_by_the_official_sdk_passes_with_a_replay_key() -> None:
    verdict = verify_request(TOKEN, _request(_v3_headers()))
    assert verdict.ok, verdict.reason
    assert verdict.replay_key and len(verdict.replay_key) == 64


def test_v3_seed_vector_for_our_webhook_shape() -> None:
    # seed-system.md section 9: token test-auth-token, nonce nonce-456, over our answer URL.
    url = "https://example.com/voice/webhook?callId=abc&flow=answer"
    params = {"CallStatus": "in-progress", "CallUUID": "uuid", "From": "+15550000000"}
    headers = {"X-Plivo-Signature-V3": "bC2SrisyhbS+0kQ0P5ZcXWYJcKAOkwrO60AVtfoARUc=",
               "X-Plivo-Signature-V3-Nonce": "nonce-456"}
    assert verify_request("test-auth-token", _request(headers, url=url, params=params)).ok
    assert not verify_request("test-auth-tokens", _request(headers, url=url, params=params)).ok


def test_v3_multi_signature_header_any_match_passes() -> None:
    headers = _v3_headers()
    other = base64.b64encode(secrets.token_bytes(32)).decode()
    headers["X-Plivo-Signature-V3"] = f"{other}, {headers['X-Plivo-Signature-V3']}"
    assert verify_request(TOKEN, _request(headers)).ok


def test_v3_main_account_header_alone_passes() -> None:
    headers = _v3_headers()
    headers["X-Plivo-Signature-Ma-V3"] = headers.pop("X-Plivo-Signature-V3")
    assert verify_request(TOKEN, _request(headers)).ok


def test_v3_tampered_param_query_or_token_fails() -> None:
    headers = _v3_headers()
    assert not verify_request(TOKEN, _request(headers, params={**PARAMS, "CallStatus": "completed"})).ok
    assert not verify_request(TOKEN, _request(headers, url=URL.replace("callId=abc", "callId=abd"))).ok
    assert not verify_request("other-token", _request(headers)).ok


def test_v3_without_nonce_is_refused() -> None:
    headers = _v3_headers()
    del headers["X-Plivo-Signature-V3-Nonce"]
    verdict = verify_request(TOKEN, _request(headers))
    assert not verdict.ok and "Nonce" in verdict.reason


def test_v3_matches_a_port_variant() -> None:
    signed_url = "https://bridge.example.com:8443/voice/webhook?callId=abc&flow=answer"
    headers = _v3_headers(url=signed_url)
    assert not verify_request(TOKEN, _request(headers)).ok
    assert verify_request(TOKEN, _request(headers, variants=[signed_url])).ok


def test_v2_fallback_seed_vector_and_wrong_token() -> None:
    # seed-system.md section 9: https://example.com/voice/webhook + nonce-123.
    headers = {"X-Plivo-Signature-V2": "PJ9V+hFrV8Su5B6Bvt6VGdBBRCiXrBXSTYguozRD+CY=",
               "X-Plivo-Signature-V2-Nonce": "nonce-123"}
    request = _request(headers, url="https://example.com/voice/webhook?flow=hangup")
    assert not verify_request("test-auth-token", request).ok  # V2 only by opt-in (plivo.allowV2Signatures)
    verdict = verify_request("test-auth-token", request, allow_v2=True)
    assert verdict.ok and verdict.reason == "v2"
    assert not verify_request("test-auth-tokenx", request, allow_v2=True).ok


def test_v2_is_not_used_when_a_v3_signature_is_present_but_wrong() -> None:
    headers = _v3_headers(token="wrong")
    headers["X-Plivo-Signature-V2"] = sign_v2(TOKEN, URL, "n1")
    headers["X-Plivo-Signature-V2-Nonce"] = "n1"
    assert not verify_request(TOKEN, _request(headers)).ok


def test_replay_key_ignores_the_query_and_changes_with_the_nonce() -> None:
    a = verify_request(TOKEN, _request(_v3_headers()))
    url_b = URL.replace("flow=answer", "flow=hangup")
    b = verify_request(TOKEN, _request(_v3_headers(url=url_b), url=url_b))
    assert a.replay_key == b.replay_key  # same nonce, same base URL: the same delivery
    headers = _v3_headers()
    headers["X-Plivo-Signature-V3-Nonce"] = "1"
    headers["X-Plivo-Signature-V3"] = sign_v3(TOKEN, URL, PARAMS, "1")
    assert verify_request(TOKEN, _request(headers)).replay_key != a.replay_key


# ------------------------------------------------------------------ callbacks -> events


def _events(query: dict[str, str], params: dict[str, str]):
    return callback_events(parse_callback(query, params))


def test_outbound_answer_links_request_uuid_to_call_uuid() -> None:
    [ev] = _events({"callId": "c1", "flow": "answer"}, PARAMS)
    assert ev.type == EventType.ANSWERED and ev.call_id == "c1"
    assert ev.provider_call_id == "uuid-1" and ev.previous_provider_call_id == "req-1"
    assert ev.dedupe_key == "plivo:uuid-1:answered"


def test_same_request_and_call_uuid_is_no_upgrade() -> None:
    [ev] = _events({"callId": "c1", "flow": "ring"}, {**PARAMS, "RequestUUID": "uuid-1", "CallStatus": "ringing"})
    assert ev.type == EventType.RINGING and ev.previous_provider_call_id is None


def test_inbound_answer_without_flow_is_initiated_then_answered() -> None:
    params = {**PARAMS, "Direction": "inbound", "CallStatus": "ringing"}
    initiated, answered = _events({}, params)
    assert initiated.type == EventType.INITIATED and initiated.direction == Direction.INBOUND
    assert (initiated.from_number, initiated.to_number) == ("+15550000000", "+15551112222")
    assert answered.type == EventType.ANSWERED and answered.direction is None


@pytest.mark.parametrize(("status", "cause", "source", "direction", "reason"), [
    ("busy", "USER_BUSY", "Callee", "outbound", CallState.BUSY),
    ("failed", "UNALLOCATED_NUMBER", "Plivo", "outbound", CallState.FAILED),
    ("timeout", "NO_ANSWER", "Plivo", "outbound", CallState.NO_ANSWER),
    ("no-answer", "", "", "outbound", CallState.NO_ANSWER),
    ("cancel", "ORIGINATOR_CANCEL", "API Request", "outbound", CallState.HANGUP_BOT),
    ("cancel", "ORIGINATOR_CANCEL", "Caller", "inbound", CallState.HANGUP_USER),
    ("completed", "NORMAL_CLEARING", "Callee", "outbound", CallState.HANGUP_USER),
    ("completed", "NORMAL_CLEARING", "Caller", "inbound", CallState.HANGUP_USER),
    ("completed", "NORMAL_CLEARING", "API Request", "outbound", CallState.HANGUP_BOT),
    ("completed", "NORMAL_CLEARING", "Answer XML", "inbound", CallState.HANGUP_BOT),
    ("completed", "NORMAL_CLEARING", "", "outbound", CallState.COMPLETED),
    ("completed", "MACHINE_DETECTED", "Plivo", "outbound", CallState.VOICEMAIL),
    ("completed", "ALLOTTED_TIMEOUT", "Plivo", "outbound", CallState.TIMEOUT),
])
def test_hangup_end_reasons(status: str, cause: str, source: str, direction: str, reason: CallState) -> None:
    params = {**PARAMS, "CallStatus": status, "HangupCause": cause, "HangupSource": source,
              "Direction": direction, "Event": "Hangup"}
    [ev] = _events({"callId": "c1", "flow": "hangup"}, params)
    assert ev.type == EventType.ENDED and ev.reason == reason


def test_hangup_without_flow_is_inferred() -> None:
    [ev] = _events({}, {**PARAMS, "CallStatus": "completed", "Event": "Hangup", "HangupSource": "Caller",
                        "Direction": "inbound"})
    assert ev.type == EventType.ENDED and ev.reason == CallState.HANGUP_USER


def test_machine_detection_callback_is_a_machine_event() -> None:
    """Plivo's machine_detection_url callback -> one call.machine event (Machine=false, should it come,
    a person); the call is not ended here: the manager acts per outbound.machineDetection."""
    [ev] = _events({"callId": "c1", "flow": "machine"}, {**PARAMS, "Event": "MachineDetection", "Machine": "true"})
    assert ev.type == EventType.MACHINE and ev.machine is not None
    assert (ev.machine.answered_by, ev.machine.greeting_end, ev.machine.cause) == ("machine", None, "plivo:Machine=true")
    assert ev.key.endswith(":machine")
    [human] = _events({"callId": "c1", "flow": "machine"}, {**PARAMS, "Event": "MachineDetection", "Machine": "false"})
    assert human.machine is not None and human.machine.answered_by == "human"
    assert _events({"callId": "c1", "flow": "machine"}, {**PARAMS, "Event": "MachineDetection"}) == []


@pytest.mark.parametrize("field", ["Speech", "Transcription", "TranscriptionText", "SpeechResult",
                                   "RecognizedSpeech", "Text"])
def test_getinput_transcript_fields_and_turn_token(field: str) -> None:
    params = {**PARAMS, field: "Thursday at three", "SpeechConfidenceScore": "0.8"}
    [ev] = _events({"callId": "c1", "flow": "getinput", "turnToken": "t1"}, params)
    assert ev.type == EventType.SPEECH and ev.transcript == "Thursday at three"
    assert ev.turn_token == "t1" and ev.is_final and ev.confidence == pytest.approx(0.8)


def test_transcript_field_order_and_digits() -> None:
    params = {**PARAMS, "Text": "second", "Speech": "first", "Digits": "42"}
    speech, dtmf = _events({"callId": "c1", "flow": "getinput", "turnToken": "t"}, params)
    assert speech.transcript == "first"
    assert dtmf.type == EventType.DTMF and dtmf.digits == "42"


def test_xml_fetches_have_no_events() -> None:
    for flow in ("xml-speak", "xml-listen", "spoken"):
        assert _events({"callId": "c1", "flow": flow, "sid": "s"}, PARAMS) == []


# ------------------------------------------------------------------ XML


def test_stream_xml_is_bidirectional_mulaw_with_alphanumeric_extra_headers() -> None:
    token = secrets.token_urlsafe(16)  # what the manager hands out: has - and _
    call_id = "6f1c2a9e-4b7d-4a51-9d55-2c1f0e9b7a10"
    extra = encode_extra_headers({"token": token, "callId": call_id})
    assert re.fullmatch(r"[A-Za-z0-9]+=[A-Za-z0-9]+(,[A-Za-z0-9]+=[A-Za-z0-9]+)*", extra)
    assert len(extra.encode()) <= 512
    assert decode_extra_headers(extra) == {"token": token, "callId": call_id}
    root = ET.fromstring(xml_stream("wss://bridge.example.com/voice/stream", extra).body)
    [stream] = list(root)
    assert root.tag == "Response" and stream.tag == "Stream"
    assert stream.text == "wss://bridge.example.com/voice/stream"
    assert stream.attrib == {"bidirectional": "true", "keepCallAlive": "true",
                             "contentType": "audio/x-mulaw;rate=8000", "extraHeaders": extra}


def test_rejection_xml() -> None:
    reply = xml_hangup("rejected")
    assert reply.content_type == "application/xml"
    root = ET.fromstring(reply.body)
    assert [(el.tag, el.attrib) for el in root] == [("Hangup", {"reason": "rejected"})]


def test_speak_and_listen_xml_escape_text() -> None:
    root = ET.fromstring(xml_speak_then_redirect('Tom & "Jerry" <3', "https://h/w?callId=c&flow=spoken&sid=1").body)
    speak, redirect = list(root)
    assert speak.text == 'Tom & "Jerry" <3'
    assert redirect.text == "https://h/w?callId=c&flow=spoken&sid=1" and redirect.get("method") == "POST"
    root = ET.fromstring(xml_listen("https://h/w?callId=c&flow=getinput&turnToken=t", prompt="Hi",
                                    execution_timeout_s=30, hold_s=300).body)
    get_input, wait = list(root)
    assert get_input.get("inputType") == "speech" and get_input.get("action").endswith("turnToken=t")
    assert [el.text for el in get_input] == ["Hi"] and wait.get("length") == "300"


# ------------------------------------------------------------------ audio stream codec


def _start_frame(extra: str = "token=74,callId=63") -> str:
    return json.dumps({"event": "start", "sequenceNumber": 1,
                       "start": {"callId": "uuid-1", "streamId": "s-1", "accountId": "MA1", "tracks": ["inbound"],
                                 "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}},
                       "extra_headers": extra})


def test_codec_start_media_dtmf_played_cleared() -> None:
    codec = PlivoStreamCodec()
    start = codec.parse(_start_frame(encode_extra_headers({"token": "tok-en_1", "callId": "c-1"})))
    assert isinstance(start, StreamStart)
    assert (start.provider_call_id, start.stream_id, start.format) == ("uuid-1", "s-1", ULAW_8K)
    assert (start.token, start.call_id) == ("tok-en_1", "c-1")
    payload = bytes(range(160))
    media = codec.parse(json.dumps({"event": "media", "sequenceNumber": 42, "streamId": "s-1", "media": {
        "track": "inbound", "timestamp": "1705312200000", "chunk": 41,
        "payload": base64.b64encode(payload).decode()}}))
    assert isinstance(media, StreamMedia) and media.payload == payload and media.sequence == 41
    assert codec.parse('{"event":"dtmf","sequenceNumber":7,"streamId":"s-1","dtmf":{"track":"inbound","digit":"5"}}') \
        == StreamDtmf("5")
    assert codec.parse('{"event":"playedStream","sequenceNumber":9,"streamId":"s-1","name":"play-1"}') \
        == StreamMark("play-1")
    assert isinstance(codec.parse('{"event":"clearedAudio","sequenceNumber":10,"streamId":"s-1"}'), StreamCleared)
    assert codec.parse('{"event":"somethingNew"}') == StreamIgnored("somethingNew")


def test_codec_outgoing_frames() -> None:
    codec = PlivoStreamCodec()
    codec.parse(_start_frame())
    media = json.loads(codec.encode_media(b"\xff" * 160))
    assert media == {"event": "playAudio", "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000,
                                                     "payload": base64.b64encode(b"\xff" * 160).decode()}}
    assert json.loads(codec.encode_mark("m1")) == {"event": "checkpoint", "streamId": "s-1", "name": "m1"}
    assert json.loads(codec.encode_clear()) == {"event": "clearAudio", "streamId": "s-1"}


@pytest.mark.parametrize("frame", [
    "not json",
    "[1, 2]",
    '{"no": "event"}',
    '{"event": "start"}',
    '{"event": "start", "start": {"streamId": "s"}}',
    '{"event": "start", "start": {"callId": "c", "streamId": "s", "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000}}}',
    '{"event": "media", "media": {}}',
    '{"event": "media", "media": {"payload": "***"}}',
    '{"event": "dtmf", "dtmf": {}}',
    '{"event": "playedStream"}',
])
def test_codec_rejects_bad_frames(frame: str) -> None:
    with pytest.raises(StreamProtocolError):
        PlivoStreamCodec().parse(frame)


def test_extra_headers_tolerates_plain_values() -> None:
    assert decode_extra_headers("token=abcxyz, callId=zz") == {"token": "abcxyz", "callId": "zz"}
    assert decode_extra_headers({"token": "6869"}) == {"token": "hi"}
    assert decode_extra_headers(None) == {}
