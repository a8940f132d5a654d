"""The end of a call: hang-up with retries and backoff, finalize (every per-call resource let go), the
after-call report, the ended-call window kept in memory, and the call's timers (ring timeout, max
duration, the stale-call reaper)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from typing import Any

from bridge.calls import CallRecord, CallState
from bridge.manager_core import CallError, ManagerCore
from bridge.report import build_report
from carriers.base import CarrierError, OutboundRequest

log = logging.getLogger(__name__)

REAPER_INTERVAL_S = 30.0
RING_TIMEOUT_SLACK_S = 10.0  # the carrier's own ring timeout should normally win
HANGUP_ATTEMPT_S = 8.0  # one hang-up attempt (the carrier client's own retries included) before we back off
HANGUP_RETRY_FIRST_S = 1.0
HANGUP_RETRY_MAX_S = 60.0


class Lifecycle(ManagerCore):
    async def _hangup(self, call: CallRecord, reason: CallState) -> bool:
        """Ask the carrier to hang up; the call is final only once it has (or says it no longer has
        the call). Otherwise the call stays live, and the hang-up is retried with backoff."""
        if await self._try_hangup(call, reason):
            return True
        if call.callId not in self._hangup_retries:
            self._schedule_hangup_retry(call, reason, 0)
        return False

    async def _try_hangup(self, call: CallRecord, reason: CallState) -> bool:
        if call.terminal:
            return True
        try:
            await self._bounded(self.carrier.hangup_call(call, reason), HANGUP_ATTEMPT_S)
        except CarrierError as exc:
            if exc.status == 404:  # the carrier has no such call (any more): nothing is up
                log.info("call %s: carrier no longer has the call", call.callId)
            else:
                return self._hangup_failed(call, reason, str(exc))
        except TimeoutError:
            return self._hangup_failed(call, reason, f"no answer from the carrier in {HANGUP_ATTEMPT_S:.0f}s")
        self._finalize(call, reason)
        return True

    def _hangup_failed(self, call: CallRecord, reason: CallState, error: str) -> bool:
        log.warning("call %s: hang-up not confirmed (%s); will retry", call.callId, error)
        call.metadata["hangupError"] = error
        call.metadata["hangupPending"] = reason.value
        self._save(call)
        return False

    def _schedule_hangup_retry(self, call: CallRecord, reason: CallState, attempt: int) -> None:
        delay = min(HANGUP_RETRY_MAX_S, HANGUP_RETRY_FIRST_S * 2 ** attempt)

        async def retry() -> None:
            if call.terminal or self.stopping:
                self._hangup_retries.pop(call.callId, None)
                return
            if await self._try_hangup(call, reason):
                self._hangup_retries.pop(call.callId, None)
            else:
                self._schedule_hangup_retry(call, reason, attempt + 1)

        self._hangup_retries[call.callId] = self.clock.call_later(
            delay, lambda: self._spawn(retry(), f"hangup-retry-{call.callId}"))

    async def _bounded(self, awaitable: Awaitable[Any], seconds: float) -> Any:
        """Await with a limit on the manager's clock; the work is cancelled when the limit passes."""
        task = asyncio.ensure_future(awaitable)
        expired: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def expire() -> None:
            if not expired.done():
                expired.set_result(None)

        timer = self.clock.call_later(seconds, expire)
        try:
            await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise TimeoutError
        return task.result()

    async def _dial(self, call: CallRecord, request: OutboundRequest, failure: str) -> None:
        """Place `call` at the carrier; a refusal ends it `failed` and raises `<failure>: <reason>`."""
        try:
            provider_id = await self.carrier.initiate_call(call, request)
        except CarrierError as exc:
            self._finalize(call, CallState.FAILED, error=str(exc))
            raise CallError(f"{failure}: {exc}") from None
        if not call.terminal:
            self._link_provider_id(call, provider_id)
            self._save(call)

    def _finalize(self, call: CallRecord, reason: CallState, *, error: str | None = None) -> None:
        if call.terminal:
            return
        reason = self.transfers.final_state(call, reason)
        call.state = reason
        call.endedAt = self.clock.time()
        call.endReason = reason.value
        if error:
            call.metadata["error"] = error
        timer = self._timers.pop(call.callId, None)
        if timer is not None:
            timer.cancel()
        retry = self._hangup_retries.pop(call.callId, None)
        if retry is not None:
            retry.cancel()
        call.metadata.pop("hangupPending", None)
        detection = self._machine.pop(call.callId, None)
        if detection is not None:
            detection.close()
        turn = self._turns.get(call.callId)
        if turn is not None and not turn.future.done():
            turn.future.set_exception(CallError(f"Call ended ({reason}) before a transcript arrived"))
        for waiter in self._media_waiters.pop(call.callId, []):
            if not waiter.done():
                waiter.set_result(None)
        voice = self._voices.pop(call.callId, None)
        if voice is not None:
            self._spawn(voice.close(), f"close-voice-{call.callId}")
        discard = getattr(self._voice_factory, "discard", None)
        if discard is not None:
            discard(call.callId)  # a pre-warmed session the call never used
        for owner, answer in list(self._consults.values()):
            if owner == call.callId and not answer.done():
                answer.set_result("The call has ended.")
        if self.conversation is not None:
            self.conversation.forget(call.callId)
        self._save(call)
        self._publish("call.ended", call, reason=reason.value)
        self.transfers.on_ended(call)
        if not self.transfers.is_leg(call):  # the person's call is part of the caller's, not a report of its own
            self._report(call)
        self._remember_ended(call)

    def _remember_ended(self, call: CallRecord) -> None:
        """Keep only the last `ended_calls_kept` ended calls in memory."""
        self._ended[call.callId] = None
        while len(self._ended) > self.ended_calls_kept:
            old_id, _ = self._ended.popitem(last=False)
            old = self.calls.pop(old_id, None)
            if old is None:
                continue
            for provider_id in [old.providerCallId, *old.metadata.get("previousProviderCallIds", [])]:
                if provider_id and self._by_provider_id.get(provider_id) == old_id:
                    del self._by_provider_id[provider_id]

    def _report(self, call: CallRecord) -> None:
        """The after-call report: to subscribers as `call.report`, to hooks.callEnded via the outbox."""
        if self.reports is None and not self.fanout.has_subscribers and self.shared is None:
            return
        recording = None
        if self.settings.recording.enabled and "mediaAttached" in call.metadata:  # a leg was attached once
            recording = str(self.settings.store_dir / "recordings" / f"{call.callId}.wav")
        report = build_report(call, delivery_id=uuid.uuid4().hex, recording=recording)
        self._publish("call.report", call, report=report)
        if self.reports is not None:
            self.reports.submit(report)

    # ================================================================== timers

    def _start_max_duration(self, call: CallRecord, seconds: float) -> None:
        old = self._timers.pop(call.callId, None)
        if old is not None:
            old.cancel()

        def expire() -> None:
            self._timers.pop(call.callId, None)
            if not call.terminal:
                log.info("call %s: max duration reached", call.callId)
                self._spawn(self._hangup(call, CallState.TIMEOUT), f"timeout-{call.callId}")

        self._timers[call.callId] = self.clock.call_later(max(0.0, seconds), expire)

    def _start_ring_timeout(self, call: CallRecord, *, already: float = 0.0) -> None:
        """Our own limit on ringing, beside the carrier's: if its no-answer never reaches us (a webhook
        that cannot be verified, a lost callback), the call must not hold a slot forever. Answering
        replaces this timer with the max-duration one."""
        seconds = self.settings.ringTimeoutMs / 1000 + RING_TIMEOUT_SLACK_S
        remaining = max(0.0, seconds - already)

        def expire() -> None:
            self._timers.pop(call.callId, None)
            if not call.terminal and call.answeredAt is None:
                log.info("call %s: not answered within %.0fs", call.callId, seconds)
                call.metadata["ringTimeout"] = True
                self._spawn(self._hangup(call, CallState.NO_ANSWER), f"ring-timeout-{call.callId}")

        self._timers[call.callId] = self.clock.call_later(remaining, expire)

    def _schedule_reaper(self) -> None:
        self._reaper = self.clock.call_later(REAPER_INTERVAL_S, self._reap)

    def _reap(self) -> None:
        limit = self.settings.staleCallReaperSeconds
        now = self.clock.time()
        for call in self.active_calls():
            if now - call.startedAt >= limit:
                log.info("call %s: stale for %.0fs, reaping", call.callId, now - call.startedAt)
                call.metadata["reaped"] = True
                self._spawn(self._hangup(call, CallState.TIMEOUT), f"reap-{call.callId}")
        self._schedule_reaper()
