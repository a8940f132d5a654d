"""Cut a model's text into speakable pieces while its tokens arrive (pure: text in, pieces out).

A piece ends at a sentence end (. ! ? …, optionally followed by closing quotes or brackets) or, once
the piece is at least `min_clause_chars` long, at a clause boundary (, ; :). A boundary counts
only when WHITESPACE follows it, which keeps numbers (3.5, 1,000), URLs, e-mail addresses and times
(10:30) whole; a period after a known abbreviation (Dr., e.g., U.S.) or a single initial is no
boundary. A piece with no boundary for `max_chars` is cut at its last space.

The cut depends on the text alone, never on how it was split into tokens: the segmenter waits
for the character after a boundary before it decides. `"".join(pieces) == text`, whitespace included.
"""

from __future__ import annotations

import re

SENTENCE_END = frozenset(".!?…")
CLAUSE = frozenset(",;:")
CLOSERS = frozenset("\"')]}”’»")
OPENERS = "\"'([{“‘«"
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "etc", "inc", "ltd", "co", "corp",
    "approx", "dept", "tel", "ext", "jan", "feb", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov",
    "dec", "mon", "tue", "thu", "fri",
    "ave", "blvd", "rd", "gen", "col", "capt", "lt", "sgt", "rev", "hon", "fig", "vol", "cf", "ca",
})  # not "no", "sun", "min"...: as sentence ends ("No. I can't.") they are far more common
_DOTTED = re.compile(r"^(?:[a-z]\.)+[a-z]$")  # e.g, i.e, u.s, a.m, p.h.d


class Segmenter:
    def __init__(self, *, min_clause_chars: int = 30, max_chars: int = 240) -> None:
        if min_clause_chars < 1 or max_chars < 2:
            raise ValueError("min_clause_chars must be >= 1 and max_chars >= 2")
        self.min_clause_chars = min_clause_chars
        self.max_chars = max_chars
        self._buf = ""
        self._scan = 0  # next index of _buf to examine as a possible boundary

    def push(self, text: str) -> list[str]:
        """Add model text; return the pieces completed by it (possibly none)."""
        self._buf += text
        pieces: list[str] = []
        while True:
            cut = self._next_cut()
            if cut is None:
                return pieces
            pieces.append(self._buf[:cut])
            self._buf = self._buf[cut:]
            self._scan = 0

    def flush(self) -> list[str]:
        """The model finished: whatever is left is the last piece."""
        rest, self._buf, self._scan = self._buf, "", 0
        return [rest] if rest else []

    def reset(self) -> None:
        """Barge-in: drop what was not yet cut."""
        self._buf, self._scan = "", 0

    def _next_cut(self) -> int | None:
        buf = self._buf
        n = len(buf)
        i = self._scan
        while i < n:
            ch = buf[i]
            if ch in SENTENCE_END or ch in CLAUSE:
                end = i + 1
                while end < n and (buf[end] in CLOSERS or (ch in SENTENCE_END and buf[end] in SENTENCE_END)):
                    end += 1
                if end >= n:
                    self._scan = i  # the character after it decides; wait for it
                    return None
                if buf[end].isspace() and self._is_boundary(buf, i, end):
                    return end
                i = end
                continue
            if i + 1 >= self.max_chars:
                space = buf.rfind(" ", 0, i + 1)
                if space > 0:
                    return space
            i += 1
        self._scan = i
        return None

    def _is_boundary(self, buf: str, i: int, end: int) -> bool:
        ch = buf[i]
        if ch in CLAUSE:
            return end >= self.min_clause_chars
        if ch == ".":
            return not _abbreviation(buf, i)
        return True


def _abbreviation(buf: str, dot: int) -> bool:
    """Is the period at `dot` the end of an abbreviation or an initial ("Dr.", "e.g.", "J.")?"""
    start = dot
    while start > 0 and not buf[start - 1].isspace():
        start -= 1
    word = buf[start:dot].lstrip(OPENERS).lower()
    if not word:
        return False
    if len(word) == 1 and word.isalpha():
        return True
    return word in ABBREVIATIONS or bool(_DOTTED.match(word))


def speakable(piece: str) -> str:
    """What goes to TTS: the piece without surrounding whitespace (empty: nothing to say)."""
    return piece.strip()
