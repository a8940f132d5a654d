"""Twilio's wire protocol, sans-I/O: TwiML builders, callback parsing, signature check, and the
Media Streams frame codec. No sockets, no clock, no per-call state (the codec keeps only its own
stream's id)."""

from __future__ import annotations

import binascii
import json
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from bridge.calls import CallEvent, CallState, Direction, EventType, MachineResult, TransferOutcome
from carriers import wire
from carriers.base import (
    MediaStreamCodec,
    StreamDtmf,
    StreamIgnored,
    StreamMark,
    StreamMedia,
    StreamMessage,
    StreamProtocolError,
    StreamStart,
    StreamStop,
    WebhookRequest,
    WebhookVerdict,
)
from carriers.signatures import twilio_replay_key, verify_twilio
from media.amd import AnsweredBy
from media.formats import ULAW_8K

SIGNATURE_HEADER = "X-Twilio-Signature"
XML = "text/xml"

# CallStatus -> the end reason, for the statuses that end a call.
TERMINAL_STATUS = {
    "completed": CallState.COMPLETED,
    "busy": CallState.BUSY,
    "no-answer": CallState.NO_ANSWER,
    "failed": CallState.FAILED,
    "canceled": CallState.HANGUP_BOT,
}
# OpenAI voice names (the seed's TTS config) -> the Polly voice `<Say>` uses without a stream.
POLLY_VOICES = {"alloy": "Polly.Joanna", "echo": "Polly.Matthew", "fable": "Polly.Amy", "onyx": "Polly.Brian",
                "nova": "Polly.Salli", "shimmer": "Polly.Kimberly"}
DEFAULT_VOICE = "Polly.Joanna"


# ====================================================================== TwiML (sans-I/O)


def twiml(*verbs: str) -> str:
    return f'<?xml version="1.0" encoding="UTF-8"?><Response>{"".join(verbs)}</Response>'


def say_verb(text: str, voice: str = DEFAULT_VOICE, language: str = "en-US") -> str:
    return f"<Say voice={quoteattr(voice)} language={quoteattr(language)}>{escape(text)}</Say>"


def redirect_verb(url: str) -> str:
    return f'<Redirect method="POST">{escape(url)}</Redirect>'


def gather_verb(action: str, language: str = "en-US") -> str:
    return (f'<Gather input="speech" speechTimeout="auto" language={quoteattr(language)} '
            f'action={quoteattr(action)} method="POST"/>')


def stream_verb(url: str, parameters: dict[str, str]) -> str:
    params = "".join(f"<Parameter name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in parameters.items())
    return f"<Connect><Stream url={quoteattr(url)}>{params}</Stream></Connect>"


def dial_verb(to: str, *, action: str, leg_callback: str, timeout_s: int, caller_id: str | None) -> str:
    """Cold transfer: dial `to` (a number or a sip: URI). `leg_callback` hears when the person
    answers; `action` gets the `DialCallStatus` when the dialed leg ends (or never connected)."""
    noun = "Sip" if to.lower().startswith(("sip:", "sips:")) else "Number"
    caller = f" callerId={quoteattr(caller_id)}" if caller_id and noun == "Number" else ""
    return (f'<Dial action={quoteattr(action)} method="POST" timeout="{timeout_s}" answerOnBridge="true"{caller}>'
            f'<{noun} statusCallback={quoteattr(leg_callback)} statusCallbackEvent="answered" '
            f'statusCallbackMethod="POST">{escape(to)}</{noun}></Dial>')


def conference_verb(name: str) -> str:
    """Warm transfer, the join: both legs into one conference that ends when either leaves."""
    return (f'<Dial><Conference startConferenceOnEnter="true" endConferenceOnExit="true" beep="false" '
            f'waitUrl="">{escape(name)}</Conference></Dial>')


# <Dial action> DialCallStatus -> the transfer's outcome (`completed`/`answered`: the person took it).
DIAL_OUTCOMES = {"completed": TransferOutcome.COMPLETED, "answered": TransferOutcome.COMPLETED,
                 "busy": TransferOutcome.BUSY, "no-answer": TransferOutcome.NO_ANSWER,
                 "failed": TransferOutcome.FAILED, "canceled": TransferOutcome.FAILED}


def dial_outcome(status: str | None) -> TransferOutcome:
    return DIAL_OUTCOMES.get((status or "").lower(), TransferOutcome.FAILED)


def transfer_event(call_id: str | None, outcome: TransferOutcome, key: str, error: str | None = None) -> CallEvent:
    """The outcome of a transfer of our call `call_id`. No provider id: the dialed leg's CallSid must
    not become the caller's call's id."""
    event = CallEvent(EventType.TRANSFER, call_id=call_id, outcome=outcome.value, error=error)
    event.dedupe_key = key
    return event


EMPTY_TWIML = twiml()
REJECT_TWIML = twiml("<Reject/>")
HANGUP_TWIML = twiml("<Hangup/>")


# ====================================================================== Media Streams codec


# How Twilio writes a media frame (top-level keys, media keys): read without the JSON parser when exactly so.
MEDIA_LAYOUT = (("sequenceNumber", "media", "streamSid"), ("track", "chunk", "timestamp", "payload"))


class TwilioStreamCodec(MediaStreamCodec):
    """Twilio's bidirectional Media Streams dialect (u-law 8 kHz, JSON text frames)."""

    reorders = False  # one TCP connection: frames arrive in order

    def __init__(self, *, fast_media: bool = True) -> None:
        self.stream_sid: str | None = None
        self._media_prefix = ""
        self._sid_json = ""
        self._fast = wire.MediaLayout(*MEDIA_LAYOUT) if fast_media else None

    def parse(self, text: str) -> StreamMessage:
        if self._fast is not None and self.stream_sid is not None:
            fields = self._fast.match(text)
            if fields is not None:
                return StreamMedia(*fields)
        event, msg = wire.json_frame(text)
        if event == "media":
            media = wire.section(msg, "media")
            return self._media(media.get("track", "inbound"), media.get("payload"), media.get("chunk"),
                               media.get("timestamp"), None)
        if event == "start":
            return self._start(msg)
        if event == "mark":
            return StreamMark(wire.mark_name(wire.section(msg, "mark").get("name")))
        if event == "dtmf":
            return StreamDtmf(wire.digit(wire.section(msg, "dtmf").get("digit")))
        if event == "stop":
            return StreamStop()
        return StreamIgnored(event)  # connected, and events Twilio may add later

    def _media(self, track: Any, payload: Any, chunk: Any, timestamp: Any, _sequence: Any) -> StreamMessage:
        if not wire.is_inbound(track):
            return StreamIgnored("media")
        if self.stream_sid is None:
            raise StreamProtocolError("media before start")
        return StreamMedia(wire.payload(payload), wire.optional_int(chunk, "media.chunk"),
                           wire.optional_int(timestamp, "media.timestamp"))

    def _start(self, msg: dict[str, Any]) -> StreamStart:
        start = wire.section(msg, "start")
        call_sid = start.get("callSid")
        stream_sid = start.get("streamSid") or msg.get("streamSid")
        if not isinstance(call_sid, str) or not call_sid or not isinstance(stream_sid, str) or not stream_sid:
            raise StreamProtocolError("start without callSid/streamSid")
        fmt = wire.optional_section(start, "mediaFormat")
        rate = wire.optional_int(fmt.get("sampleRate", 8000), "mediaFormat.sampleRate")
        if fmt and (fmt.get("encoding") != "audio/x-mulaw" or rate != 8000):
            raise StreamProtocolError(f"unsupported media format {fmt.get('encoding')}/{fmt.get('sampleRate')}")
        custom = {str(k): str(v) for k, v in wire.optional_section(start, "customParameters").items()}
        self.stream_sid = stream_sid
        self._sid_json = json.dumps(self.stream_sid)
        self._media_prefix = '{"event":"media","streamSid":' + self._sid_json + ',"media":{"payload":"'
        return StreamStart(provider_call_id=call_sid, stream_id=self.stream_sid, format=ULAW_8K,
                           token=custom.get("token"), call_id=custom.get("callId"), custom=custom)

    def encode_media(self, payload: bytes) -> str:
        return self._media_prefix + binascii.b2a_base64(payload, newline=False).decode("ascii") + '"}}'

    def encode_mark(self, name: str) -> str:
        return '{"event":"mark","streamSid":' + self._sid_json + ',"mark":{"name":' + json.dumps(name) + "}}"

    def encode_clear(self) -> str:
        return '{"event":"clear","streamSid":' + self._sid_json + "}"


# ====================================================================== callbacks


def verify_request(auth_token: str, request: WebhookRequest) -> WebhookVerdict:
    """X-Twilio-Signature over the public URL (or a port variant) and the form parameters."""
    signature = request.header(SIGNATURE_HEADER) or ""
    if not signature:
        return WebhookVerdict(ok=False, reason="missing X-Twilio-Signature")
    urls = [request.public_url, *request.url_variants]
    if not verify_twilio(auth_token, urls, request.form, signature, request.body):
        return WebhookVerdict(ok=False, reason="bad X-Twilio-Signature")
    return WebhookVerdict(ok=True, replay_key=twilio_replay_key(request.public_url, request.form, signature))


def status_events(request: WebhookRequest, call_id: str | None, sid: str | None, status: str) -> list[CallEvent]:
    """The events of a status callback (or of the voice URL's request), from CallStatus. (`AnsweredBy`
    is read from the asynchronous AMD callback only, `amd_events`.)"""

    def event(kind: EventType, **extra: Any) -> CallEvent:
        return lifecycle_event(kind, sid, call_id=call_id, **extra)

    if status in ("queued", "initiated"):
        return [event(EventType.INITIATED)]
    if status == "ringing":
        return [event(EventType.RINGING)]
    if status == "in-progress":
        return [event(EventType.ANSWERED)]
    if status in TERMINAL_STATUS:
        return [event(EventType.ENDED, reason=TERMINAL_STATUS[status])]
    return []


# AnsweredBy -> (verdict, end of greeting). machine_end_* come only with MachineDetection=DetectMessageEnd.
ANSWERED_BY: dict[str, tuple[AnsweredBy, str | None]] = {
    "human": ("human", None),
    "machine_start": ("machine", None),
    "machine_end_beep": ("machine", "beep"),
    "machine_end_silence": ("machine", "silence"),
    "machine_end_other": ("machine", "other"),
    "fax": ("machine", None),
    "unknown": ("unknown", None),
}


def amd_result(answered_by: str | None, duration_ms: str | None) -> MachineResult | None:
    """`AnsweredBy` (+ `MachineDetectionDuration`) of an asynchronous AMD callback, carrier-neutral;
    None for a value Twilio does not document."""
    value = (answered_by or "").strip().lower()
    if value not in ANSWERED_BY:
        return None
    verdict, greeting_end = ANSWERED_BY[value]
    try:
        decision_ms: int | None = max(0, int(float(duration_ms))) if duration_ms else None
    except ValueError:
        decision_ms = None
    return MachineResult(verdict, f"twilio:{value}", greeting_end, decision_ms)


def amd_events(request: WebhookRequest, call_id: str | None, sid: str | None) -> list[CallEvent]:
    """The asynchronous AMD callback (`AsyncAmdStatusCallback`): one `call.machine` event, applied
    once however often Twilio delivers it."""
    result = amd_result(request.param("AnsweredBy"), request.param("MachineDetectionDuration"))
    if result is None:
        return []
    return [lifecycle_event(EventType.MACHINE, sid, call_id=call_id, machine=result)]


def play_digits_verb(digits: str) -> str:
    """`<Play digits>`: DTMF tones on the call (`w` 0.5 s, `W` 1 s pauses)."""
    return f"<Play digits={quoteattr(digits)}/>"


def lifecycle_event(kind: EventType, sid: str | None, **fields: Any) -> CallEvent:
    """A call-progress event. Each happens once per call, so its key is the CallSid and the kind:
    the voice URL's ANSWERED after the `answered` callback (or a redelivery) is applied once."""
    event = CallEvent(kind, provider_call_id=sid, **fields)
    if sid:
        event.dedupe_key = f"twilio:{sid}:{kind.value}"
    return event


def inbound_events(request: WebhookRequest, sid: str, events: list[CallEvent]) -> list[CallEvent]:
    """The voice URL of a call to our number: the inbound call, answered by our TwiML (an ANSWERED
    for a call the policy refused is ignored), or ended if Twilio says so already."""
    ended = [e for e in events if e.type == EventType.ENDED]
    return [lifecycle_event(EventType.INITIATED, sid, direction=Direction.INBOUND, from_number=request.param("From"),
                            to_number=request.param("To")),
            *(ended or [lifecycle_event(EventType.ANSWERED, sid)])]


LIVE_STATUS = {"queued": CallState.INITIATED, "initiated": CallState.INITIATED, "ringing": CallState.RINGING,
                "in-progress": CallState.ANSWERED}


def direction(value: str | None) -> Direction | None:
    if not value:
        return None
    return Direction.INBOUND if value == "inbound" else Direction.OUTBOUND


def float_param(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


def say_voice(tts: dict[str, Any]) -> str:
    """The `<Say>` voice: a Polly voice named in the TTS config, or the seed's mapping of OpenAI voices."""
    provider = tts.get("provider")
    section = tts.get(provider) if isinstance(provider, str) else None
    voice = str(tts.get("voice") or (section.get("voice") if isinstance(section, dict) else "") or "")
    if voice.startswith("Polly."):
        return voice
    return POLLY_VOICES.get(voice, DEFAULT_VOICE)
