"""Telnyx Call Control v2 wire protocol, sans-I/O: `client_state`, webhook events and end
reasons, the signature check, REST error shapes, and the media-stream frame codec. No sockets, no
clock (the caller passes `now`), no per-call state."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bridge.calls import CallEvent, CallState, Direction, EventType, MachineResult, TransferOutcome
from carriers import wire
from carriers.base import (
    CallGone,
    CallLookup,
    MediaStreamCodec,
    SpeechHeard,
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
from carriers.signatures import telnyx_replay_key, verify_telnyx
from media import g711
from media.amd import AnsweredBy
from media.formats import ALAW_8K, ULAW_8K, AudioFormat

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"
STREAM_TOKEN_HEADER = "x-telnyx-streaming-auth-token"
ALREADY_ENDED_CODE = "90018"
DEFAULT_VOICE = "AWS.Polly.Joanna-Neural"
DEFAULT_LANGUAGE = "en-US"
SPEAK_MAX_CHARS = 3000  # Telnyx `speak` payload limit
CODECS: dict[str, AudioFormat] = {"PCMU": ULAW_8K, "PCMA": ALAW_8K}
# Answering-machine webhooks -> verdict (`…detection.ended`) or end of greeting (`…greeting.ended`).
AMD_VERDICTS: dict[str, dict[str, AnsweredBy]] = {
    "call.machine.detection.ended": {"human": "human", "machine": "machine", "not_sure": "unknown"},
    "call.machine.premium.detection.ended": {"human_residence": "human", "human_business": "human",
                                             "machine": "machine", "fax_detected": "machine",
                                             "silence": "unknown", "not_sure": "unknown"},
}
AMD_GREETING_ENDS = {
    "call.machine.greeting.ended": {"beep_detected": "beep", "ended": "silence", "not_sure": "other"},
    "call.machine.premium.greeting.ended": {"beep_detected": "beep", "no_beep_detected": "other"},
}


def amd_result(event_type: str, result: str) -> MachineResult | None:
    """One answering-machine webhook, carrier-neutral; None for a result Telnyx does not document."""
    short = event_type.removeprefix("call.machine.").replace(".ended", "")
    verdicts = AMD_VERDICTS.get(event_type)
    if verdicts is not None:
        verdict = verdicts.get(result)
        return MachineResult(verdict, f"telnyx:{short}:{result}") if verdict else None
    ends = AMD_GREETING_ENDS.get(event_type, {})
    greeting_end = ends.get(result)
    return MachineResult(None, f"telnyx:{short}:{result}", greeting_end) if greeting_end else None
XFER_TAG = "xfer"  # client_state tag of the person's leg of a cold transfer (target_leg_client_state)


def encode_state(call_id: str, tag: str | None = None) -> str:
    """`client_state`: base64 of our callId, optionally followed by a space and a tag (which
    command a later webhook answers: `speak-3`, `listen:<turn token>`)."""
    text = call_id if tag is None else f"{call_id} {tag}"
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode_state(state: Any) -> tuple[str | None, str | None]:
    """(callId, tag) from a `client_state` we set; (None, None) for anything else."""
    if not isinstance(state, str) or not state or len(state) > 1024:
        return None, None
    try:
        text = base64.b64decode(state, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None, None
    call_id, _, tag = text.partition(" ")
    if not call_id or len(call_id) > 128 or not call_id.isprintable():
        return None, None
    return call_id, tag or None


def choose_codec(configured: str | None, offered: Any = None) -> str:
    """PCMU or PCMA: the configured one, else the first G.711 codec the caller offered (EU legs
    offer PCMA first), else PCMU."""
    if configured:
        return configured
    if isinstance(offered, str):
        for name in offered.split(","):
            codec = name.strip().upper()
            if codec in CODECS:
                return codec
    return "PCMU"


_CAUSES: dict[str, CallState] = {
    "normal_clearing": CallState.COMPLETED,
    "originator_cancel": CallState.HANGUP_BOT,
    "user_busy": CallState.BUSY,
    "call_rejected": CallState.BUSY,
    "no_answer": CallState.NO_ANSWER,
    "timeout": CallState.NO_ANSWER,
    "time_limit": CallState.TIMEOUT,
    "not_found": CallState.FAILED,
}


def end_reason(cause: Any, source: Any, direction: Direction | None) -> CallState:
    """`call.hangup` -> end reason. Where `hangup_source` tells who hung up a normal call, that
    wins: the person is the `caller` of an inbound call and the `callee` of one we dialed."""
    cause = str(cause or "").lower()
    if cause in ("normal_clearing", "originator_cancel", "unspecified", "") and direction is not None:
        user_side = "caller" if direction == Direction.INBOUND else "callee"
        if source == user_side:
            return CallState.HANGUP_USER
        if source in ("caller", "callee"):
            return CallState.HANGUP_BOT
    return _CAUSES.get(cause, CallState.COMPLETED)


def errors_of(body: Any) -> list[dict[str, Any]]:
    errors = body.get("errors") if isinstance(body, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def is_already_ended(status: int, body: Any) -> bool:
    """Telnyx answers a command on a finished call with 422 code 90018 (404 for an unknown id)."""
    if status == 404:
        return True
    return status == 422 and any(str(e.get("code")) == ALREADY_ENDED_CODE for e in errors_of(body))


def split_text(text: str, limit: int = SPEAK_MAX_CHARS) -> list[str]:
    """Pieces of at most `limit` characters, cut at the last sentence end or space before it."""
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[:limit]
        cut = max(window.rfind(". "), window.rfind("? "), window.rfind("! "))
        cut = cut + 1 if cut > 0 else window.rfind(" ")
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces


@dataclass(slots=True)
class TelnyxEvent:
    """The fields of one webhook the carrier reads (`data` of the JSON body)."""

    event_type: str
    event_id: str | None
    payload: dict[str, Any]

    @classmethod
    def from_body(cls, body: bytes) -> TelnyxEvent:
        doc = json.loads(body)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("event_type"), str):
            raise TypeError("no data.event_type")
        payload = data.get("payload")
        if not isinstance(payload, dict):
            raise TypeError("no data.payload")
        event_id = data.get("id")
        return cls(data["event_type"], str(event_id) if event_id else None, payload)


# ------------------------------------------------------------------ media stream codec


# How Telnyx writes a media frame (top-level keys, media keys): read without the JSON parser when exactly so.
MEDIA_LAYOUT = (("sequence_number", "media", "stream_id"), ("track", "chunk", "timestamp", "payload"))


class TelnyxStreamCodec(MediaStreamCodec):
    """Telnyx media streaming (snake_case frames, `stream_id`, PCMU or PCMA, frames not in order)."""

    reorders: ClassVar[bool] = True

    def __init__(self, declared_codec: Callable[[str], str | None] = lambda _: None, *, fast_media: bool = True) -> None:
        self._declared_codec = declared_codec
        self._fast = wire.MediaLayout(*MEDIA_LAYOUT) if fast_media else None
        self._token: str | None = None
        self.stream_id: str | None = None
        self.format: AudioFormat | None = None
        self._out_format: AudioFormat | None = None  # set when Telnyx expects another codec back

    def parse(self, text: str) -> StreamMessage:
        if self._fast is not None and self.format is not None:
            fields = self._fast.match(text)
            if fields is not None:
                return StreamMedia(*fields)
        event, msg = wire.json_frame(text)
        if event == "media":
            media = wire.section(msg, "media")
            return self._media(media.get("track", "inbound"), media.get("payload"), media.get("chunk"),
                               media.get("timestamp"), msg.get("sequence_number"))
        if event == "connected":
            token = msg.get(STREAM_TOKEN_HEADER)
            if isinstance(token, str) and token:
                self._token = token
            return StreamIgnored("connected")
        if event == "start":
            return self._start(msg)
        if event == "dtmf":
            return StreamDtmf(wire.digit(wire.section(msg, "dtmf").get("digit")))
        if event == "mark":
            return StreamMark(wire.mark_name(wire.section(msg, "mark").get("name")))
        if event == "stop":
            return StreamStop()
        if event == "error":
            detail = _dict(msg.get("payload"))
            log.warning("telnyx stream error: %s %s", detail.get("code", ""), detail.get("title", ""))
            return StreamIgnored("error")
        return StreamIgnored(event)

    def _start(self, msg: dict[str, Any]) -> StreamStart:
        start = wire.section(msg, "start")
        ccid = start.get("call_control_id")
        if not isinstance(ccid, str) or not ccid:
            raise StreamProtocolError("start frame without call_control_id")
        media_format = wire.optional_section(start, "media_format")
        encoding = str(media_format.get("encoding") or "PCMU").upper()
        rate = wire.optional_int(media_format.get("sample_rate", 8000), "media_format.sample_rate")
        if encoding not in CODECS or rate != 8000:
            raise StreamProtocolError(f"unsupported media format {encoding}/{rate}")
        self.format = CODECS[encoding]
        declared = self._declared_codec(ccid)
        if declared in CODECS and declared != encoding:
            # Telnyx streams the call's own codec when it cannot transcode; what we send back must
            # still be in the codec we declared for bidirectional RTP, or the caller hears static.
            log.warning("telnyx stream is %s but %s was declared for playback; transcoding", encoding, declared)
            self._out_format = CODECS[declared]
        self.stream_id = str(msg.get("stream_id") or start.get("stream_id") or "") or None
        custom = _custom_parameters(start.get("custom_parameters"))
        call_id, _ = decode_state(start.get("client_state"))
        return StreamStart(
            provider_call_id=ccid,
            stream_id=self.stream_id or "",
            format=self.format,
            token=self._token or custom.get("token"),
            call_id=call_id,
            custom=custom,
        )

    def _media(self, track: Any, payload: Any, chunk: Any, timestamp: Any, sequence_number: Any) -> StreamMessage:
        if not wire.is_inbound(track):
            return StreamIgnored("media")
        if self.format is None:
            raise StreamProtocolError("media before start")
        audio = wire.payload(payload)
        # `media.chunk` counts media frames only; `sequence_number` counts every frame (a dtmf or
        # mark frame leaves a hole the reorder buffer would wait on), so chunk is preferred.
        sequence = wire.optional_int(chunk, "media.chunk")
        if sequence is None:
            sequence = wire.optional_int(sequence_number, "sequence_number")
        return StreamMedia(audio, sequence, wire.optional_int(timestamp, "media.timestamp"))

    def encode_media(self, payload: bytes) -> str:
        if self._out_format is not None and self.format is not None:
            payload = g711.encode(g711.decode(payload, self.format.encoding), self._out_format.encoding)
        # the bytes json.dumps gives for this fixed shape, without building and walking a dict per frame
        return '{"event": "media", "media": {"payload": "' + binascii.b2a_base64(payload, newline=False).decode("ascii") + '"}}'

    def encode_mark(self, name: str) -> str:
        return json.dumps({"event": "mark", "mark": {"name": name}})

    def encode_clear(self) -> str:
        return json.dumps({"event": "clear"})


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _custom_parameters(value: Any) -> dict[str, str]:
    """Custom parameters as sent back in `start`: a mapping, or `[{name, value}]` as configured."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        return {str(p["name"]): str(p.get("value", "")) for p in value if isinstance(p, dict) and "name" in p}
    return {}


def verify_request(public_key: Ed25519PublicKey, request: WebhookRequest, now: float) -> WebhookVerdict:
    """Ed25519 over `timestamp|body`, the timestamp within five minutes of `now`."""
    signature = request.header(SIGNATURE_HEADER) or ""
    timestamp = request.header(TIMESTAMP_HEADER) or ""
    ok, reason = verify_telnyx(public_key, signature, timestamp, request.body, now=now)
    if not ok:
        return WebhookVerdict(ok=False, reason=reason)
    return WebhookVerdict(ok=True, replay_key=telnyx_replay_key(timestamp, signature, request.body))


# ------------------------------------------------------------------ webhook -> event + effects


@dataclass(frozen=True, slots=True)
class InboundOffered:
    """An inbound call offered these codecs (the answer's stream codec is chosen from them)."""

    ccid: str
    offered_codecs: str


Effect = InboundOffered | CallGone | SpeechHeard


def translate(hook: TelnyxEvent, query_call_id: str | None,
              calls: CallLookup) -> tuple[CallEvent | None, list[Effect]]:
    """One webhook -> the normalized event (or None) and the carrier's follow-ups. Pure: `calls`
    is only read. A redelivery (same `data.id`) gives the same event key, so the manager applies
    it once and its effects are not run again."""
    p = hook.payload
    ccid = p.get("call_control_id") if isinstance(p.get("call_control_id"), str) else None
    state_call_id, tag = decode_state(p.get("client_state"))
    call_id = query_call_id or state_call_id
    kind = hook.event_type

    def event(etype: EventType, **fields: Any) -> CallEvent:
        ev = CallEvent(etype, call_id=call_id, provider_call_id=ccid, **fields)
        if hook.event_id:
            ev.dedupe_key = f"telnyx:{hook.event_id}"
        return ev

    if tag == XFER_TAG:  # the person's leg of a cold transfer of our call `call_id`
        return _transfer_event(kind, p, call_id, ccid), []
    if kind == "call.initiated":
        if p.get("direction") != "incoming":
            return event(EventType.INITIATED), []
        if ccid is None:
            return None, []
        return (event(EventType.INITIATED, direction=Direction.INBOUND, from_number=_text(p.get("from")),
                      to_number=_text(p.get("to"))),
                [InboundOffered(ccid, _text(p.get("offered_codecs")))])
    if kind == "call.answered":
        return event(EventType.ANSWERED), []
    if kind == "call.bridged":
        return event(EventType.ACTIVE), []
    if kind == "call.hangup":
        call = calls.find_call(call_id, ccid) if call_id or ccid else None
        direction = call.direction if call is not None else None
        reason = end_reason(p.get("hangup_cause"), p.get("hangup_source"), direction)
        return event(EventType.ENDED, reason=reason), [CallGone(provider_call_id=ccid)] if ccid else []
    if kind == "call.dtmf.received":
        call = calls.find_call(call_id, ccid) if call_id or ccid else None
        if call is not None and call.media_attached:
            return None, []  # the media stream reports the same key press (and in-band detection dedupes it)
        digit = _text(p.get("digit"))
        return (event(EventType.DTMF, digits=digit) if digit else None), []
    if kind == "call.transcription":
        return _speech(p, tag, event), []
    if kind == "call.speak.ended":
        return None, [SpeechHeard(tag, provider_call_id=ccid, status=str(p.get("status") or "completed"))]
    if kind in AMD_VERDICTS or kind in AMD_GREETING_ENDS:
        result = amd_result(kind, _text(p.get("result")))
        return (event(EventType.MACHINE, machine=result) if result is not None else None), []
    if kind == "streaming.failed":
        log.warning("telnyx streaming failed on %s: %s", ccid, _text(p.get("failure_reason")) or "no reason")
    return None, []


# `call.hangup` of the person's leg before it connected -> the transfer's outcome
_TRANSFER_CAUSES = {"user_busy": TransferOutcome.BUSY, "timeout": TransferOutcome.NO_ANSWER,
                    "no_answer": TransferOutcome.NO_ANSWER, "call_rejected": TransferOutcome.REFUSED}


def _transfer_event(kind: str, p: dict[str, Any], call_id: str | None, ccid: str | None) -> CallEvent | None:
    """Leg B of `actions/transfer`: answered or bridged = completed; hung up first = why. The event is
    about the caller's call and carries no provider id (leg B's id must not become the caller's)."""
    if kind in ("call.answered", "call.bridged"):
        outcome, error = TransferOutcome.COMPLETED, None
    elif kind == "call.hangup":
        cause = _text(p.get("hangup_cause"))
        outcome, error = _TRANSFER_CAUSES.get(cause, TransferOutcome.FAILED), f"hangup_cause {cause or 'unknown'}"
    else:
        return None
    event = CallEvent(EventType.TRANSFER, call_id=call_id, outcome=outcome.value, error=error)
    # one outcome per leg: the second of answered/bridged, or the hang-up after it, is a duplicate
    event.dedupe_key = f"telnyx:xfer:{ccid}:{'completed' if outcome == TransferOutcome.COMPLETED else 'ended'}"
    return event


def _speech(p: dict[str, Any], tag: str | None, event: Callable[..., CallEvent]) -> CallEvent | None:
    data = p.get("transcription_data")
    if not isinstance(data, dict) or data.get("transcription_track", "inbound") != "inbound":
        return None
    transcript = _text(data.get("transcript")).strip()
    if not transcript:
        return None
    confidence = data.get("confidence")
    token = tag.removeprefix("listen:") if tag and tag.startswith("listen:") else None
    return event(EventType.SPEECH, transcript=transcript, is_final=data.get("is_final", True) is not False,
                 confidence=float(confidence) if isinstance(confidence, int | float) else None,
                 turn_token=token)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
