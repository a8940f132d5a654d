"""The transfer's pure rules, and the controller's timers on the fake clock through a real
CallManager (a recording carrier that never reports an outcome, or refuses the transfer)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.calls import CallEvent, CallState, EventType, TranscriptEntry, TransferMode, TransferOutcome
from bridge.config import build_settings
from bridge.manager import CallError, CallManager
from bridge.store import CallStore
from bridge.transfer.rules import (
    TransferRequestError,
    check_request,
    failure_text,
    fallback_summary,
    outcome_of_leg_end,
    parse_outcome,
)
from carriers.base import CarrierError
from media.clock import FakeClock
from tests.fakes.carrier import RecordingCarrier


def test_requests_are_checked_with_one_clear_line() -> None:
    assert check_request("+15550001234", None, None).mode == TransferMode.COLD
    assert check_request("sip:agent@pbx.example.com", "warm", "  Wants a refund. ").summary == "Wants a refund."
    assert check_request("1001", "cold", None, dial_strings=True).to == "1001"  # SIP/Asterisk extensions
    for to, mode, summary, words in (("", None, None, "`to` is required"), (None, None, None, "`to` is required"),
                                     ("555-1234", None, None, "E.164"), ("+15550001234", "hot", None, "cold or warm"),
                                     ("+15550001234", "warm", 42, "must be a string"),
                                     ("+15550001234", "warm", "x" * 1001, "at most 1000"),
                                     ("sip:a b@c", None, None, "E.164")):
        with pytest.raises(TransferRequestError, match=words):
            check_request(to, mode, summary)


def test_outcomes_and_what_the_caller_hears() -> None:
    assert outcome_of_leg_end(CallState.BUSY, answered=False) == TransferOutcome.BUSY
    assert outcome_of_leg_end(CallState.NO_ANSWER, answered=False) == TransferOutcome.NO_ANSWER
    assert outcome_of_leg_end(CallState.HANGUP_USER, answered=True) == TransferOutcome.REFUSED
    assert outcome_of_leg_end(CallState.FAILED, answered=False) == TransferOutcome.FAILED
    assert parse_outcome("busy") == TransferOutcome.BUSY and parse_outcome("??") == TransferOutcome.FAILED
    assert failure_text("Sorry: {reason}.", TransferOutcome.NO_ANSWER) == "Sorry: nobody answered."
    transcript = [TranscriptEntry(1, "bot", "Hi"), TranscriptEntry(2, "user", "My card was charged twice."),
                  TranscriptEntry(3, "user", "Can I talk to someone?")]
    assert fallback_summary(transcript) == "The caller said: My card was charged twice. Can I talk to someone?"
    assert fallback_summary([]) == "The caller did not say why they are calling."


class TransferringCarrier(RecordingCarrier):
    def __init__(self) -> None:
        super().__init__()
        self.transfers: list[tuple[str, str]] = []
        self.refuse: str | None = None

    async def transfer_cold(self, call, to):  # type: ignore[no-untyped-def]
        if self.refuse:
            raise CarrierError(self.refuse, status=403)
        self.transfers.append((call.callId, to))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def answered(tmp_path: Path, **transfer: object) -> tuple[CallManager, TransferringCarrier, FakeClock, str]:
    raw = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "store": str(tmp_path),
           "transfer": {"failureMessage": "Sorry, {reason}.", **transfer}}
    clock = FakeClock()
    carrier = TransferringCarrier()
    manager = CallManager(build_settings(raw, {}), carrier, clock=clock, store=CallStore(tmp_path))
    await manager.start()
    call = await manager.initiate(None, "Hello", "conversation")
    manager.process_event(CallEvent(EventType.ANSWERED, call_id=call.callId))
    await settle()
    return manager, carrier, clock, call.callId


async def test_no_outcome_from_the_carrier_times_out_on_the_clock_and_the_caller_is_back(tmp_path: Path) -> None:
    manager, carrier, clock, call_id = await answered(tmp_path, outcomeTimeoutMs=30_000)
    call = manager.calls[call_id]
    pending = asyncio.ensure_future(manager.transfer(call_id, "+15550009999", "cold"))
    await settle()
    assert carrier.transfers == [(call_id, "+15550009999")] and call.state == CallState.TRANSFERRING
    await clock.advance(29.9)
    assert not pending.done()
    await clock.advance(0.2)
    record = await pending
    assert record.outcome == "failed" and "within 30 s" in (record.error or "")
    await settle()
    assert carrier.spoken[-1] == (call_id, "Sorry, the call could not be connected.")
    assert call.state == CallState.LISTENING
    with pytest.raises(CallError, match="E.164"):
        await manager.transfer(call_id, "12345")
    await manager.stop()


async def test_a_refused_request_and_a_second_transfer_while_one_runs(tmp_path: Path) -> None:
    manager, carrier, clock, call_id = await answered(tmp_path)
    carrier.refuse = "twilio answered HTTP 403"
    record = await manager.transfer(call_id, "+15550009999")
    assert record.outcome == "failed" and record.error == "twilio answered HTTP 403"
    carrier.refuse = None
    first = asyncio.ensure_future(manager.transfer(call_id, "+15550009999"))
    await settle()
    with pytest.raises(CallError, match="already under way"):
        await manager.transfer(call_id, "+15550008888")
    # the carrier's word arrives: completed ends the call `transferred`, without a hang-up
    manager.process_event(CallEvent(EventType.TRANSFER, call_id=call_id, outcome="completed"))
    record = await first
    assert record.outcome == "completed" and manager.calls[call_id].state == CallState.TRANSFERRED
    assert carrier.hangups == []
    await manager.stop()


async def test_the_caller_hanging_up_mid_transfer_settles_it(tmp_path: Path) -> None:
    manager, carrier, clock, call_id = await answered(tmp_path)
    pending = asyncio.ensure_future(manager.transfer(call_id, "+15550009999"))
    await settle()
    manager.process_event(CallEvent(EventType.ENDED, call_id=call_id, reason=CallState.HANGUP_USER))
    record = await pending
    assert record.outcome == "failed" and record.error == "the caller's call ended"
    assert manager.calls[call_id].state == CallState.HANGUP_USER
    await manager.stop()


async def test_the_carrier_ending_our_leg_right_after_success_still_ends_it_transferred(tmp_path: Path) -> None:
    """SIP: a 2xx sipfrag, then the far end's BYE, both before the waiting task resumes."""
    manager, carrier, clock, call_id = await answered(tmp_path)
    pending = asyncio.ensure_future(manager.transfer(call_id, "+15550009999"))
    await settle()
    manager.process_event(CallEvent(EventType.TRANSFER, call_id=call_id, outcome="completed"))
    manager.process_event(CallEvent(EventType.ENDED, call_id=call_id, reason=CallState.HANGUP_USER))
    record = await pending
    assert record.outcome == "completed" and record.error is None
    assert manager.calls[call_id].state == CallState.TRANSFERRED and carrier.hangups == []
    await manager.stop()


async def test_a_restart_mid_transfer_applies_the_carriers_outcome(tmp_path: Path) -> None:
    manager, carrier, clock, call_id = await answered(tmp_path)
    pending = asyncio.ensure_future(manager.transfer(call_id, "+15550009999"))
    await settle()
    assert manager.calls[call_id].state == CallState.TRANSFERRING
    pending.cancel()
    await manager.stop()
    # the bridge comes back: the call is restored `transferring`, then the carrier's word arrives
    restarted = CallManager(manager.settings, carrier, clock=clock, store=CallStore(tmp_path))
    await restarted.start()
    call = restarted.calls[call_id]
    assert call.state == CallState.TRANSFERRING and call.transfer is not None and call.transfer.outcome is None
    restarted.process_event(CallEvent(EventType.TRANSFER, call_id=call_id, outcome="completed"))
    assert call.state == CallState.TRANSFERRED and call.transfer.outcome == "completed"
    await restarted.stop()
