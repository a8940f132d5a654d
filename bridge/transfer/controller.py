"""TransferController: runs cold and warm transfers through the manager's public surface.

Cold: state `transferring`, `carrier.transfer_cold`, then the carrier's outcome (an
`EventType.TRANSFER` event, `on_outcome`) within `transfer.outcomeTimeoutMs` on the manager's
clock. `completed` ends the call `transferred`; anything else tells the caller (`failureMessage`)
and goes back to listening.

Warm: the hold line to the caller, the person's call (a linked record: `metadata.transferOf`
names the caller's call; the manager gives it no greeting, no replies, no report and no capacity
slot), the briefing to the person once they answer, then `carrier.join_legs`; when the carrier
cannot join them, an `AudioRelay` (media/relay.py) joins the two pipelines and the caller's call
stays up, `transferring` with `transfer.joined = "relay"`, until either side hangs up; it then
ends `transferred`. A person who is busy, does not answer or declines brings the caller back as
for cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bridge.calls import TRANSFER_PARENT, CallRecord, CallState, TransferMode, TransferOutcome, TransferRecord
from bridge.transfer.rules import (
    TransferRequest,
    briefing_text,
    check_request,
    failure_text,
    outcome_of_leg_end,
    parse_outcome,
)
from bridge.transfer.summary import write_summary
from carriers.base import Carrier, CarrierError
from media.clock import Clock
from media.relay import AudioRelay

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.conversation.chat import ChatModel

log = logging.getLogger(__name__)

LINK_KEY = TRANSFER_PARENT  # a person's call (warm transfer): metadata[LINK_KEY] = the caller's call id


class TransferError(Exception):
    """A transfer request that cannot be started; the message is for the API caller."""


class TransferHost(Protocol):
    """What the controller needs of the CallManager."""

    carrier: Carrier
    clock: Clock
    settings: Settings

    def answered_call(self, call_id: str) -> CallRecord: ...

    def transition(self, call: CallRecord, state: CallState) -> bool: ...

    def save(self, call: CallRecord) -> None: ...

    def publish(self, kind: str, call: CallRecord, **extra: Any) -> None: ...

    async def say(self, call: CallRecord, text: str) -> None: ...

    def voice(self, call_id: str) -> Any: ...

    async def place_leg(self, parent: CallRecord, to: str) -> CallRecord: ...

    def finish(self, call: CallRecord, state: CallState) -> None: ...

    async def end_call_as(self, call: CallRecord, state: CallState) -> None: ...

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]: ...

    def summary_model(self) -> ChatModel | None: ...

    async def wait_new_media(self, call: CallRecord, old: Any) -> None: ...


@dataclass(eq=False)
class _Run:
    call: CallRecord
    request: TransferRequest
    record: TransferRecord
    outcome: asyncio.Future[tuple[TransferOutcome, str | None]]
    leg: CallRecord | None = None
    leg_answered: asyncio.Future[None] | None = None
    leg_ended: asyncio.Future[None] | None = None
    relay: AudioRelay | None = None
    task: asyncio.Task[Any] | None = None
    old_voice: Any = None  # cold: the caller's voice before the carrier's <Dial> ended its stream
    finished: asyncio.Future[TransferRecord] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class TransferController:
    def __init__(self, host: TransferHost) -> None:
        self._host = host
        self._runs: dict[str, _Run] = {}  # caller's call id -> its running (or relayed) transfer
        self._by_leg: dict[str, _Run] = {}  # person's call id -> the run that placed it

    # ------------------------------------------------------------------ queries for the manager

    @staticmethod
    def is_leg(call: CallRecord) -> bool:
        return LINK_KEY in call.metadata

    def holds(self, call: CallRecord) -> bool:
        """True while the conversation must stay quiet on this call: a transfer runs, the call is
        relayed to a person, or it is the person's call itself."""
        return call.callId in self._runs or self.is_leg(call)

    def final_state(self, call: CallRecord, reason: CallState) -> CallState:
        """A relayed caller's call ends `transferred` whoever hangs up (the record says it was relayed)."""
        run = self._runs.get(call.callId)
        if run is not None and run.relay is not None and reason != CallState.ERROR:
            return CallState.TRANSFERRED
        return reason

    # ------------------------------------------------------------------ API

    async def transfer(self, call_id: str, to: object, mode: object = None, summary: object = None) -> TransferRecord:
        """Start a transfer and wait for its outcome (the record; `outcome` completed or not)."""
        host = self._host
        call = host.answered_call(call_id)
        if self.is_leg(call):
            raise TransferError("This is the call to the person of a transfer; transfer the caller's call instead")
        if call.callId in self._runs:
            raise TransferError(f"A transfer is already under way on call {call.callId}")
        dial_strings = host.carrier.name in ("sip", "asterisk")
        try:
            request = check_request(to, mode, summary, dial_strings=dial_strings)
        except ValueError as exc:
            raise TransferError(str(exc)) from None
        loop = asyncio.get_running_loop()
        record = TransferRecord(mode=request.mode.value, to=request.to, startedAt=host.clock.time(),
                                summary=request.summary)
        run = _Run(call, request, record, loop.create_future())
        self._runs[call.callId] = run
        call.transfer = record
        host.transition(call, CallState.TRANSFERRING)
        host.save(call)
        host.publish("call.transfer", call, phase="started", mode=record.mode, to=record.to)
        work = self._cold(run) if request.mode == TransferMode.COLD else self._warm(run)
        run.task = host.spawn(self._guard(run, work), f"transfer-{call.callId}")
        return await asyncio.shield(run.finished)

    # ------------------------------------------------------------------ events from the manager

    def on_outcome(self, call: CallRecord, outcome: str | None, error: str | None = None) -> None:
        """The carrier's word on a cold transfer (`EventType.TRANSFER`)."""
        run = self._runs.get(call.callId)
        if run is None and call.state == CallState.TRANSFERRING and call.transfer is not None \
                and call.transfer.outcome is None:
            self._restored_outcome(call, call.transfer, parse_outcome(outcome), error)
            return
        if run is None or run.outcome.done():
            log.info("call %s: transfer outcome %s with no transfer waiting", call.callId, outcome)
            return
        parsed = parse_outcome(outcome)
        run.outcome.set_result((parsed, error))
        if parsed == TransferOutcome.COMPLETED and run.request.mode == TransferMode.COLD and not call.terminal:
            # Final now: the carrier may end our leg before the waiting task resumes.
            self._complete(run, joined=None)
            self._host.finish(call, CallState.TRANSFERRED)

    def _restored_outcome(self, call: CallRecord, record: TransferRecord, outcome: TransferOutcome,
                          error: str | None) -> None:
        """A cold transfer that was under way when the bridge restarted: apply the carrier's word."""
        host = self._host
        record.outcome, record.error, record.endedAt = outcome.value, error, host.clock.time()
        host.publish("call.transfer", call, phase="outcome", outcome=outcome.value, to=record.to, error=error)
        if outcome == TransferOutcome.COMPLETED:
            call.metadata["transferredTo"] = record.to
            host.finish(call, CallState.TRANSFERRED)
            return
        host.save(call)

        async def resume() -> None:
            await self._say(call, failure_text(host.settings.transfer.failureMessage, outcome))
            if not call.terminal:
                host.transition(call, CallState.LISTENING)
                host.save(call)

        host.spawn(resume(), f"transfer-resume-{call.callId}")

    def on_leg_answered(self, leg: CallRecord) -> None:
        run = self._by_leg.get(leg.callId)
        if run is not None and run.leg_answered is not None and not run.leg_answered.done():
            run.leg_answered.set_result(None)

    def on_ended(self, call: CallRecord) -> None:
        """Any call reached a terminal state (the manager's finalize)."""
        leg_run = self._by_leg.pop(call.callId, None)
        if leg_run is not None:
            if leg_run.leg_ended is not None and not leg_run.leg_ended.done():
                leg_run.leg_ended.set_result(None)
            if leg_run.relay is not None and not leg_run.call.terminal:
                leg_run.call.metadata["relayEndedBy"] = "person"
                self._host.spawn(self._end_relayed(leg_run, leg_run.call), f"transfer-end-{leg_run.call.callId}")
            return
        run = self._runs.pop(call.callId, None)
        if run is None:
            return
        if run.relay is not None:
            call.metadata.setdefault("relayEndedBy", "caller")
            if run.leg is not None:
                self._host.spawn(self._end_relayed(run, run.leg), f"transfer-end-{call.callId}")
            else:
                self._host.spawn(run.relay.stop(), f"relay-stop-{call.callId}")
            return
        if not run.outcome.done():
            run.outcome.set_result((TransferOutcome.FAILED, "the caller's call ended"))
        # The carrier may end our leg right after reporting success, before the task has resumed.
        completed = run.outcome.result()[0] == TransferOutcome.COMPLETED
        if run.task is not None and not run.task.done() and call.state != CallState.TRANSFERRED:
            run.task.cancel()
        if run.leg is not None and not run.leg.terminal and not completed:
            self._host.spawn(self._host.end_call_as(run.leg, CallState.HANGUP_BOT), f"transfer-leg-{call.callId}")
        if completed:
            self._settle(run, TransferOutcome.COMPLETED, None)
        else:
            self._settle(run, TransferOutcome.FAILED, "the caller's call ended")

    # ------------------------------------------------------------------ the two modes

    async def _guard(self, run: _Run, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            self._settle(run, TransferOutcome.FAILED, "cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - a transfer gone wrong brings the caller back, never a dead line
            log.exception("call %s: transfer failed", run.call.callId)
            await self._back_to_caller(run, TransferOutcome.FAILED, f"{type(exc).__name__}")

    async def _cold(self, run: _Run) -> None:
        host, call = self._host, run.call
        run.old_voice = host.voice(call.callId)
        try:
            await host.carrier.transfer_cold(call, run.request.to)
        except CarrierError as exc:
            await self._back_to_caller(run, TransferOutcome.FAILED, str(exc))
            return
        timeout = host.settings.transfer.outcomeTimeoutMs / 1000
        try:
            outcome, error = await host.clock.wait_for(run.outcome, timeout)
        except TimeoutError:
            outcome, error = TransferOutcome.FAILED, f"no outcome from the carrier within {timeout:g} s"
        if call.terminal:
            return
        if outcome == TransferOutcome.COMPLETED:
            self._complete(run, joined=None)
            host.finish(call, CallState.TRANSFERRED)
        else:
            await self._back_to_caller(run, outcome, error)

    async def _warm(self, run: _Run) -> None:
        host, call, settings = self._host, run.call, self._host.settings.transfer
        loop = asyncio.get_running_loop()
        await self._say(call, settings.holdMessage)
        if call.terminal:
            return
        host.transition(call, CallState.TRANSFERRING)
        summary = run.request.summary or await write_summary(call, host.summary_model(), host.clock)
        run.record.summary = summary
        run.leg_answered, run.leg_ended = loop.create_future(), loop.create_future()
        try:
            leg = await host.place_leg(call, run.request.to)
        except (CarrierError, Exception) as exc:  # noqa: BLE001 - CallError and carrier errors alike
            await self._back_to_caller(run, TransferOutcome.FAILED, str(exc))
            return
        run.leg = leg
        run.record.personCallId = leg.callId
        host.save(call)
        if leg.terminal:  # refused at once by the carrier
            await self._back_to_caller(run, outcome_of_leg_end(leg.state, answered=False))
            return
        self._by_leg[leg.callId] = run
        ring = settings.ringTimeoutMs / 1000
        answered = await self._first(run.leg_answered, run.leg_ended, ring)
        if call.terminal:
            return
        if not answered:
            if not leg.terminal:
                await host.end_call_as(leg, CallState.NO_ANSWER)
                await self._back_to_caller(run, TransferOutcome.NO_ANSWER)
            else:
                await self._back_to_caller(run, outcome_of_leg_end(leg.state, answered=False))
            return
        await self._say(leg, briefing_text(settings.briefing, summary))
        if call.terminal:
            return
        if leg.terminal:
            await self._back_to_caller(run, outcome_of_leg_end(leg.state, answered=True))
            return
        try:
            joined = await host.carrier.join_legs(call, leg)
        except CarrierError as exc:
            await host.end_call_as(leg, CallState.HANGUP_BOT)
            await self._back_to_caller(run, TransferOutcome.FAILED, str(exc))
            return
        if joined:
            self._complete(run, joined="carrier")
            host.finish(leg, CallState.TRANSFERRED)
            host.finish(call, CallState.TRANSFERRED)
            return
        caller_voice, person_voice = host.voice(call.callId), host.voice(leg.callId)
        if caller_voice is None or person_voice is None:
            await host.end_call_as(leg, CallState.HANGUP_BOT)
            await self._back_to_caller(run, TransferOutcome.FAILED, "no media on one of the legs to relay")
            return
        for voice in (caller_voice, person_voice):
            voice.muted = True  # a speech-to-speech model stays out of the two people's conversation
        run.relay = AudioRelay(caller_voice.bridge, person_voice.bridge, host.clock)
        run.relay.start()
        host.transition(call, CallState.TRANSFERRING)
        self._complete(run, joined="relay")

    # ------------------------------------------------------------------ helpers

    async def _first(self, answered: asyncio.Future[None], ended: asyncio.Future[None], seconds: float) -> bool:
        """Wait for the person's answer; False when their call ended first or the time ran out."""
        either: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(_: object) -> None:
            if not either.done():
                either.set_result(None)

        answered.add_done_callback(settle)
        ended.add_done_callback(settle)
        with contextlib.suppress(TimeoutError):
            await self._host.clock.wait_for(either, seconds)
        return answered.done() and not ended.done()

    async def _say(self, call: CallRecord, text: str) -> None:
        if call.terminal or not text:
            return
        try:
            await self._host.say(call, text)
        except Exception as exc:  # noqa: BLE001 - CallError/TtsError: the transfer goes on without it
            log.warning("call %s: could not say %r: %s", call.callId, text[:40], exc)

    def _complete(self, run: _Run, *, joined: str | None) -> None:
        record, call = run.record, run.call
        record.joined = joined
        record.outcome = TransferOutcome.COMPLETED.value
        record.endedAt = self._host.clock.time()
        call.metadata["transferredTo"] = record.to
        self._host.save(call)
        self._host.publish("call.transfer", call, phase="outcome", outcome=record.outcome, to=record.to,
                           joined=joined)
        if run.relay is None:
            self._runs.pop(call.callId, None)
            if run.leg is not None:
                self._by_leg.pop(run.leg.callId, None)
        self._settle(run, TransferOutcome.COMPLETED, None)

    async def _back_to_caller(self, run: _Run, outcome: TransferOutcome, error: str | None = None) -> None:
        host, call, record = self._host, run.call, run.record
        self._runs.pop(call.callId, None)
        if run.leg is not None:
            self._by_leg.pop(run.leg.callId, None)
        record.outcome = outcome.value
        record.endedAt = host.clock.time()
        record.error = error
        host.save(call)
        host.publish("call.transfer", call, phase="outcome", outcome=outcome.value, to=record.to, error=error)
        log.info("call %s: transfer to %s: %s%s", call.callId, record.to, outcome.value, f" ({error})" if error else "")
        self._settle(run, outcome, error)
        if call.terminal:
            return
        if run.old_voice is not None and host.carrier.transfer_ends_stream:
            await host.wait_new_media(call, run.old_voice)  # the stream the carrier opens again
        await self._say(call, failure_text(host.settings.transfer.failureMessage, outcome))
        if not call.terminal:
            host.transition(call, CallState.LISTENING)
            host.save(call)

    def _settle(self, run: _Run, outcome: TransferOutcome, error: str | None) -> None:
        record = run.record
        if record.outcome is None:
            record.outcome = outcome.value
            record.error = error
            record.endedAt = self._host.clock.time()
        if not run.finished.done():
            run.finished.set_result(record)

    async def _end_relayed(self, run: _Run, other: CallRecord) -> None:
        """One side of a relayed transfer hung up: stop the relay, hang up the other side."""
        if run.relay is not None:
            await run.relay.stop()
        if not other.terminal:
            await self._host.end_call_as(other, CallState.TRANSFERRED)
