"""Moving a call between nodes: let a call go to the node that took its media, or take one in.

A move clears (release) or rebuilds (adopt) the call's per-call bookkeeping as a whole: timers,
waiting turns and tasks, consults, provider-id index. The cluster side (who asks, the atomic owner
write in Redis) is bridge/cluster/handover.py.
"""

from __future__ import annotations

import logging

from bridge.calls import CallRecord, CallState, Direction
from bridge.carrier_host import CarrierHost
from bridge.manager_core import CallError
from carriers.base import CarrierError

log = logging.getLogger(__name__)

RELEASED = "-released-"  # the node of a record object this node let go: its store writes nothing more for it


class Ownership(CarrierHost):
    """On a cluster, a call moves to the node that accepts its media (bridge/cluster/handover.py)."""

    def release(self, call_id: str) -> bool:
        """Forget a call another node takes over; False (and nothing changes) while its media is here."""
        call = self.calls.get(call_id)
        if call is None:
            return True  # not here (any more): nothing holds it
        if call_id in self._voices:
            return False  # its media is here: the call stays
        if call.terminal:
            return False
        # the first words waited for media that went to the new owner: that node says them
        if self._tasks.cancel_named(f"initial-{call_id}") and call.answeredAt is not None:
            initial = str(call.metadata.get("initialMessage") or "")
            if call.transcript and call.transcript[-1].speaker == "bot" and call.transcript[-1].text == initial:
                call.transcript.pop()
            call.metadata["initialMessageSpoken"] = False
        self._tasks.cancel_named(f"-{call_id}")
        for timers in (self._timers, self._hangup_retries):
            timer = timers.pop(call_id, None)
            if timer is not None:
                timer.cancel()
        for waiter in self._media_waiters.pop(call_id, []):
            waiter.cancel()
        turn = self._turns.pop(call_id, None)
        if turn is not None and not turn.future.done():
            turn.future.set_exception(CallError(f"Call {call_id} moved to another node; ask again"))
        reply = self._replies.pop(call_id, None)
        if reply is not None:
            reply.cancel()
        detection = self._machine.pop(call_id, None)
        if detection is not None:
            detection.close()
        for consult_call, answer in list(self._consults.values()):
            if consult_call == call_id and not answer.done():
                answer.set_result("The call moved to another node.")
        if self.conversation is not None:
            self.conversation.forget(call_id)
        self._save(call)  # queued before the release is answered (the handover flushes first)
        del self.calls[call_id]
        for provider_id in [call.providerCallId, *call.metadata.get("previousProviderCallIds", [])]:
            if provider_id and self._by_provider_id.get(provider_id) == call_id:
                del self._by_provider_id[provider_id]
        # Anything that still holds this object (a stream-lost grace timer) sees an ended call and does
        # nothing; its store writes stop here (SharedCallLog writes only this node's records).
        call.metadata = {**call.metadata, "node": RELEASED}
        call.state = CallState.COMPLETED
        log.info("call %s: released to another node", call_id)
        return True

    def adopt(self, record: CallRecord) -> CallRecord:
        """Carry a call written as this node's in Redis from now on: timers, and the first words if still due."""
        call_id = record.callId
        self.calls[call_id] = record
        self._ended.pop(call_id, None)
        for provider_id in [record.providerCallId, *record.metadata.get("previousProviderCallIds", [])]:
            if provider_id:
                self._by_provider_id[provider_id] = call_id
        self._processed.update(record.processedEventIds)
        now = self.clock.time()
        if record.answeredAt is not None:
            self._start_max_duration(record, self.settings.maxDurationSeconds - (now - record.answeredAt))
            if not record.metadata.get("initialMessageSpoken"):
                # the old owner never had the media to say them: said here once the stream attaches
                self._spawn(self._after_answer(record), f"initial-{call_id}")
        elif record.direction == Direction.OUTBOUND:
            self._start_ring_timeout(record, already=now - record.startedAt)
        record.media_attached = False
        return record

    async def resume_orphan(self, call: CallRecord) -> bool:
        """A dead node's call, now this node's: a new stream from the carrier (True), or the end (False)."""
        if call.answeredAt is not None:
            try:
                if await self.carrier.reattach_media(call):
                    # ended after the grace period unless the new stream attaches (here or on another node)
                    self.media_disconnected(call.callId)
                    return True
            except CarrierError as exc:
                log.warning("call %s: media not re-attached (%s); ending the call", call.callId, exc)
        await self._hangup(call, CallState.HANGUP_BOT)
        return False
