"""Plivo's wire protocol, sans-I/O: XML answers, callback parsing and end reasons, the signature
check (V3, V2), the stream's `extraHeaders`, and the Audio Stream frame codec. No sockets, no
clock, no per-call state."""

from __future__ import annotations

import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from xml.etree import ElementTree as ET

from bridge.calls import CallEvent, CallState, Direction, EventType, MachineResult, TransferOutcome
from carriers import wire
from carriers.base import (
    MediaStreamCodec,
    StreamCleared,
    StreamDtmf,
    StreamIgnored,
    StreamMark,
    StreamMedia,
    StreamMessage,
    StreamProtocolError,
    StreamStart,
    StreamStop,
    WebhookReply,
    WebhookRequest,
    WebhookVerdict,
)
from carriers.signatures import plivo_replay_key, verify_plivo_v2, verify_plivo_v3
from media.amd import AnsweredBy
from media.formats import ULAW_8K

_PLAY_AUDIO_PREFIX = '{"event": "playAudio", "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": "'

SIG_V3 = "X-Plivo-Signature-V3"
SIG_MA_V3 = "X-Plivo-Signature-Ma-V3"
SIG_V3_NONCE = "X-Plivo-Signature-V3-Nonce"
SIG_V2 = "X-Plivo-Signature-V2"
SIG_V2_NONCE = "X-Plivo-Signature-V2-Nonce"

FLOW_ANSWER = "answer"
FLOW_HANGUP = "hangup"
FLOW_RING = "ring"
FLOW_MACHINE = "machine"
FLOW_SPEAK = "xml-speak"
FLOW_LISTEN = "xml-listen"
FLOW_SPOKEN = "spoken"
FLOW_GETINPUT = "getinput"
FLOW_XFER_DIAL = "xfer-dial"  # cold transfer: the Transfer API's aleg_url, answered with <Dial>
FLOW_XFER_LEG = "xfer-leg"  # the <Dial> callbackUrl: the dialed person's progress
FLOW_XFER_DONE = "xfer-done"  # the <Dial> action: DialStatus once the dialed leg ended or never connected
FLOW_CONFERENCE = "conference"  # warm transfer: both legs redirected into one <Conference>

STREAM_CONTENT_TYPE = "audio/x-mulaw;rate=8000"
TRANSCRIPT_FIELDS = ("Speech", "Transcription", "TranscriptionText", "SpeechResult", "RecognizedSpeech", "Text")
XML_CONTENT_TYPE = "application/xml"
MAX_WAIT_S = 3600  # longest <Wait> we ask for; the call's own time limit ends it sooner


# ============================================================================ sans-I/O: XML


def _xml(response: ET.Element) -> WebhookReply:
    body = '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(response, encoding="unicode")
    return WebhookReply(200, body, XML_CONTENT_TYPE)


def _response(*children: ET.Element) -> ET.Element:
    root = ET.Element("Response")
    root.extend(children)
    return root


def _el(tag: str, text: str | None = None, **attrs: str | None) -> ET.Element:
    element = ET.Element(tag, {k: v for k, v in attrs.items() if v is not None})
    if text is not None:
        element.text = text
    return element


def xml_stream(stream_url: str, extra_headers: str) -> WebhookReply:
    return _xml(_response(_el("Stream", stream_url, bidirectional="true", keepCallAlive="true",
                              contentType=STREAM_CONTENT_TYPE, extraHeaders=extra_headers)))


def xml_speak_then_redirect(text: str, redirect_url: str) -> WebhookReply:
    return _xml(_response(_el("Speak", text), _el("Redirect", redirect_url, method="POST")))


def xml_listen(action_url: str, *, prompt: str | None, execution_timeout_s: int, hold_s: int) -> WebhookReply:
    get_input = _el("GetInput", action=action_url, method="POST", inputType="speech",
                    executionTimeout=str(execution_timeout_s), redirect="true")
    if prompt:
        # A prompt nested in GetInput is interruptible: the caller may answer before it ends.
        get_input.append(_el("Speak", prompt))
    return _xml(_response(get_input, _el("Wait", length=str(hold_s))))


def xml_hold(seconds: int) -> WebhookReply:
    return _xml(_response(_el("Wait", length=str(seconds))))


def xml_wait_then_hangup(seconds: int) -> WebhookReply:
    elements = [_el("Wait", length=str(seconds))] if seconds > 0 else []
    return _xml(_response(*elements, _el("Hangup")))


def xml_hangup(reason: str | None = None) -> WebhookReply:
    return _xml(_response(_el("Hangup", reason=reason)))


def xml_dial(to: str, *, action: str, callback: str, timeout_s: int, caller_id: str | None) -> WebhookReply:
    """Cold transfer: `<Dial>` a number (digits, no +) or a SIP URI (`<User>`)."""
    sip = to.lower().startswith(("sip:", "sips:"))
    dial = _el("Dial", action=action, method="POST", timeout=str(timeout_s),
               callerId=caller_id.lstrip("+") if caller_id and not sip else None,
               callbackUrl=callback, callbackMethod="POST")
    dial.append(_el("User", to) if sip else _el("Number", to.lstrip("+")))
    return _xml(_response(dial))


def xml_conference(name: str) -> WebhookReply:
    """Warm transfer: the legs meet in a conference that ends when either leaves."""
    return _xml(_response(_el("Conference", name, startConferenceOnEnter="true", endConferenceOnExit="true",
                              stayAlone="false", enterSound="", exitSound="")))


# <Dial action> DialStatus -> the transfer's outcome
DIAL_OUTCOMES = {"completed": TransferOutcome.COMPLETED, "busy": TransferOutcome.BUSY,
                 "no-answer": TransferOutcome.NO_ANSWER, "timeout": TransferOutcome.NO_ANSWER,
                 "failed": TransferOutcome.FAILED}


def dial_outcome(status: str | None) -> TransferOutcome:
    return DIAL_OUTCOMES.get((status or "").strip().lower(), TransferOutcome.FAILED)


def transfer_event(flow: str, call_id: str | None, params: Mapping[str, str]) -> CallEvent | None:
    """The outcome of a cold transfer from the <Dial> callbacks (about our call; no provider id, so the
    dialed leg's uuid never becomes the caller's): answered (callbackUrl, DialAction=answer) or the
    action's DialStatus."""
    a_leg = params.get("DialALegUUID") or params.get("CallUUID") or ""
    if flow == FLOW_XFER_LEG:
        if (params.get("DialAction") or "").lower() != "answer":
            return None
        event = CallEvent(EventType.TRANSFER, call_id=call_id, outcome=TransferOutcome.COMPLETED.value)
        event.dedupe_key = f"plivo:xfer:{a_leg}:{params.get('DialBLegUUID') or ''}:answer"
        return event
    status = params.get("DialStatus")
    outcome = dial_outcome(status)
    error = None if outcome == TransferOutcome.COMPLETED else f"DialStatus {status or 'missing'}"
    event = CallEvent(EventType.TRANSFER, call_id=call_id, outcome=outcome.value, error=error)
    event.dedupe_key = f"plivo:xfer:{a_leg}:{params.get('DialBLegUUID') or ''}:done:{status}"
    return event


# ============================================================================ sans-I/O: stream headers

# Plivo's `extraHeaders` allows only letters and digits in keys and values, so values travel
# hex-encoded (the stream token is base64url and call ids are UUIDs with dashes).


def encode_extra_headers(values: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value.encode('utf-8').hex()}" for key, value in values.items())


def decode_extra_headers(raw: Any) -> dict[str, str]:
    """`k=v,k2=v2` (or a mapping) with hex values back to text; values that are not hex stay as sent."""
    pairs: list[tuple[str, str]] = []
    if isinstance(raw, Mapping):
        pairs = [(str(k), str(v)) for k, v in raw.items()]
    elif isinstance(raw, str):
        for part in raw.replace(";", ",").split(","):
            key, sep, value = part.partition("=")
            if sep and key.strip():
                pairs.append((key.strip(), value.strip()))
    out: dict[str, str] = {}
    for key, value in pairs:
        try:
            out[key] = bytes.fromhex(value).decode("utf-8") if value else value
        except (ValueError, UnicodeDecodeError):
            out[key] = value
    return out


# ============================================================================ sans-I/O: callbacks


@dataclass(slots=True)
class PlivoCallback:
    """One Plivo callback, with what we put in its URL."""

    flow: str
    call_id: str | None
    turn_token: str | None
    speech_id: str | None
    call_uuid: str | None
    request_uuid: str | None
    status: str
    event: str
    direction: str
    from_number: str | None
    to_number: str | None
    hangup_cause: str
    hangup_source: str
    digits: str | None
    transcript: str | None
    confidence: float | None
    machine: bool | None


def _first(params: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = params.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


def parse_callback(query: Mapping[str, str], params: Mapping[str, str]) -> PlivoCallback:
    status = (params.get("CallStatus") or "").strip().lower()
    event = (params.get("Event") or "").strip()
    direction = (params.get("Direction") or "").strip().lower()
    flow = (query.get("flow") or "").strip() or _infer_flow(status, event, direction)
    confidence_text = _first(params, "SpeechConfidenceScore", "Confidence")
    try:
        confidence = float(confidence_text) if confidence_text is not None else None
    except ValueError:
        confidence = None
    machine_text = _first(params, "Machine")
    return PlivoCallback(
        flow=flow,
        call_id=query.get("callId") or None,
        turn_token=query.get("turnToken") or None,
        speech_id=query.get("sid") or None,
        call_uuid=_first(params, "CallUUID", "ALegUUID"),
        request_uuid=_first(params, "RequestUUID", "ALegRequestUUID"),
        status=status,
        event=event,
        direction=direction,
        from_number=_first(params, "From"),
        to_number=_first(params, "To"),
        hangup_cause=(params.get("HangupCause") or params.get("HangupCauseName") or "").strip(),
        hangup_source=(params.get("HangupSource") or "").strip(),
        digits=_first(params, "Digits"),
        transcript=_first(params, *TRANSCRIPT_FIELDS),
        confidence=confidence,
        machine=None if machine_text is None else machine_text.lower() == "true",
    )


_TERMINAL_STATUSES = frozenset({"completed", "busy", "failed", "timeout", "no-answer", "cancel", "canceled"})


def _infer_flow(status: str, event: str, direction: str) -> str:
    """For URLs set on the Plivo console without our `flow` (an application's answer/hangup URL)."""
    if event == "MachineDetection":
        return FLOW_MACHINE
    if event == "Hangup" or status in _TERMINAL_STATUSES:
        return FLOW_HANGUP
    if event == "StartApp" or (direction == "inbound" and status in ("ringing", "in-progress")):
        return FLOW_ANSWER
    if status == "ringing":
        return FLOW_RING
    return ""


_CAUSES = {
    "USER_BUSY": CallState.BUSY,
    "CALL_REJECTED": CallState.BUSY,
    "NO_ANSWER": CallState.NO_ANSWER,
    "NO_USER_RESPONSE": CallState.NO_ANSWER,
    "ALLOTTED_TIMEOUT": CallState.TIMEOUT,
    "MACHINE_DETECTED": CallState.VOICEMAIL,
}


def end_reason(cb: PlivoCallback) -> CallState:
    """The end reason of a hang-up callback: CallStatus first, then who hung up, then HangupCause."""
    outbound = cb.direction != "inbound"
    status = cb.status
    if status == "busy":
        return CallState.BUSY
    if status == "failed":
        return CallState.FAILED
    if status in ("timeout", "no-answer"):
        return CallState.NO_ANSWER
    if status in ("cancel", "canceled"):
        # an outbound call is cancelled by us; an inbound one by the caller giving up
        return CallState.HANGUP_BOT if outbound else CallState.HANGUP_USER
    cause = cb.hangup_cause.upper().replace(" ", "_")
    if cause in _CAUSES:
        return _CAUSES[cause]
    source = cb.hangup_source.lower()
    if source in ("api request", "answer xml", "plivo"):
        return CallState.HANGUP_BOT
    if (source == "callee" and outbound) or (source == "caller" and not outbound):
        return CallState.HANGUP_USER
    if source in ("callee", "caller"):
        return CallState.HANGUP_BOT
    if source == "error":
        return CallState.ERROR
    return CallState.COMPLETED


def callback_events(cb: PlivoCallback) -> list[CallEvent]:
    """Normalized events of one callback (flows that only fetch XML have none)."""
    uuid_ = cb.call_uuid
    previous = cb.request_uuid if cb.request_uuid and cb.request_uuid != uuid_ else None

    def event(kind: EventType, suffix: str | None = None, **kw: Any) -> CallEvent:
        ev = CallEvent(kind, call_id=cb.call_id, provider_call_id=uuid_, previous_provider_call_id=previous, **kw)
        if suffix and uuid_:
            # Stable across Plivo's redeliveries (a retry comes with a new nonce, so a new replay key).
            ev.dedupe_key = f"plivo:{uuid_}:{suffix}"
        return ev

    if cb.flow == FLOW_ANSWER:
        if cb.direction == "inbound" and not cb.call_id:
            return [
                event(EventType.INITIATED, "initiated", direction=Direction.INBOUND,
                      from_number=cb.from_number, to_number=cb.to_number),
                event(EventType.ANSWERED, "answered"),
            ]
        return [event(EventType.ANSWERED, "answered")]
    if cb.flow == FLOW_RING:
        return [event(EventType.RINGING, "ringing")]
    if cb.flow == FLOW_HANGUP:
        return [event(EventType.ENDED, "ended", reason=end_reason(cb))]
    if cb.flow == FLOW_MACHINE:
        if cb.machine is None:
            return []
        # Plivo calls back when it found a machine (a person gets no callback: the manager's wait
        # for a verdict ends as human); `Machine=false` is taken as a person should it come.
        verdict: AnsweredBy = "machine" if cb.machine else "human"
        result = MachineResult(verdict, f"plivo:Machine={str(cb.machine).lower()}")
        return [event(EventType.MACHINE, "machine", machine=result)]
    events: list[CallEvent] = []
    # One GetInput answers once: its turn token (or speech id) plus what was heard is stable across
    # Plivo's redeliveries, which come with a fresh nonce and so a fresh replay key.
    element = cb.turn_token or cb.speech_id or ""
    if cb.flow == FLOW_GETINPUT:
        if cb.transcript:
            events.append(event(EventType.SPEECH, f"input:{element}:speech:{_digest(cb.transcript)}",
                                turn_token=cb.turn_token, transcript=cb.transcript,
                                is_final=True, confidence=cb.confidence))
        if cb.digits:
            events.append(event(EventType.DTMF, f"input:{element}:dtmf:{cb.digits}", digits=cb.digits))
        return events
    if not cb.flow:
        # An unknown kind of callback: take what its status says.
        if cb.status == "in-progress":
            return [event(EventType.ANSWERED, "answered")]
        if cb.digits:
            return [event(EventType.DTMF, f"input:{element}:dtmf:{cb.digits}", digits=cb.digits)]
    return []


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# ============================================================================ sans-I/O: audio stream


# How Plivo writes a media frame (top-level keys, media keys): read without the JSON parser when exactly so.
MEDIA_LAYOUT = (("sequenceNumber", "streamId", "media"), ("track", "timestamp", "chunk", "payload"))


class PlivoStreamCodec(MediaStreamCodec):
    """Plivo's bidirectional Audio Stream: start/media/dtmf/playedStream/clearedAudio in,
    playAudio/checkpoint/clearAudio out. There is no `stop` frame: the socket closing ends it."""

    reorders = False

    def __init__(self, *, fast_media: bool = True) -> None:
        self.stream_id: str | None = None
        self._fast = wire.MediaLayout(*MEDIA_LAYOUT) if fast_media else None

    def parse(self, text: str) -> StreamMessage:
        if self._fast is not None and self.stream_id is not None:
            fields = self._fast.match(text)
            if fields is not None:
                return StreamMedia(*fields)
        kind, frame = wire.json_frame(text)
        if kind == "start":
            return self._start(frame)
        if kind == "media":
            media = wire.section(frame, "media")
            return self._media(media.get("track", "inbound"), media.get("payload"), media.get("chunk"),
                               media.get("timestamp"), None)
        if kind == "dtmf":
            return StreamDtmf(wire.digit(wire.section(frame, "dtmf").get("digit")))
        if kind == "playedStream":
            return StreamMark(wire.mark_name(frame.get("name")))
        if kind == "clearedAudio":
            return StreamCleared()
        if kind == "stop":  # not in Plivo's protocol; harmless if a proxy sends one
            return StreamStop()
        return StreamIgnored(kind)

    def _media(self, track: Any, payload: Any, chunk: Any, timestamp: Any, _sequence: Any) -> StreamMessage:
        if not wire.is_inbound(track):
            return StreamIgnored("media")
        if self.stream_id is None:
            raise StreamProtocolError("media before start")
        return StreamMedia(wire.payload(payload), sequence=wire.optional_int(chunk, "media.chunk"),
                           timestamp_ms=wire.optional_int(timestamp, "media.timestamp"))

    def _start(self, frame: dict[str, Any]) -> StreamStart:
        start = wire.section(frame, "start")
        call_uuid = start.get("callId")
        stream_id = start.get("streamId") or frame.get("streamId")
        if not isinstance(call_uuid, str) or not call_uuid:
            raise StreamProtocolError("start frame without callId")
        if not isinstance(stream_id, str) or not stream_id:
            raise StreamProtocolError("start frame without streamId")
        media_format = wire.optional_section(start, "mediaFormat")
        encoding = str(media_format.get("encoding", "audio/x-mulaw")).lower()
        rate = wire.optional_int(media_format.get("sampleRate", 8000), "mediaFormat.sampleRate")
        if not encoding.startswith("audio/x-mulaw") or rate not in (8000, None):
            raise StreamProtocolError(f"unsupported media format {encoding or '?'}/{rate}")
        raw = frame.get("extra_headers")
        if raw is None:
            raw = start.get("extra_headers", start.get("extraHeaders", start.get("customParameters")))
        headers = decode_extra_headers(raw)
        self.stream_id = stream_id
        return StreamStart(provider_call_id=call_uuid, stream_id=stream_id, format=ULAW_8K,
                           token=headers.get("token"), call_id=headers.get("callId"), custom=headers)

    def encode_media(self, payload: bytes) -> str:
        # the bytes json.dumps gives for this fixed shape, without building and walking a dict per frame
        return _PLAY_AUDIO_PREFIX + binascii.b2a_base64(payload, newline=False).decode("ascii") + '"}}'

    def encode_mark(self, name: str) -> str:
        return json.dumps({"event": "checkpoint", "streamId": self.stream_id, "name": name})

    def encode_clear(self) -> str:
        return json.dumps({"event": "clearAudio", "streamId": self.stream_id})


# ============================================================================ verification


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def verify_request(auth_token: str, request: WebhookRequest, *, allow_v2: bool = False) -> WebhookVerdict:
    """V3 (account or main-account signature, any of a comma-separated list) over each candidate
    URL. V2 only with `allow_v2` and when no V3 signature was sent at all (its nonce must then be
    remembered by the caller: V2 does not sign the query or the body)."""
    urls = [request.public_url, *request.url_variants]
    params = request.form if request.method.upper() != "GET" else []
    v3 = [h for h in (request.header(SIG_V3), request.header(SIG_MA_V3)) if h]
    if v3:
        nonce = request.header(SIG_V3_NONCE)
        if not nonce:
            return WebhookVerdict(False, "missing X-Plivo-Signature-V3-Nonce")
        ok = False
        for url in urls:
            for signature in v3:
                ok |= verify_plivo_v3(auth_token, request.method.upper(), url, params, signature, nonce)
        if not ok:
            return WebhookVerdict(False, "bad V3 signature")
        return WebhookVerdict(True, "v3", plivo_replay_key(_without_query(request.public_url), nonce))
    v2 = request.header(SIG_V2)
    if v2 and not allow_v2:
        return WebhookVerdict(False, "V3 signature required (plivo.allowV2Signatures is off)")
    if v2:
        v2_nonce = request.header(SIG_V2_NONCE)
        if not v2_nonce:
            return WebhookVerdict(False, "missing X-Plivo-Signature-V2-Nonce")
        if not any(verify_plivo_v2(auth_token, url, v2_nonce, v2) for url in urls):
            return WebhookVerdict(False, "bad V2 signature")
        return WebhookVerdict(True, "v2", plivo_replay_key(_without_query(request.public_url), v2_nonce))
    return WebhookVerdict(False, "missing signature")
