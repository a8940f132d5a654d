"""Manager hardening on a fake clock: every state change written, stale answers kept out of the
model's context, no orphaned future exceptions."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path
from typing import Any

import pytest

from bridge.calls import CallState, EventType
from bridge.manager import CallError, CallManager
from bridge.store import CallStore
from carriers.base import CarrierError
from tests.test_manager import answered, ev, settle, started


def logged_states(store: Path, call_id: str) -> list[str]:
    lines = (store / "calls.jsonl").read_text().splitlines()
    return [json.loads(line)["state"] for line in lines if json.loads(line)["callId"] == call_id]


async def test_move_to_listening_is_written_and_survives_a_restart(tmp_path: Path) -> None:
    manager, carrier, clock = await started(tmp_path)
    call = await manager.initiate(None, "Hello there", "conversation")
    manager.process_event(ev(EventType.ANSWERED, call.callId))
    await settle()
    assert call.state == CallState.LISTENING
    assert logged_states(tmp_path, call.callId)[-1] == "listening"
    manager.store.close()  # a crash: no stop(), the log is all that is left
    carrier2 = type(carrier)()
    carrier2.status[call.providerCallId] = None  # the carrier still has the call up
    again = CallManager(manager.settings, carrier2, clock=clock, store=CallStore(tmp_path))
    await again.start()
    assert again.calls[call.callId].state == CallState.LISTENING
    await again.stop()


async def test_call_ending_mid_turn_leaves_no_unretrieved_future_exception(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    manager, carrier, clock, call = await answered(tmp_path)
    await settle()

    async def hang_up_while_speaking(rec: Any, text: str) -> None:
        manager.process_event(ev(EventType.ENDED, call.callId, reason=CallState.HANGUP_USER))

    carrier.speak_native = hang_up_while_speaking  # type: ignore[method-assign]
    with pytest.raises(CallError, match="ended"):
        await manager.continue_call(call.callId, "Still there?")
    await manager.stop()
    gc.collect()
    await settle()
    assert not [e for e in errors if "never retrieved" in str(e.get("message"))], errors


class FlakyHangup:
    """Scripted outcomes for the carrier's hang-up: an exception to raise, "hang" or None (success)."""

    def __init__(self, carrier: Any, outcomes: list[Any]) -> None:
        self.carrier = carrier
        self.outcomes = outcomes
        self.attempts = 0
        self.original = carrier.hangup_call

    async def __call__(self, call: Any, reason: CallState) -> None:
        self.attempts += 1
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome == "hang":
            await asyncio.Event().wait()
        if isinstance(outcome, Exception):
            raise outcome
        await self.original(call, reason)


@pytest.mark.parametrize("failure", [CarrierError("HTTP 500", status=500), CarrierError("HTTP 429", status=429),
                                     CarrierError("HTTP 400", status=400), CarrierError("dropped", retryable=True),
                                     "hang"])
async def test_end_is_truthful_and_retries_the_hang_up_in_the_background(tmp_path: Path, failure: Any) -> None:
    manager, carrier, clock, call = await answered(tmp_path)
    await settle()
    flaky = FlakyHangup(carrier, [failure, failure])
    carrier.hangup_call = flaky  # type: ignore[method-assign]
    attempt = asyncio.ensure_future(manager.end(call.callId))
    await settle()
    if failure == "hang":
        assert not attempt.done()
        await clock.advance(8.1)  # one attempt is bounded: never a 45 s block
    with pytest.raises(CallError, match="still up: the carrier did not confirm the hang-up"):
        await attempt
    assert not call.terminal and call.metadata["hangupPending"] == "hangup-bot"
    assert logged_states(tmp_path, call.callId)[-1] != "hangup-bot"
    await clock.advance(1.1)  # first retry after 1 s: fails again
    if failure == "hang":
        await clock.advance(8.1)
    await manager.drain()
    assert flaky.attempts == 2 and not call.terminal
    await clock.advance(2.1)  # second retry after 2 s more: the carrier hangs up
    await manager.drain()
    assert flaky.attempts == 3 and call.state == CallState.HANGUP_BOT
    assert carrier.hangups == [(call.callId, CallState.HANGUP_BOT)] and "hangupPending" not in call.metadata
    await manager.stop()


async def test_hang_up_of_a_call_the_carrier_no_longer_has_is_final(tmp_path: Path) -> None:
    manager, carrier, clock = await started(tmp_path)
    call = await manager.initiate(None, "Hi", "conversation")
    carrier.hangup_call = FlakyHangup(carrier, [CarrierError("not found", status=404)])  # type: ignore[method-assign]
    assert (await manager.end(call.callId)).state == CallState.HANGUP_BOT
    await manager.stop()


async def test_carrier_reporting_the_end_stops_the_retries(tmp_path: Path) -> None:
    manager, carrier, clock = await started(tmp_path)
    call = await manager.initiate(None, "Hi", "conversation")
    flaky = FlakyHangup(carrier, [CarrierError("HTTP 500", status=500)] * 10)
    carrier.hangup_call = flaky  # type: ignore[method-assign]
    with pytest.raises(CallError):
        await manager.end(call.callId)
    manager.process_event(ev(EventType.ENDED, call.callId, reason=CallState.COMPLETED))
    await clock.advance(120)
    await manager.drain()
    assert flaky.attempts == 1 and call.state == CallState.COMPLETED
    await manager.stop()
