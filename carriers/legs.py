"""Bookkeeping for carriers that hold their own call legs (SIP dialogs, ARI channels)."""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from bridge.calls import CallEvent, CallRecord, CallState, EventType

KEEP_ENDED = 256  # figures of this many finished legs stay readable (leg_stats)


class _Timed(Protocol):
    timer: Any


class Leg(Protocol):
    """What the lifecycle below needs of a carrier's leg (SIP dialog, ARI channel)."""

    call_id: str | None
    timer: Any
    ended: bool
    decided: bool  # inbound: answer or reject requested
    local_reason: CallState | None  # why we ended it, when we did


L = TypeVar("L", bound=Leg)


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

    def live_for(self, call: CallRecord) -> L | None:
        """The call's leg while it is up (None once it ended, or if it was never ours)."""
        leg = self.for_call(call)
        return None if leg is None or leg.ended else leg

    def answering(self, call: CallRecord) -> L | None:
        """The manager accepted this inbound call: its leg, bound to the call, decided, ring timer off."""
        pid = call.providerCallId or self._by_call.get(call.callId)
        leg = self.live_for(call)
        if leg is None or pid is None:
            return None
        leg.call_id = call.callId
        self.bind_call(call.callId, pid)
        leg.decided = True
        cancel_timer(leg)
        return leg

    def ending(self, call: CallRecord, reason: CallState, *, decided: bool = False) -> L | None:
        """We end this call (reject or hang up): its leg with the reason recorded and its timer off."""
        leg = self.live_for(call)
        if leg is None:
            return None
        leg.decided = leg.decided or decided
        leg.local_reason = reason
        cancel_timer(leg)
        return leg

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


def leg_event(carrier: str, pid: str, call_id: str | None, etype: EventType, now: float, key: str | None = None,
              **fields: Any) -> CallEvent:
    """An event of a leg, keyed by carrier, leg and `key` (default: the event type) so a repeat is one."""
    return CallEvent(type=etype, call_id=call_id, provider_call_id=pid,
                     dedupe_key=f"{carrier}:{pid}:{key or etype.value}", timestamp=now, **fields)
