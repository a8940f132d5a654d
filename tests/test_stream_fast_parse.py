"""The fast `media` frame reader (carriers/wire.py MediaLayout) gives exactly the full parse's verdicts.

Each carrier codec reads a media frame written in its carrier's exact layout by slicing, and every
other frame through the JSON parser. Here the same generated frames (canonical, reordered, with
extra keys, whitespace, escapes, odd values, truncated, bad base64, before `start`) go to a codec
with the fast reader and to one without it, and the verdicts must be equal: the same StreamMedia,
or the same StreamProtocolError message (the stream's close reason).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carriers import wire
from carriers.base import MediaStreamCodec, StreamMedia, StreamProtocolError
from carriers.plivo.protocol import MEDIA_LAYOUT as PLIVO_LAYOUT
from carriers.plivo.protocol import PlivoStreamCodec
from carriers.telnyx.protocol import MEDIA_LAYOUT as TELNYX_LAYOUT
from carriers.telnyx.protocol import TelnyxStreamCodec
from carriers.twilio.protocol import MEDIA_LAYOUT as TWILIO_LAYOUT
from carriers.twilio.protocol import TwilioStreamCodec

STARTS = {
    "twilio": {"event": "start", "start": {"callSid": "CA7", "streamSid": "MZ1"}},
    "telnyx": {"event": "start", "stream_id": "s-1", "start": {"call_control_id": "v3:cc"}},
    "plivo": {"event": "start", "start": {"callId": "c-9", "streamId": "s-9"}},
}
CODECS: dict[str, Callable[..., MediaStreamCodec]] = {
    "twilio": TwilioStreamCodec, "telnyx": TelnyxStreamCodec, "plivo": PlivoStreamCodec}
LAYOUTS = {"twilio": TWILIO_LAYOUT, "telnyx": TELNYX_LAYOUT, "plivo": PLIVO_LAYOUT}
IDS = {"twilio": "MZ1", "telnyx": "s-1", "plivo": "s-9"}


def codec(carrier: str, *, fast: bool, started: bool = True) -> MediaStreamCodec:
    c = CODECS[carrier](fast_media=fast)
    if started:
        c.parse(json.dumps(STARTS[carrier]))
    return c


def verdict(c: MediaStreamCodec, text: str) -> Any:
    try:
        msg = c.parse(text)
    except StreamProtocolError as exc:
        return ("refused", str(exc))
    return msg


def canonical(carrier: str, payload: Any = None, chunk: Any = "7", timestamp: Any = "140", seq: Any = "9",
              track: Any = "inbound") -> dict[str, Any]:
    """A media frame with the carrier's keys in the carrier's order."""
    top, media_keys = LAYOUTS[carrier]
    media_values = {"track": track, "chunk": chunk, "timestamp": timestamp,
                    "payload": base64.b64encode(bytes(range(160))).decode() if payload is None else payload}
    media = {k: media_values[k] for k in media_keys}
    frame: dict[str, Any] = {"event": "media"}
    for key in top:
        frame[key] = media if key == "media" else (seq if "equence" in key else IDS[carrier])
    return frame


def dumps(frame: Any) -> str:
    return json.dumps(frame, separators=(",", ":"))


@pytest.mark.parametrize("carrier", ["twilio", "telnyx", "plivo"])
def test_the_carriers_own_frames_take_the_fast_path_and_give_the_same_media(carrier: str) -> None:
    text = dumps(canonical(carrier))
    layout = wire.MediaLayout(*LAYOUTS[carrier])
    assert layout.match(text) == (bytes(range(160)), 7, 140)  # read without the JSON parser
    fast, slow = verdict(codec(carrier, fast=True), text), verdict(codec(carrier, fast=False), text)
    assert fast == slow == StreamMedia(bytes(range(160)), 7, 140)
    # Plivo writes sequence and chunk as JSON numbers
    text = dumps(canonical(carrier, chunk=41, seq=42, timestamp="1705312200000"))
    assert layout.match(text) == (bytes(range(160)), 41, 1705312200000)


@pytest.mark.parametrize("text", [
    '{"event": "media", "sequenceNumber": "9", "media": {"track": "inbound", "chunk": "7", "timestamp": "1", "payload": "AAAA"}, "streamSid": "MZ1"}',
    '{"event":"media","sequenceNumber":"9","media":{"track":"inbound","chunk":"7","timestamp":"1","payload":"AA\\/A"},"streamSid":"MZ1"}',
    '{"event":"media","sequenceNumber":"9","media":{"track":"outbound","chunk":"7","timestamp":"1","payload":"AAAA"},"streamSid":"MZ1"}',
    '{"event":"media","sequenceNumber":"9","media":{"track":"inbound","chunk":"07.5","timestamp":"1","payload":"AAAA"},"streamSid":"MZ1"}',
    '{"event":"media","sequenceNumber":"9","media":{"track":"inbound","chunk":07,"timestamp":"1","payload":"AAAA"},"streamSid":"MZ1"}',
    '{"event":"media","sequenceNumber":"9","media":{"track":"inbound","chunk":"7","timestamp":"1","payload":"AAA"},"streamSid":"MZ1"}',
    '{"event":"media","sequenceNumber":"9","media":{"track":"inbound","chunk":"7","timestamp":"1","payload":"AAAA"},"streamSid":"MZ1","x":1}',
    '{"event":"media","sequenceNumber":"9","media":{"track":"inbound","chunk":"7","timestamp":"1","payload":"AAAA"},"streamSid":"MZ\\u0031"}',
])
def test_anything_else_is_left_to_the_full_parse(text: str) -> None:
    assert wire.MediaLayout(*TWILIO_LAYOUT).match(text) is None
    assert verdict(codec("twilio", fast=True), text) == verdict(codec("twilio", fast=False), text)


B64 = st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())
ODD_STRINGS = st.sampled_from(["", "-1", "1e3", "0x10", "07", " 7", "7 ", "١٢", "99999999999999999999", "9" * 18,
                               "9" * 19, "inbound", "inbound_track", "outbound", "\\", "\"", "\u0000", "é", "\ud800"])
ODD_VALUES = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64).map(str), st.integers(min_value=-(2**64), max_value=2**64),
    ODD_STRINGS, st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.text(max_size=8))
# what carriers send: digits as strings or numbers, up to 64 bits and past
NUMBERS = st.one_of(st.integers(0, 10**20).map(str), st.integers(0, 10**20),
                    st.integers(0, 999).map(lambda n: f"{n:05d}"))
TRACKS = st.sampled_from(["inbound", "inbound_track", "outbound", "outbound_track"])
PAYLOADS = st.one_of(B64.map(lambda s: s.replace("/", "\\/")), B64.map(lambda s: s[:-1]),
                     B64.map(lambda s: s + "\n"), B64.map(lambda s: " " + s), B64.map(lambda s: s + "=="))


def sometimes(draw: st.DrawFn) -> bool:
    return draw(st.integers(0, 5)) == 5  # hypothesis leans to 0: the rare case is the large end


@st.composite
def frames(draw: st.DrawFn, carrier: str) -> str:
    def value(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(odd, ODD_VALUES) if sometimes(draw) else usual)

    frame = canonical(carrier, payload=value(B64, PAYLOADS), chunk=value(NUMBERS, NUMBERS),
                      timestamp=value(NUMBERS, NUMBERS), track=value(st.just("inbound"), TRACKS))
    media = frame["media"]
    if sometimes(draw):
        del media[draw(st.sampled_from(sorted(media)))]
    for key in [k for k in frame if k not in ("event", "media")]:
        if sometimes(draw):
            frame[key] = draw(ODD_VALUES)
    if sometimes(draw):
        frame[draw(st.sampled_from(["x", "event", "media2"]))] = draw(ODD_VALUES)
    if sometimes(draw):
        frame["event"] = draw(st.sampled_from(["Media", "media ", "mark", ""]))
    if sometimes(draw):  # another key order
        frame = dict(draw(st.permutations(list(frame.items()))))
    if sometimes(draw):
        frame["media"] = dict(draw(st.permutations(list(media.items()))))
    style = draw(st.sampled_from(["compact", "compact", "compact", "compact", "spaced", "ascii", "unicode"]))
    if style == "compact":
        text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False)
    elif style == "spaced":
        text = json.dumps(frame)
    elif style == "ascii":
        text = json.dumps(frame, separators=(",", ":"))
    else:
        text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False).replace("\\/", "/")
    cut = draw(st.sampled_from([None] * 7 + ["truncate", "append", "escape"]))
    if cut == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif cut == "append":
        text += draw(st.sampled_from(["}", " ", "\n", ",", "x"]))
    elif cut == "escape":  # one character of the text written as a JSON escape
        at = text.find('"payload":"')
        if at >= 0 and len(text) > at + 12:
            text = text[: at + 11] + f"\\u{ord(text[at + 11]):04x}" + text[at + 12 :]
    return text


@pytest.mark.parametrize("carrier", ["twilio", "telnyx", "plivo"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_and_full_parse_give_the_same_verdict(carrier: str, data: st.DataObject) -> None:
    text = data.draw(frames(carrier))
    started = data.draw(st.integers(0, 9)) < 9
    assert verdict(codec(carrier, fast=True, started=started), text) == \
        verdict(codec(carrier, fast=False, started=started), text)


@pytest.mark.parametrize("carrier", ["twilio", "telnyx", "plivo"])
def test_a_stream_of_frames_keeps_the_same_verdicts_when_its_id_changes(carrier: str) -> None:
    """The reader remembers the last frame's ending (the stream id): a frame with another ending is
    read again in full, not compared against the remembered one."""
    fast, slow = codec(carrier, fast=True), codec(carrier, fast=False)
    texts = [dumps(canonical(carrier, chunk=str(k))) for k in range(3)]
    other = canonical(carrier)
    other[next(k for k in LAYOUTS[carrier][0] if k not in ("media",) and "equence" not in k)] = "other-id"
    texts += [dumps(other), dumps(canonical(carrier, chunk="5")),
              dumps(canonical(carrier)).replace('"}', '\\u0022}', 1)]
    for text in texts:
        assert verdict(fast, text) == verdict(slow, text)
