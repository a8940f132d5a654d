"""One conformance suite over every media-stream WebSocket codec (Twilio, Telnyx, Plivo).

Each dialect is described by golden frames in its own wire shape; every case then feeds the same
malformation to each codec and expects the same verdict: a StreamMessage, or StreamProtocolError
(the stream is closed). The verdicts are the ones written down in carriers/wire.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

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
)
from carriers.plivo.protocol import PlivoStreamCodec, encode_extra_headers
from carriers.telnyx.protocol import TelnyxStreamCodec, encode_state
from carriers.twilio.protocol import TwilioStreamCodec

AUDIO = bytes(range(160))
B64 = base64.b64encode(AUDIO).decode()


class _Omit:
    """A field left out of the frame (named in test ids: parallel workers must collect the same ids)."""

    def __repr__(self) -> str:
        return "OMIT"


OMIT = _Omit()


def _put(target: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    if value is not OMIT:
        target[key] = value
    return target


@dataclass(frozen=True)
class Dialect:
    name: str
    codec: Callable[[], MediaStreamCodec]
    start: dict[str, Any]
    media: Callable[[Any, Any], dict[str, Any]]  # (payload, chunk) -> frame
    dtmf: Callable[[Any], dict[str, Any]]
    mark: Callable[[Any], dict[str, Any]]
    provider_call_id: str
    # the sequence of a media frame without `chunk` (Telnyx falls back to its frame-level counter)
    fallback_sequence: int | None = None


TWILIO = Dialect(
    "twilio", TwilioStreamCodec,
    start={"event": "start", "sequenceNumber": "1", "streamSid": "MZ00000000000000000000000000000001",
           "start": {"accountSid": "AC0", "streamSid": "MZ00000000000000000000000000000001", "callSid": "CA7",
                     "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                            "channels": 1},
                     "customParameters": {"token": "tok", "callId": "c-1"}}},
    media=lambda payload, chunk: {"event": "media", "sequenceNumber": "3", "streamSid": "MZ1",
                                  "media": _put(_put({"track": "inbound", "timestamp": "20"}, "chunk", chunk),
                                                "payload", payload)},
    dtmf=lambda digit: {"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "4",
                        "dtmf": _put({"track": "inbound_track"}, "digit", digit)},
    mark=lambda name: {"event": "mark", "sequenceNumber": "5", "streamSid": "MZ1", "mark": _put({}, "name", name)},
    provider_call_id="CA7",
)

TELNYX = Dialect(
    "telnyx", TelnyxStreamCodec,
    start={"event": "start", "sequence_number": "1", "stream_id": "5e3b-stream",
           "start": {"call_control_id": "v3:ccid", "call_session_id": "sess", "from": "+15550001111",
                     "to": "+15550002222", "client_state": encode_state("c-1"),
                     "custom_parameters": {"token": "tok"},
                     "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}},
    media=lambda payload, chunk: {"event": "media", "sequence_number": "3", "stream_id": "5e3b-stream",
                                  "media": _put(_put({"track": "inbound", "timestamp": "20"}, "chunk", chunk),
                                                "payload", payload)},
    dtmf=lambda digit: {"event": "dtmf", "sequence_number": "4", "stream_id": "5e3b-stream",
                        "dtmf": _put({}, "digit", digit)},
    mark=lambda name: {"event": "mark", "sequence_number": "5", "stream_id": "5e3b-stream",
                       "mark": _put({}, "name", name)},
    provider_call_id="v3:ccid",
    fallback_sequence=3,
)

PLIVO = Dialect(
    "plivo", PlivoStreamCodec,
    start={"event": "start", "sequenceNumber": 1,
           "start": {"callId": "9f1c-call", "streamId": "77aa-stream", "accountId": "MA0", "tracks": ["inbound"],
                     "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}},
           "extra_headers": encode_extra_headers({"token": "tok", "callId": "c-1"})},
    media=lambda payload, chunk: {"event": "media", "sequenceNumber": 3, "streamId": "77aa-stream",
                                  "media": _put(_put({"track": "inbound", "timestamp": "1705312200020"},
                                                     "chunk", chunk), "payload", payload)},
    dtmf=lambda digit: {"event": "dtmf", "sequenceNumber": 4, "streamId": "77aa-stream",
                        "dtmf": _put({"track": "inbound"}, "digit", digit)},
    mark=lambda name: _put({"event": "playedStream", "sequenceNumber": 5, "streamId": "77aa-stream"}, "name", name),
    provider_call_id="9f1c-call",
)

DIALECTS = [TWILIO, TELNYX, PLIVO]
ids = [d.name for d in DIALECTS]


def started(dialect: Dialect) -> MediaStreamCodec:
    codec = dialect.codec()
    start = codec.parse(json.dumps(dialect.start))
    assert isinstance(start, StreamStart)
    assert (start.provider_call_id, start.token, start.call_id) == (dialect.provider_call_id, "tok", "c-1")
    return codec


def verdict(codec: MediaStreamCodec, frame: dict[str, Any] | str) -> StreamMessage | str:
    """The message, or "refused" when the codec closes the stream."""
    try:
        return codec.parse(frame if isinstance(frame, str) else json.dumps(frame))
    except StreamProtocolError:
        return "refused"


# ------------------------------------------------------------------ well-formed golden frames


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
def test_golden_frames(dialect: Dialect) -> None:
    codec = started(dialect)
    media = verdict(codec, dialect.media(B64, "7"))
    assert isinstance(media, StreamMedia) and media.payload == AUDIO and media.sequence == 7
    assert verdict(codec, dialect.media(B64, 8)) == StreamMedia(AUDIO, 8, media.timestamp_ms)
    assert verdict(codec, dialect.media(B64, OMIT)) == StreamMedia(AUDIO, dialect.fallback_sequence,
                                                                   media.timestamp_ms)
    assert verdict(codec, dialect.mark("m-1")) == StreamMark("m-1")
    assert verdict(codec, {"event": "stop"}) == StreamStop()
    assert verdict(codec, {"event": "somethingNew", "x": 1}) == StreamIgnored("somethingNew")


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
@pytest.mark.parametrize(("digit", "expected"), [("1", "1"), ("0", "0"), ("*", "*"), ("#", "#"), ("A", "A"),
                                                 ("d", "D")])
def test_dtmf_digits_taken(dialect: Dialect, digit: str, expected: str) -> None:
    assert verdict(started(dialect), dialect.dtmf(digit)) == StreamDtmf(expected)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the same malformation, the same verdict


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
@pytest.mark.parametrize("digit", ["12", "x", "", "E", " 1", 5, None, OMIT], ids=repr)
def test_dtmf_that_is_not_one_key_is_refused(dialect: Dialect, digit: Any) -> None:
    assert verdict(started(dialect), dialect.dtmf(digit)) == "refused"


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
@pytest.mark.parametrize("chunk", ["1.5", "x", "", True, 1.5, [1], {"n": 1}], ids=repr)
def test_non_integer_chunk_is_refused(dialect: Dialect, chunk: Any) -> None:
    assert verdict(started(dialect), dialect.media(B64, chunk)) == "refused"


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
@pytest.mark.parametrize("name", [5, 1.5, None, OMIT, ["m"], {"n": "m"}], ids=repr)
def test_mark_name_that_is_not_a_string_is_refused(dialect: Dialect, name: Any) -> None:
    assert verdict(started(dialect), dialect.mark(name)) == "refused"


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
@pytest.mark.parametrize("payload", ["not base64!", "QUJ", 5, None, OMIT], ids=repr)
def test_bad_media_payload_is_refused(dialect: Dialect, payload: Any) -> None:
    assert verdict(started(dialect), dialect.media(payload, "1")) == "refused"


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
@pytest.mark.parametrize("frame", ["{", "[]", "5", '"media"', "{}", '{"event": 5}', '{"event": ""}',
                                   '{"event": "media", "media": "x"}', '{"event": "media", "media": null}',
                                   '{"event": "dtmf", "dtmf": ["1"]}'], ids=repr)
def test_frames_that_break_the_protocol_are_refused(dialect: Dialect, frame: str) -> None:
    assert verdict(started(dialect), frame) == "refused"


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
def test_media_before_start_is_refused(dialect: Dialect) -> None:
    assert verdict(dialect.codec(), dialect.media(B64, "1")) == "refused"


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
def test_outbound_track_media_is_ignored(dialect: Dialect) -> None:
    frame = dialect.media(B64, "1")
    frame["media"]["track"] = "outbound"
    assert verdict(started(dialect), frame) == StreamIgnored("media")


@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
@pytest.mark.parametrize("damage", ["no section", "section not an object", "no call id", "rate not a number",
                                    "another rate"])
def test_bad_start_is_refused(dialect: Dialect, damage: str) -> None:
    frame = json.loads(json.dumps(dialect.start))
    start = frame["start"]
    fmt_key = next(k for k in start if k in ("mediaFormat", "media_format"))
    rate_key = next(k for k in start[fmt_key] if k in ("sampleRate", "sample_rate"))
    if damage == "no section":
        del frame["start"]
    elif damage == "section not an object":
        frame["start"] = "x"
    elif damage == "no call id":
        for key in ("callSid", "call_control_id", "callId"):
            start.pop(key, None)
    elif damage == "rate not a number":
        start[fmt_key][rate_key] = "8k"
    else:
        start[fmt_key][rate_key] = 16000
    assert verdict(dialect.codec(), frame) == "refused"


# ------------------------------------------------------------------ the JSON reader does not change a verdict

READERS = ["orjson", "stdlib"] if wire._fast_loads is not None else ["stdlib"]


def _extra(frame: dict[str, Any], literal: str) -> str:
    """The frame with an unused field holding a literal json.dumps would not write (NaN, Infinity)."""
    return '{"extra": ' + literal + ", " + json.dumps(frame)[1:]


EDGE_FRAMES: dict[str, tuple[Callable[[Dialect], str], str]] = {
    # name: (frame, what the stdlib reader says: "media" / "mark" / "dtmf" / "refused")
    "nan": (lambda d: _extra(d.media(B64, 7), "NaN"), "media"),  # not RFC JSON; json takes it, orjson not
    "infinity": (lambda d: _extra(d.dtmf("5"), "Infinity"), "dtmf"),
    "surrogate": (lambda d: json.dumps(d.mark("\ud800")), "mark"),  # a lone surrogate: orjson refuses it
    "int64-max": (lambda d: json.dumps(d.media(B64, 2**63 - 1)), "media"),
    "int64-over": (lambda d: json.dumps(d.media(B64, 2**63)), "refused"),
    "huge-int": (lambda d: json.dumps(d.media(B64, 10**30)), "refused"),  # orjson: a float
    "huge-int-string": (lambda d: json.dumps(d.media(B64, str(10**30))), "refused"),
    "trailing": (lambda d: json.dumps(d.media(B64, 7)) + " x", "refused"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("dialect", DIALECTS, ids=ids)
@pytest.mark.parametrize("case", list(EDGE_FRAMES))
def test_json_reader_gives_the_same_verdicts(dialect: Dialect, reader: str, case: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    build, kind = EDGE_FRAMES[case]
    frame = build(dialect)
    if reader == "stdlib":
        monkeypatch.setattr(wire, "_fast_loads", None)
    got = verdict(started(dialect), frame)
    expected = {"media": StreamMedia, "mark": StreamMark, "dtmf": StreamDtmf}.get(kind)
    assert (got == "refused") if expected is None else isinstance(got, expected), (case, got)
