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

from bridge.calls import CallState, Direction
from bridge.security import telnyx_replay_key
from bridge.signatures import verify_telnyx
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
from media import g711
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
DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")
MACHINE_RESULTS = frozenset({"machine", "fax_detected"})


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


class TelnyxStreamCodec(MediaStreamCodec):
    """Telnyx media streaming (snake_case frames, `stream_id`, PCMU or PCMA, frames not in order)."""

    reorders: ClassVar[bool] = True

    def __init__(self, declared_codec: Callable[[str], str | None] = lambda _: None) -> None:
        self._declared_codec = declared_codec
        self._token: str | None = None
        self.stream_id: str | None = None
        self.format: AudioFormat | None = None
        self._out_format: AudioFormat | None = None  # set when Telnyx expects another codec back

    def parse(self, text: str) -> StreamMessage:
        try:
            msg = json.loads(text)
        except ValueError:
            raise StreamProtocolError("frame is not JSON") from None
        if not isinstance(msg, dict):
            raise StreamProtocolError("frame is not a JSON object")
        event = msg.get("event")
        if event == "media":
            return self._media(msg)
        if event == "connected":
            token = msg.get(STREAM_TOKEN_HEADER)
            if isinstance(token, str) and token:
                self._token = token
            return StreamIgnored("connected")
        if event == "start":
            return self._start(msg)
        if event == "dtmf":
            digit = _section(msg, "dtmf").get("digit")
            if not isinstance(digit, str) or len(digit) != 1 or digit not in DTMF_DIGITS:
                raise StreamProtocolError("dtmf frame without a valid digit")
            return StreamDtmf(digit.upper())
        if event == "mark":
            name = _section(msg, "mark").get("name")
            if not isinstance(name, str):
                raise StreamProtocolError("mark frame without a name")
            return StreamMark(name)
        if event == "stop":
            return StreamStop()
        if event == "error":
            detail = _dict(msg.get("payload"))
            log.warning("telnyx stream error: %s %s", detail.get("code", ""), detail.get("title", ""))
            return StreamIgnored("error")
        if not isinstance(event, str):
            raise StreamProtocolError("frame without an event")
        return StreamIgnored(event)

    def _start(self, msg: dict[str, Any]) -> StreamStart:
        start = _section(msg, "start")
        ccid = start.get("call_control_id")
        if not isinstance(ccid, str) or not ccid:
            raise StreamProtocolError("start frame without call_control_id")
        media_format = _dict(start.get("media_format"))
        encoding = str(media_format.get("encoding") or "PCMU").upper()
        rate = media_format.get("sample_rate", 8000)
        if encoding not in CODECS or str(rate) != "8000":
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

    def _media(self, msg: dict[str, Any]) -> StreamMessage:
        if self.format is None:
            raise StreamProtocolError("media before start")
        media = _section(msg, "media")
        if media.get("track", "inbound") not in ("inbound", "inbound_track"):
            return StreamIgnored("media")
        raw = media.get("payload")
        if not isinstance(raw, str):
            raise StreamProtocolError("media frame without a payload")
        try:
            payload = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise StreamProtocolError("media payload is not base64") from None
        # `media.chunk` counts media frames only; `sequence_number` counts every frame (a dtmf or
        # mark frame leaves a hole the reorder buffer would wait on), so chunk is preferred.
        sequence = _int(media.get("chunk"))
        if sequence is None:
            sequence = _int(msg.get("sequence_number"))
        return StreamMedia(payload, sequence, _int(media.get("timestamp")))

    def encode_media(self, payload: bytes) -> str:
        if self._out_format is not None and self.format is not None:
            payload = g711.encode(g711.decode(payload, self.format.encoding), self._out_format.encoding)
        return json.dumps({"event": "media", "media": {"payload": base64.b64encode(payload).decode("ascii")}})

    def encode_mark(self, name: str) -> str:
        return json.dumps({"event": "mark", "mark": {"name": name}})

    def encode_clear(self) -> str:
        return json.dumps({"event": "clear"})


def _section(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise StreamProtocolError(f"{msg.get('event')} frame without {key!r}")
    return value


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _custom_parameters(value: Any) -> dict[str, str]:
    """Custom parameters as sent back in `start`: a mapping, or `[{name, value}]` as configured."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        return {str(p["name"]): str(p.get("value", "")) for p in value if isinstance(p, dict) and "name" in p}
    return {}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def verify_request(public_key: Ed25519PublicKey, request: WebhookRequest, now: float) -> WebhookVerdict:
    """Ed25519 over `timestamp|body`, the timestamp within five minutes of `now`."""
    signature = request.headers.get(SIGNATURE_HEADER, "")
    timestamp = request.headers.get(TIMESTAMP_HEADER, "")
    ok, reason = verify_telnyx(public_key, signature, timestamp, request.body, now=now)
    if not ok:
        return WebhookVerdict(ok=False, reason=reason)
    return WebhookVerdict(ok=True, replay_key=telnyx_replay_key(timestamp, signature, request.body))
