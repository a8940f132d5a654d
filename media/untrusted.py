"""Parsing untrusted JSON: a nesting-depth limit before the parser sees the text, one error type out.

Python's json recurses per nesting level: a few thousand `[` raise RecursionError (a 500 and a
traceback) and a deep-but-legal document costs stack on every consumer. Counting brackets outside
strings first rejects it in linear time, without recursion.

It lives in the lowest layer so the server, the media-stream handler and every carrier share it.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class UntrustedJsonError(ValueError):
    """The text is not JSON we accept; the message is one line, safe to log and return."""


def nesting_depth(data: bytes | str) -> int:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = deepest = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def too_deep(data: bytes | str, max_depth: int = MAX_DEPTH) -> bool:
    """nesting_depth(data) > max_depth, cheaply for the usual frame: the depth cannot exceed the
    number of opening brackets, and counting them costs ~0.5 us where the scan costs ~20 us on a
    media frame (a 300-byte Twilio frame has 2; the scan runs only past max_depth of them)."""
    if isinstance(data, str):
        opening = data.count("{") + data.count("[")
    else:
        opening = data.count(b"{") + data.count(b"[")
    return opening > max_depth and nesting_depth(data) > max_depth


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads with a depth limit; NaN/Infinity are refused (they are not JSON)."""
    if nesting_depth(data) > max_depth:
        raise UntrustedJsonError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, UntrustedJsonError):
            raise
        raise UntrustedJsonError(f"invalid JSON ({type(exc).__name__})") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise UntrustedJsonError("JSON number out of range")
    return value


def _refuse_constant(name: str) -> Any:
    raise UntrustedJsonError(f"invalid JSON constant {name}")
