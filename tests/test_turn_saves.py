"""Call-log writes on the turn path, checked in the real call log (calls.jsonl).

`save_soon`: a change that need not be on disk at once (a turn's timing record, made at its first
audio) rides on the call's next save, or is written SAVE_SOON_S later on the manager's clock, or at
stop; it never adds a line when a save came first. A partial transcript is published, not written."""

from __future__ import annotations

import json
from pathlib import Path

from bridge.calls import CallEvent, CallRecord, EventType
from bridge.config import build_settings
from bridge.manager import CallManager
from bridge.manager_core import SAVE_SOON_S
from bridge.store import LOG_NAME, CallStore
from media.clock import FakeClock
from tests.fakes.carrier import RecordingCarrier


def lines_of(path: Path, call_id: str) -> list[dict[str, object]]:
    return [rec for rec in map(json.loads, path.read_text().splitlines()) if rec["callId"] == call_id]


async def manager_with_call(tmp_path: Path) -> tuple[CallManager, FakeClock, CallRecord]:
    clock = FakeClock()
    settings = build_settings({"provider": "mock", "fromNumber": "+15550001234", "store": str(tmp_path)}, {})
    manager = CallManager(settings, RecordingCarrier(), clock=clock, store=CallStore(tmp_path))
    await manager.start()
    call = await manager.initiate("+15550007777", "Hello.", "notify")
    return manager, clock, call


async def test_written_after_the_delay_when_no_save_comes_first(tmp_path: Path) -> None:
    manager, clock, call = await manager_with_call(tmp_path)
    log = tmp_path / LOG_NAME
    before = len(lines_of(log, call.callId))
    call.metadata["turnNote"] = "first audio"
    manager.save_soon(call)
    manager.save_soon(call)  # one pending save per call
    await clock.advance(SAVE_SOON_S - 0.01)
    assert len(lines_of(log, call.callId)) == before, "not yet"
    await clock.advance(0.01)
    lines = lines_of(log, call.callId)
    assert len(lines) == before + 1 and lines[-1]["metadata"]["turnNote"] == "first audio"  # type: ignore[index]
    await manager.stop()


async def test_rides_on_the_next_save_and_adds_no_line(tmp_path: Path) -> None:
    manager, clock, call = await manager_with_call(tmp_path)
    log = tmp_path / LOG_NAME
    before = len(lines_of(log, call.callId))
    call.metadata["turnNote"] = "first audio"
    manager.save_soon(call)
    manager.save(call)  # e.g. the turn's end (LISTENING)
    await clock.advance(SAVE_SOON_S * 2)
    lines = lines_of(log, call.callId)
    assert len(lines) == before + 1 and lines[-1]["metadata"]["turnNote"] == "first audio"  # type: ignore[index]
    await manager.stop()


async def test_a_pending_save_is_written_at_stop(tmp_path: Path) -> None:
    manager, clock, call = await manager_with_call(tmp_path)
    call.metadata["turnNote"] = "first audio"
    manager.save_soon(call)
    await manager.stop()
    assert lines_of(tmp_path / LOG_NAME, call.callId)[-1]["metadata"]["turnNote"] == "first audio"  # type: ignore[index]


async def test_partial_transcripts_are_published_not_written(tmp_path: Path) -> None:
    manager, clock, call = await manager_with_call(tmp_path)
    seen: list[tuple[str, dict[str, object]]] = []
    manager.observers.append(lambda kind, c, extra: seen.append((kind, extra)))
    log = tmp_path / LOG_NAME
    before = len(lines_of(log, call.callId))
    for text in ("I would", "I would like", "I would like a table"):
        manager.process_event(CallEvent(EventType.SPEECH, call_id=call.callId, transcript=text, is_final=False))
    assert [extra["transcript"] for kind, extra in seen if kind == "call.partial"] == [
        "I would", "I would like", "I would like a table"]
    assert len(lines_of(log, call.callId)) == before, "no call-log write per partial"
    manager.process_event(CallEvent(EventType.SPEECH, call_id=call.callId, transcript="I would like a table.",
                                    is_final=True))
    lines = lines_of(log, call.callId)
    assert len(lines) == before + 1
    assert lines[-1]["transcript"][-1]["text"] == "I would like a table."  # type: ignore[index]
    await manager.stop()
