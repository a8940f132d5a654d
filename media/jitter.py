"""Reordering of inbound frames by sequence number (Telnyx does not guarantee order). Sans-I/O."""

from __future__ import annotations


class ReorderBuffer:
    """Releases payloads in sequence order, holding at most `window` frames while a gap is open.

    A frame older than what was already released is late and dropped (`late`); when more than
    `window` frames wait behind a gap, the gap is given up (`skipped` counts the missing numbers).
    A jump back by more than `restart_gap` is taken as a restarted counter.
    """

    def __init__(self, window: int = 3, *, restart_gap: int = 100) -> None:
        self.window = window
        self.restart_gap = restart_gap
        self._next: int | None = None
        self._held: dict[int, bytes] = {}
        self.late = 0
        self.skipped = 0
        self.reordered = 0

    def push(self, seq: int, payload: bytes) -> list[bytes]:
        out: list[bytes] = []
        if self._next is not None and self._next - seq > self.restart_gap:
            out = self.drain()
            self._next = None
        if self._next is None:
            # Start of a stream: the first frame to arrive may not be the first one sent, so hold
            # a window's worth before deciding where the sequence starts.
            self._held.setdefault(seq, payload)
            if len(self._held) > self.window:
                self._next = min(self._held)
                self._release(out)
            return out
        if seq < self._next or seq in self._held:
            self.late += 1
            return out
        if seq != self._next:
            self.reordered += 1
        self._held[seq] = payload
        self._release(out)
        if len(self._held) > self.window:
            first = min(self._held)
            self.skipped += first - self._next
            self._next = first
            self._release(out)
        return out

    def _release(self, out: list[bytes]) -> None:
        assert self._next is not None
        while self._next in self._held:
            out.append(self._held.pop(self._next))
            self._next += 1

    def drain(self) -> list[bytes]:
        out = [self._held[k] for k in sorted(self._held)]
        if self._held:
            self._next = max(self._held) + 1
            self.skipped += max(self._held) - min(self._held) + 1 - len(self._held)
        self._held.clear()
        return out
