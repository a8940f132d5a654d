"""Shared readers for the carriers' JSON media-stream dialects (sans-I/O).

Every WebSocket codec (Twilio, Telnyx, Plivo) reads its frames with these, so the same malformed
frame gets the same verdict everywhere (tests/test_stream_conformance.py): a frame that breaks
the protocol raises StreamProtocolError and the stream is closed; a well-formed frame of a kind we
do not use is ignored.

Verdicts: not JSON, not an object, no string `event`: refused. A section (`media`, `dtmf`, ...)
that is not an object: refused. A DTMF digit that is not exactly one of 0-9 * # A-D: refused
(a-d is taken as A-D). A sequence/chunk/timestamp that is present but not an integer (an int, or
a string of decimal digits, within 64 bits): refused. A payload that is not strict base64: refused. A mark name
that is not a string: refused (we only ever send string names).
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from carriers.base import StreamProtocolError
from media.dtmf import DtmfDigit, dtmf_digit

_fast_loads: Callable[[str], Any] | None
try:
    from orjson import loads as _fast_loads  # 2-3x json.loads on a media frame (bench/README.md)
except ImportError:  # pragma: no cover - the `fast` extra is not installed
    _fast_loads = None


def _loads(text: str) -> Any:
    if _fast_loads is not None:
        try:
            return _fast_loads(text)
        except ValueError:
            pass  # orjson refuses what json takes (NaN, lone surrogates): the stdlib gives the verdict
    return json.loads(text)


def json_frame(text: str) -> tuple[str, dict[str, Any]]:
    """(event, frame) of a text frame."""
    try:
        frame = _loads(text)
    except ValueError:
        raise StreamProtocolError("frame is not JSON") from None
    if not isinstance(frame, dict):
        raise StreamProtocolError("frame is not a JSON object")
    event = frame.get("event")
    if not isinstance(event, str) or not event:
        raise StreamProtocolError("frame has no event")
    return event, frame


def section(frame: dict[str, Any], key: str) -> dict[str, Any]:
    value = frame.get(key)
    if not isinstance(value, dict):
        raise StreamProtocolError(f"{frame.get('event')} frame without a {key!r} object")
    return value


def optional_section(frame: dict[str, Any], key: str) -> dict[str, Any]:
    """A section that may be absent (then empty); present, it must be an object."""
    if frame.get(key) is None:
        return {}
    return section(frame, key)


_INT64 = 2**63


def optional_int(value: Any, what: str) -> int | None:
    """None when absent; an int or a string of decimal digits; anything else is refused."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isascii() and value.lstrip("-").isdigit() and len(value) <= 20:
        number = int(value)
    else:
        raise StreamProtocolError(f"{what} is not an integer")
    # JSON numbers past 64 bits: orjson reads them as floats, so both readers refuse them
    if not -_INT64 <= number < _INT64:
        raise StreamProtocolError(f"{what} is not an integer")
    return number


def text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise StreamProtocolError(f"{what} is missing or not a string")
    return value


def payload(value: Any) -> bytes:
    if not isinstance(value, str):
        raise StreamProtocolError("media frame without a payload")
    try:
        # = base64.b64decode(value, validate=True) without its regex pass (same verdicts, ~20% less)
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise StreamProtocolError("media payload is not base64") from None


def digit(value: Any) -> DtmfDigit:
    try:
        return dtmf_digit(value)
    except ValueError:
        raise StreamProtocolError("dtmf frame without a valid digit (one of 0-9 * # A-D)") from None


def mark_name(value: Any) -> str:
    if not isinstance(value, str):
        raise StreamProtocolError("mark frame without a string name")
    return value


def inbound_track(media: dict[str, Any]) -> bool:
    """Only the caller's audio is ours to take (an outbound track echoes what we sent)."""
    return is_inbound(media.get("track", "inbound"))


def is_inbound(track: Any) -> bool:
    return track in ("inbound", "inbound_track")


# JSON values whose text is their value: a string without escapes or control characters, or an
# integer of at most 18 digits (no sign, fraction, exponent or leading zero).
_STRING = r'"[^"\\\x00-\x1f]*"'
_VALUE = f"(?:{_STRING}|0|[1-9][0-9]{{0,17}})"
_NUMBER = r'(?:"(?P<q{0}>[0-9]{{1,18}})"|(?P<n{0}>0|[1-9][0-9]{{0,17}}))'  # an int or a string of digits


class MediaLayout:
    """The exact text layout a carrier writes its `media` frames in, read without building the JSON.

    `match` reads a frame that is exactly that layout: the keys in that order, no whitespace, the
    track "inbound" or "inbound_track", chunk and timestamp integers (or strings of digits) of at
    most 18 digits, the other values plain strings or integers, and a payload that is strict
    base64 as written. It returns (payload bytes, chunk, timestamp): what the full parse gives for
    such a frame. Anything else (another order, an extra key, whitespace, an escape, a float, bad
    base64) returns None and takes the full parse, which gives the verdict; so every verdict is the
    full parse's (tests/test_stream_fast_parse.py compares both paths on generated frames).
    The payload is last in `media`, and is not scanned by a regex (the costly part of one): its
    end is the next quote, and the base64 decoder checks every character of it.
    """

    def __init__(self, top: Sequence[str], media: Sequence[str]) -> None:
        """One per stream (it remembers the stream's frame ending); the regexes are compiled once (re's cache)."""
        if media[-1] != "payload" or not {"track", "chunk", "timestamp"} <= set(media):
            raise ValueError("the layout reads media frames whose payload comes last")
        head = ['\\{"event":"media"']
        for key in top[: top.index("media")]:
            head.append(f'"{key}":{_VALUE}')
        inner = []
        for key in media[:-1]:
            if key == "track":
                inner.append('"track":"inbound(?:_track)?"')
            elif key in ("chunk", "timestamp"):
                inner.append(f'"{key}":' + _NUMBER.format(key))
            else:
                inner.append(f'"{key}":{_VALUE}')
        head.append('"media":\\{' + ",".join([*inner, '"payload":"']))
        self._head = re.compile(",".join(head))
        tail = "".join(f',"{key}":{_VALUE}' for key in top[top.index("media") + 1 :])
        self._tail = re.compile('"\\}' + tail + "\\}")
        self._last_tail = "\0"  # a stream's frames all end alike (its id): compared, not matched again

    def match(self, text: str) -> tuple[bytes, int, int] | None:
        head = self._head.match(text)
        if head is None:
            return None
        start = head.end()
        end = text.find('"', start)
        if end < 0:
            return None
        if not (text.endswith(self._last_tail) and len(text) - end == len(self._last_tail)):
            if self._tail.fullmatch(text, end) is None:
                return None
            self._last_tail = text[end:]
        try:
            # strict base64 has no backslash or control character: the text is the string's value
            payload = binascii.a2b_base64(text[start:end], strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        chunk = head.group("qchunk") or head.group("nchunk")
        timestamp = head.group("qtimestamp") or head.group("ntimestamp")
        return payload, int(chunk), int(timestamp)
