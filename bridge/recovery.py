"""Restart recovery: reload the call log, end what cannot still be up, ask the carrier about the rest,
and restart the survivors' timers."""

from __future__ import annotations

import logging

from bridge.answering import Answering
from bridge.calls import CallState, Direction
from carriers.base import CarrierError

log = logging.getLogger(__name__)


class Recovery(Answering):
    async def _recover(self) -> None:
        replay = await self.store.load()
        if replay.skipped_lines:
            log.warning("call log: %d unreadable line(s) skipped", replay.skipped_lines)
        now = self.clock.time()
        for call in replay.calls.values():
            self.calls[call.callId] = call
            if call.providerCallId:
                self._by_provider_id[call.providerCallId] = call.callId
            self._processed.update(call.processedEventIds)
        for call in sorted((c for c in replay.calls.values() if c.terminal), key=lambda c: c.endedAt or 0):
            self._remember_ended(call)
        for call in [c for c in replay.calls.values() if not c.terminal]:
            if not call.providerCallId:
                self._finalize(call, CallState.ERROR, error="lost on restart (never reached the carrier)")
                continue
            if now - call.startedAt > self.settings.maxDurationSeconds:
                self._finalize(call, CallState.TIMEOUT, error="older than maxDurationSeconds at restart")
                continue
            try:
                status = await self.carrier.get_call_status(call)
            except CarrierError as exc:
                log.warning("call %s: status check failed on restart (%s); keeping it", call.callId, exc)
                status = None
            if status is not None and status.terminal:
                self._finalize(call, status.state or CallState.COMPLETED)
                continue
            # initial message was already handled before the restart; do not speak it again
            call.metadata["initialMessageSpoken"] = True
            if call.answeredAt is not None:
                elapsed = now - call.answeredAt
                self._start_max_duration(call, self.settings.maxDurationSeconds - elapsed)
                self._resume_machine_detection(call, elapsed)
            elif call.direction == Direction.OUTBOUND:
                self._start_ring_timeout(call, already=now - call.startedAt)
            log.info("call %s restored in state %s", call.callId, call.state)
