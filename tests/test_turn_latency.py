"""Turn timing (pure), `voicecall latency` over a real call log, and call-id logging on a real call."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.calls import CallRecord, CallState, Direction, TurnRecord
from bridge.latency import latency_stats, percentile
from bridge.logs import TEXT_FORMAT, CallIdFilter, JsonFormatter
from bridge.store import CallStore
from bridge.turnmarks import TurnTracker, turn_parts
from tests.harness import rpc_client, run_bridge, wait_for
from tests.test_mock_e2e import BASE, FAST_MOCK

ROOT = Path(__file__).resolve().parent.parent


def test_parts_are_the_gaps_between_milestones_and_total_spans_them() -> None:
    marks = {"speechEnd": 10.0, "sttFinal": 10.3, "modelFirstToken": 10.7, "firstPiece": 10.9,
             "ttsFirstByte": 11.05, "firstAudioOut": 11.1}
    parts = turn_parts(marks)
    assert parts == {"stt": 300.0, "model": 400.0, "piece": 200.0, "tts": 150.0, "bridge": 50.0, "total": 1100.0}
    # a carrier-side recognizer: no separate speech end, the turn starts at the final transcript
    del marks["speechEnd"]
    assert "stt" not in turn_parts(marks) and turn_parts(marks)["total"] == 800.0


def test_tracker_times_only_caller_turns() -> None:
    tracker = TurnTracker()
    # the greeting: audio out with no caller speech before it is not a turn
    assert tracker.mark("c", "ttsFirstByte", 1.0) is None and tracker.mark("c", "firstAudioOut", 1.1) is None
    tracker.mark("c", "sttFinal", 5.0)
    tracker.mark("c", "sttFinal", 5.5)  # the caller went on: the turn restarts, same number
    tracker.mark("c", "modelFirstToken", 6.0)
    tracker.mark("c", "modelFirstToken", 6.2)  # the earliest report of a milestone wins
    tracker.mark("c", "firstPiece", 6.3)
    tracker.mark("c", "ttsFirstByte", 6.4)
    turn = tracker.mark("c", "firstAudioOut", 6.5)
    assert turn is not None and turn.number == 1
    assert turn.record(None).to_json() == {"n": 1, "modelMs": 500.0, "pieceMs": 300.0, "ttsMs": 100.0, "bridgeMs": 100.0,
                             "totalMs": 1000.0}
    # barge-in after the model started: that turn is abandoned, the next one gets a new number
    tracker.mark("c", "speechEnd", 10.0)
    tracker.mark("c", "modelFirstToken", 10.5)
    tracker.mark("c", "speechEnd", 11.0)
    tracker.mark("c", "sttFinal", 11.2)
    assert tracker.mark("c", "firstAudioOut", 12.0).number == 3  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown turn milestone"):
        tracker.mark("c", "whenever", 1.0)


def test_a_vad_speech_end_dated_back_joins_the_turn_its_final_opened() -> None:
    tracker = TurnTracker()
    # a fast recognizer's final first, then the VAD's silence (after its hangover), dated back
    tracker.mark("c", "sttFinal", 5.0)
    tracker.mark("c", "speechEnd", 4.6)
    tracker.mark("c", "modelFirstToken", 5.4)
    tracker.mark("c", "speechEnd", 4.8)  # a later pause, still before the final: the last one counts
    turn = tracker.mark("c", "firstAudioOut", 6.0)
    assert turn is not None and turn.number == 1 and turn.parts["stt"] == 200.0 and turn.parts["total"] == 1200.0
    # a silence dated before the answer went out belongs to no new turn
    assert tracker.mark("c", "speechEnd", 5.9) is None and tracker.mark("c", "firstAudioOut", 7.0) is None
    # a silence after the final is the caller speaking again: a fresh turn
    tracker.mark("c", "sttFinal", 10.0)
    tracker.mark("c", "speechEnd", 10.5)
    tracker.mark("c", "sttFinal", 10.9)
    assert tracker.mark("c", "firstAudioOut", 11.0).parts["stt"] == 400.0  # type: ignore[union-attr]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 95, 99)] == [50.0, 95.0, 99.0]
    assert percentile([7.0], 99) == 7.0


def write_log(store: Path, calls: dict[str, list[list[dict]]]) -> Path:
    """The call log as the manager writes it: a full record per change, turns growing over time."""
    log = CallStore(store)
    log.open()
    for n, (call_id, versions) in enumerate(calls.items()):
        for turns in versions:
            log.append(CallRecord(callId=call_id, provider="mock", direction=Direction.OUTBOUND,
                                  state=CallState.LISTENING, from_="+15550001234", to="+15550005678",
                                  startedAt=1000.0 + n, metadata={"turns": turns}))
    log.close()
    with open(store / "calls.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"torn line\n')
    return store / "calls.jsonl"


def test_latency_report_from_the_call_log(tmp_path: Path) -> None:
    first = [{"n": 1, "totalMs": 900.0, "modelMs": 600.0, "ttsMs": 250.0, "bridgeMs": 50.0}]
    both = first + [{"n": 2, "totalMs": 1500.0, "modelMs": 1100.0, "ttsMs": 350.0, "bridgeMs": 50.0}]
    log = write_log(tmp_path, {"a": [first, both], "b": [[{"n": 1, "totalMs": 700.0, "sttMs": 200.0}]]})
    stats = latency_stats(log)
    assert stats is not None and stats["turns"] == 3 and stats["calls"] == 2  # repeated records counted once
    assert stats["parts"]["total"] == {"count": 3, "p50": 900.0, "p95": 1500.0, "p99": 1500.0,
                                       "min": 700.0, "max": 1500.0}
    assert stats["parts"]["stt"]["count"] == 1 and "piece" not in stats["parts"]
    assert latency_stats(log, last=1)["parts"]["total"]["max"] == 700.0  # type: ignore[index]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bridge", "latency", "--file", str(log)], check=False,
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "voice-to-voice turn latency over 3 turn(s) in 2 call(s)" in proc.stdout
    row = next(line.split() for line in proc.stdout.splitlines() if line.strip().startswith("total"))
    assert row == ["total", "3", "900", "1500", "1500", "1500"]
    assert "not measured on these calls: piece" in proc.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = subprocess.run([sys.executable, "-m", "bridge", "latency", "--file", str(empty)], check=False,
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0 and "no timed turns" in proc.stdout


def test_one_turn_record_read_from_every_shape_of_call_log(tmp_path: Path) -> None:
    """`CallRecord.turns` is the one record; lines written before it (the monitor's `metadata.turns`,
    the conversation engine's `turnTimings`) still read, as the same parts."""
    new = CallRecord(callId="new", provider="mock", direction=Direction.OUTBOUND, state=CallState.LISTENING,
                     from_="+15550001234", to="+15550005678", startedAt=1000.0,
                     turns=[TurnRecord(n=1, at=1000.5, mode="realtime", sttMs=310.0, modelMs=420.0, bridgeMs=3.0,
                                       totalMs=733.0, interrupted=True)])
    line = new.to_json()
    assert line["turns"] == [{"n": 1, "at": 1000.5, "mode": "realtime", "interrupted": True, "sttMs": 310.0,
                              "modelMs": 420.0, "bridgeMs": 3.0, "totalMs": 733.0}]
    assert "turns" not in line["metadata"] and "turnTimings" not in line
    assert CallRecord.from_json(json.loads(json.dumps(line))).turns == new.turns
    base = {"provider": "mock", "direction": "outbound", "state": "listening", "from": "+1", "to": "+2"}
    monitor_era = {**base, "callId": "m", "startedAt": 1001.0,
                   "metadata": {"turns": [{"n": 1, "totalMs": 900.0, "sttMs": 200.0, "modelMs": 500.0}]}}
    engine_era = {**base, "callId": "e", "startedAt": 1002.0, "metadata": {}, "turnTimings": [
        {"at": 1002.5, "mode": "streaming", "modelFirstTokenMs": 400.0, "firstPieceMs": 560.0,
         "ttsFirstByteMs": 765.0, "firstAudioMs": 770.0, "interrupted": True}]}
    (m,) = CallRecord.from_json(monitor_era).turns
    assert m.parts() == {"stt": 200.0, "model": 500.0, "total": 900.0}
    assert "turns" not in CallRecord.from_json(monitor_era).metadata
    (e,) = CallRecord.from_json(engine_era).turns
    assert e.parts() == {"model": 400.0, "piece": 160.0, "tts": 205.0, "bridge": 5.0, "total": 770.0}
    assert e.mode == "streaming" and e.interrupted and e.at == 1002.5
    log = tmp_path / "calls.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in (line, monitor_era, engine_era)))
    stats = latency_stats(log)
    assert stats is not None and stats["turns"] == 3 and stats["calls"] == 3
    assert stats["parts"]["total"]["count"] == 3 and stats["parts"]["piece"]["count"] == 1


async def test_every_log_line_of_a_call_carries_its_call_id(tmp_path: Path) -> None:
    stream = io.StringIO()
    json_handler = logging.StreamHandler(stream)
    json_handler.addFilter(CallIdFilter())
    json_handler.setFormatter(JsonFormatter())
    text_stream = io.StringIO()
    text_handler = logging.StreamHandler(text_stream)
    text_handler.addFilter(CallIdFilter())
    text_handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logger = logging.getLogger("bridge")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(json_handler)
    logger.addHandler(text_handler)
    try:
        config = {**BASE, "maxDurationSeconds": 1, "mock": {**FAST_MOCK, "calleeScript": []}}
        async with run_bridge(config, tmp_path) as runtime:
            logging.getLogger("bridge.test").info("outside any call")
            call_id = (await rpc_client(runtime).call("voicecall.initiate",
                                                      {"message": "Hello there.", "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: call.terminal, timeout=15)
            await runtime.manager.drain()
    finally:
        logger.removeHandler(json_handler)
        logger.removeHandler(text_handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert call.state == CallState.TIMEOUT
    # the max-duration timer fires from the clock, far from the request that placed the call
    timer = [r for r in lines if "max duration reached" in r["message"]]
    assert timer and all(r["callId"] == call_id for r in timer)
    outside = [r for r in lines if r["message"] == "outside any call"]
    assert outside and "callId" not in outside[0]
    assert f"[{call_id}]: call {call_id}: max duration reached" in text_stream.getvalue()
    assert "[-]: outside any call" in text_stream.getvalue()
