"""The call manager's side of a move (bridge/cluster/handover.py): let a call go, or take one in.

It reaches into the manager's per-call bookkeeping (timers, turns, waiting tasks), which a move has
to clear or rebuild as a whole; it belongs beside that bookkeeping and moves there with the
manager's split into modules.
"""
# ruff: noqa: SLF001 - the manager's per-call bookkeeping, see above

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bridge.calls import CallRecord, CallState, Direction

if TYPE_CHECKING:
    from bridge.manager import CallManager

log = logging.getLogger(__name__)

RELEASED = "-released-"  # the node of a record object this node let go: its store writes nothing more for it


class ManagerOwnership:
    def __init__(self, manager: CallManager) -> None:
        self.manager = manager

    def release(self, call_id: str) -> bool:
        m = self.manager
        call = m.calls.get(call_id)
        if call is None:
            return True  # not here (any more): nothing holds it
        if call_id in m._voices:
            return False  # its media is here: the call stays
        if call.terminal:
            return False
        from bridge.manager import CallError

        # the first words waited for media that went to the new owner: that node says them
        if m._tasks.cancel_named(f"initial-{call_id}") and call.answeredAt is not None:
            initial = str(call.metadata.get("initialMessage") or "")
            if call.transcript and call.transcript[-1].speaker == "bot" and call.transcript[-1].text == initial:
                call.transcript.pop()
            call.metadata["initialMessageSpoken"] = False
        m._tasks.cancel_named(f"-{call_id}")
        for timers in (m._timers, m._hangup_retries):
            timer = timers.pop(call_id, None)
            if timer is not None:
                timer.cancel()
        for waiter in m._media_waiters.pop(call_id, []):
            waiter.cancel()
        turn = m._turns.pop(call_id, None)
        if turn is not None and not turn.future.done():
            turn.future.set_exception(CallError(f"Call {call_id} moved to another node; ask again"))
        reply = m._replies.pop(call_id, None)
        if reply is not None:
            reply.cancel()
        detection = m._machine.pop(call_id, None)
        if detection is not None:
            detection.close()
        for consult_call, answer in list(m._consults.values()):
            if consult_call == call_id and not answer.done():
                answer.set_result("The call moved to another node.")
        if m.conversation is not None:
            m.conversation.forget(call_id)
        m._save(call)  # queued before the release is answered (the handover flushes first)
        del m.calls[call_id]
        for provider_id in [call.providerCallId, *call.metadata.get("previousProviderCallIds", [])]:
            if provider_id and m._by_provider_id.get(provider_id) == call_id:
                del m._by_provider_id[provider_id]
        # Anything that still holds this object (a stream-lost grace timer) sees an ended call and does
        # nothing; its store writes stop here (SharedCallLog writes only this node's records).
        call.metadata = {**call.metadata, "node": RELEASED}
        call.state = CallState.COMPLETED
        log.info("call %s: released to another node", call_id)
        return True

    def adopt(self, record: CallRecord) -> CallRecord:
        m = self.manager
        call_id = record.callId
        m.calls[call_id] = record
        m._ended.pop(call_id, None)
        for provider_id in [record.providerCallId, *record.metadata.get("previousProviderCallIds", [])]:
            if provider_id:
                m._by_provider_id[provider_id] = call_id
        m._processed.update(record.processedEventIds)
        now = m.clock.time()
        if record.answeredAt is not None:
            m._start_max_duration(record, m.settings.maxDurationSeconds - (now - record.answeredAt))
            if not record.metadata.get("initialMessageSpoken"):
                # the old owner never had the media to say them: said here once the stream attaches
                m._spawn(m._after_answer(record), f"initial-{call_id}")
        elif record.direction == Direction.OUTBOUND:
            m._start_ring_timeout(record, already=now - record.startedAt)
        record.media_attached = False
        return record

