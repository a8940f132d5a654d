"""CallManager flows on a fake clock: notify, conversation turns, inbound policy, limits, timers, restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bridge.calls import CallEvent, CallRecord, CallState, Direction, EventType
from bridge.config import build_settings
from bridge.manager import CallError, CallManager
from bridge.store import CallStore
from carriers.base import ProviderStatus
from media.clock import FakeClock
from tests.fakes.carrier import RecordingCarrier


def make(tmp_path: Path, **overrides: object) -> tuple[CallManager, RecordingCarrier, FakeClock]:
    raw = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678",
           "store": str(tmp_path), "inboundPolicy": "allowlist", "allowFrom": ["+15550009999"],
           "outbound": {"notifyHangupDelaySec": 3}, **overrides}
    settings = build_settings(raw, {})
    carrier = RecordingCarrier()
    clock = FakeClock()
    return CallManager(settings, carrier, clock=clock, store=CallStore(tmp_path)), carrier, clock


def ev(kind: EventType, call_id: str | None = None, **kw: object) -> CallEvent:
    return CallEvent(kind, call_id=call_id, **kw)  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def started(tmp_path: Path, **overrides: object) -> tuple[CallManager, RecordingCarrier, FakeClock]:
    """`make`, started."""
    manager, carrier, clock = make(tmp_path, **overrides)
    await manager.start()
    return manager, carrier, clock


async def answered(tmp_path: Path, **overrides: object) -> tuple[CallManager, RecordingCarrier, FakeClock, CallRecord]:
    """A started manager with one outbound conversation call ("Hi"), answered."""
    manager, carrier, clock = await started(tmp_path, **overrides)
    call = await manager.initiate(None, "Hi", "conversation")
    manager.process_event(ev(EventType.ANSWERED, call.callId))
    return manager, carrier, clock, call


async def test_notify_hangs_up_delay_after_playback_ends(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path)
    await manager.start()
    call = await manager.initiate(None, "Your package arrives today.", "notify")
    assert carrier.initiated[0].to == "+15550005678" and call.providerCallId == "fake-1"
    manager.process_event(ev(EventType.RINGING, call.callId))
    manager.process_event(ev(EventType.ANSWERED, call.callId))
    await settle()
    assert carrier.spoken == [(call.callId, "Your package arrives today.")]
    await clock.advance(2.9)
    assert not call.terminal
    await clock.advance(0.2)
    await settle()
    assert call.state == CallState.HANGUP_BOT and carrier.hangups == [(call.callId, CallState.HANGUP_BOT)]
    await manager.stop()


async def test_conversation_turn_returns_transcript_and_records_latency(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path)
    await manager.start()
    call = await manager.initiate("+15550007777", "Hello there", "conversation")
    manager.process_event(ev(EventType.ANSWERED, call.callId))
    await settle()
    assert call.state == CallState.LISTENING
    turn = asyncio.ensure_future(manager.continue_call(call.callId, "How are you?"))
    await settle()
    token = carrier.listening[-1][1]
    await clock.advance(1.5)
    manager.process_event(ev(EventType.SPEECH, call.callId, transcript="Fine thanks", turn_token=token))
    assert await turn == "Fine thanks"
    assert call.metadata["turnCount"] == 1 and call.metadata["lastTurnLatencyMs"] == pytest.approx(1500, abs=1)
    assert [t.speaker for t in call.transcript] == ["bot", "bot", "user"]
    await manager.stop()


async def test_stale_turn_token_cannot_complete_a_newer_turn(tmp_path: Path) -> None:
    manager, carrier, clock, call = await answered(tmp_path)
    turn = asyncio.ensure_future(manager.continue_call(call.callId, "Question?"))
    await settle()
    manager.process_event(ev(EventType.SPEECH, call.callId, transcript="old answer", turn_token="stale-token"))
    await settle()
    assert not turn.done()
    manager.process_event(ev(EventType.SPEECH, call.callId, transcript="new answer", turn_token=carrier.listening[-1][1]))
    assert await turn == "new answer"
    # the answer to an old question stays out of the transcript the model reads, and is counted
    assert [t.text for t in call.transcript if t.speaker == "user"] == ["new answer"]
    assert call.metadata["staleTranscripts"] == 1
    await manager.stop()


async def test_overlapping_turns_are_refused_and_timeout_is_clear(tmp_path: Path) -> None:
    manager, carrier, clock, call = await answered(tmp_path, transcriptTimeoutMs=5000)
    first = asyncio.ensure_future(manager.continue_call(call.callId, "One?"))
    await settle()
    with pytest.raises(CallError, match="already in progress"):
        await manager.continue_call(call.callId, "Two?")
    await clock.advance(5.1)
    with pytest.raises(CallError, match="Timed out waiting for transcript after 5000ms"):
        await first
    await manager.stop()


async def test_duplicate_events_are_processed_once(tmp_path: Path) -> None:
    manager, carrier, clock, call = await answered(tmp_path)
    manager.process_event(ev(EventType.DTMF, call.callId, digits="5", dedupe_key="d1"))
    manager.process_event(ev(EventType.DTMF, call.callId, digits="5", dedupe_key="d1"))
    assert call.metadata["dtmf"] == "5"
    await manager.stop()


@pytest.mark.parametrize(("policy", "caller", "accepted"), [
    ("disabled", "+15550009999", False),
    ("allowlist", "+15550009999", True),
    ("allowlist", "+1 (555) 000-9999", True),  # digits-only match
    ("allowlist", "+15550008888", False),
    ("allowlist", None, False),
    ("pairing", "+15550009999", True),
    ("open", "+15550008888", True),
])
async def test_inbound_policy(tmp_path: Path, policy: str, caller: str | None, accepted: bool) -> None:
    manager, carrier, clock = make(tmp_path, inboundPolicy=policy)
    await manager.start()
    event = ev(EventType.INITIATED, provider_call_id="in-1", direction=Direction.INBOUND,
               from_number=caller, to_number="+15550001234")
    call = manager.process_event(event)
    # the carrier re-sends the same call's webhook: still exactly one reject
    manager.process_event(ev(EventType.RINGING, provider_call_id="in-1", direction=Direction.INBOUND,
                             from_number=caller))
    await settle()
    if accepted:
        assert call is not None and call.direction == Direction.INBOUND
        assert carrier.answered == [call.callId] and carrier.rejected == []
        manager.process_event(ev(EventType.ANSWERED, provider_call_id="in-1"))
        await settle()
        assert carrier.spoken == [(call.callId, manager.settings.inboundGreeting)]
    else:
        assert call is None and carrier.rejected == ["in-1"] and carrier.answered == []
    await manager.stop()


async def test_concurrency_limit_counts_inbound_calls(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path, maxConcurrentCalls=1, inboundPolicy="open")
    await manager.start()
    inbound = manager.process_event(ev(EventType.INITIATED, provider_call_id="in-1", direction=Direction.INBOUND,
                                       from_number="+15550003333"))
    assert inbound is not None
    with pytest.raises(CallError, match=r"Maximum concurrent calls \(1\) reached"):
        await manager.initiate(None, "Hi", "notify")
    refused = manager.process_event(ev(EventType.INITIATED, provider_call_id="in-2", direction=Direction.INBOUND,
                                       from_number="+15550004444"))
    await settle()
    assert refused is None and carrier.rejected == ["in-2"]
    manager.process_event(ev(EventType.ENDED, provider_call_id="in-1", reason=CallState.HANGUP_USER))
    assert (await manager.initiate(None, "Hi", "notify")).state == CallState.INITIATED
    await manager.stop()


async def test_max_duration_counts_from_answer(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path, maxDurationSeconds=60)
    await manager.start()
    call = await manager.initiate(None, "Hi", "conversation")
    await clock.advance(30)  # ringing time does not count
    manager.process_event(ev(EventType.ANSWERED, call.callId))
    await clock.advance(59)
    assert not call.terminal
    await clock.advance(2)
    await settle()
    assert call.state == CallState.TIMEOUT and (call.callId, CallState.TIMEOUT) in carrier.hangups
    await manager.stop()


async def test_reaper_ends_calls_without_terminal_event(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path, staleCallReaperSeconds=90, maxDurationSeconds=600,
                                   ringTimeoutMs=600_000)  # the reaper, not our ring timeout, ends it
    await manager.start()
    call = await manager.initiate(None, "Hi", "notify")
    await clock.advance(60)
    assert not call.terminal
    await clock.advance(31)  # reaper runs every 30 s: at 90 s it finds the call stale
    await settle()
    assert call.terminal and call.metadata.get("reaped") is True
    await manager.stop()


async def test_illegal_transition_is_refused_not_fatal(tmp_path: Path) -> None:
    manager, carrier, clock, call = await answered(tmp_path)
    manager.process_event(ev(EventType.RINGING, call.callId))  # backwards: refused
    assert call.state in (CallState.ANSWERED, CallState.SPEAKING, CallState.LISTENING)
    manager.process_event(ev(EventType.ENDED, call.callId, reason=CallState.COMPLETED))
    manager.process_event(ev(EventType.ANSWERED, call.callId))  # after terminal: ignored
    assert call.state == CallState.COMPLETED
    await manager.stop()


async def test_carrier_failure_marks_call_failed(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path)
    carrier.fail_initiate = "number not reachable"
    await manager.start()
    with pytest.raises(CallError, match="number not reachable"):
        await manager.initiate(None, "Hi", "notify")
    assert [c.state for c in manager.calls.values()] == [CallState.FAILED]
    await manager.stop()


async def test_restart_recovery_from_log_with_torn_last_line(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path, maxDurationSeconds=300, maxConcurrentCalls=5, ringTimeoutMs=600_000)
    await manager.start()
    alive = await manager.initiate(None, "Hi", "conversation")
    manager.process_event(ev(EventType.ANSWERED, alive.callId, dedupe_key="answer-1"))
    gone = await manager.initiate(None, "Hi", "conversation")
    done = await manager.initiate(None, "Bye", "notify")
    manager.process_event(ev(EventType.ENDED, done.callId, reason=CallState.COMPLETED))
    await clock.advance(100)
    await manager.stop()
    with open(tmp_path / "calls.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"callId": "torn", "state": "answ')  # crash mid-write

    # a fresh process: same log, carrier says one call is still up and one has ended
    restarted, carrier2, clock2 = make(tmp_path, maxDurationSeconds=300, maxConcurrentCalls=5, ringTimeoutMs=600_000)
    clock2._now = clock.time()  # noqa: SLF001 - same wall time as before the restart
    carrier2.status = {alive.providerCallId: ProviderStatus(terminal=False),
                       gone.providerCallId: ProviderStatus(terminal=True, state=CallState.COMPLETED)}
    await restarted.start()
    assert restarted.calls[alive.callId].state != CallState.COMPLETED and not restarted.calls[alive.callId].terminal
    assert restarted.calls[gone.callId].state == CallState.COMPLETED
    assert restarted.calls[done.callId].state == CallState.COMPLETED
    # a replayed webhook has no side effect
    before = len(restarted.calls[alive.callId].processedEventIds)
    restarted.process_event(ev(EventType.ANSWERED, alive.callId, dedupe_key="answer-1"))
    assert len(restarted.calls[alive.callId].processedEventIds) == before
    # the max-duration timer resumed with the remaining time (300 - 100 s)
    await clock2.advance(199)
    assert not restarted.calls[alive.callId].terminal
    await clock2.advance(2)
    await settle()
    assert restarted.calls[alive.callId].state == CallState.TIMEOUT
    # and the log is still appendable after the torn line
    lines = (tmp_path / "calls.jsonl").read_text().splitlines()
    json.loads(lines[-1])
    await restarted.stop()


async def test_initiate_validation(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path, toNumber=None)
    await manager.start()
    with pytest.raises(CallError, match="No destination"):
        await manager.initiate(None, "Hi")
    with pytest.raises(CallError, match="mode"):
        await manager.initiate("+15550001111", "Hi", "yell")
    with pytest.raises(CallError, match="non-empty"):
        await manager.initiate("+15550001111", "  ")
    with pytest.raises(CallError, match="not found"):
        await manager.speak("nope", "hi")
    ringing = await manager.initiate("+15550001111", "Hi", "conversation")
    with pytest.raises(CallError, match="is not answered yet"):
        await manager.continue_call(ringing.callId, "Hello?")
    await manager.stop()
