"""Bookkeeping for carriers that hold their own call legs (SIP dialogs, ARI channels)."""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from bridge.calls import CallRecord

KEEP_ENDED = 256  # figures of this many finished legs stay readable (leg_stats)


class _Timed(Protocol):
    timer: Any


L = TypeVar("L")


class LegTable(Generic[L]):
    """Live legs by provider call id, the provider call id of each of our calls, and the figures of
    the most recently ended legs (bounded)."""

    def __init__(self, keep_ended: int = KEEP_ENDED) -> None:
        self.live: dict[str, L] = {}
        self.ended: dict[str, dict[str, Any]] = {}
        self._by_call: dict[str, str] = {}
        self._keep_ended = keep_ended

    def add(self, pid: str, leg: L, call_id: str | None = None) -> None:
        self.live[pid] = leg
        if call_id:
            self._by_call[call_id] = pid

    def bind_call(self, call_id: str, pid: str) -> None:
        self._by_call[call_id] = pid

    def get(self, pid: str | None) -> L | None:
        return self.live.get(pid) if pid else None

    def for_call(self, call: CallRecord) -> L | None:
        return self.get(call.providerCallId or self._by_call.get(call.callId))

    def forget(self, pid: str, call_id: str | None) -> None:
        self.live.pop(pid, None)
        if call_id and self._by_call.get(call_id) == pid:
            del self._by_call[call_id]

    def record_ended(self, pid: str, stats: dict[str, Any]) -> None:
        self.ended[pid] = stats
        while len(self.ended) > self._keep_ended:
            self.ended.pop(next(iter(self.ended)))

    def __len__(self) -> int:
        return len(self.live)


def cancel_timer(leg: _Timed) -> None:
    if leg.timer is not None:
        leg.timer.cancel()
        leg.timer = None
