"""/metrics through prometheus-client, scraped over HTTP during and after a real mock call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bridge.calls import CallEvent, CallState, EventType
from bridge.client import RpcClientError
from bridge.metrics import Metrics
from media.clock import RealClock
from media.formats import ULAW_8K
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.harness import rpc_client, run_bridge, wait_for
from tests.test_media_pipeline import make
from tests.test_mock_e2e import BASE, FAST_MOCK

ROOT = Path(__file__).resolve().parent.parent


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_during_and_after_a_mock_conversation(tmp_path: Path) -> None:
    script = ["A table for two."]
    config = {**BASE, "mock": {**FAST_MOCK, "calleeScript": script}}
    async with run_bridge(config, tmp_path) as runtime:
        call_id = (await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi!",
                                                                         "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.answeredAt is not None and runtime.manager.voice(call_id) is not None, 15)
        live = await scrape(runtime.port)
        assert value(live, "voicecall_calls_total", carrier="mock", direction="outbound") == 1
        states = {dict(k[1])["state"]: v for k, v in live.items() if k[0] == "voicecall_calls_active"}
        assert sum(states.values()) == 1 and set(states) <= {"answered", "active", "speaking", "listening"}
        assert value(live, "voicecall_media_streams_active") == 1

        # an engine error, through the manager's real path
        runtime.manager.emit(CallEvent(EventType.ERROR, call_id=call_id, error="stt: socket closed", retryable=True))

        # one caller turn answered, then the call is ended over RPC
        await wait_for(lambda: len(call.turns) == 1, timeout=20)
        await rpc_client(runtime).call("voicecall.end", {"callId": call_id})
        assert call.state == CallState.HANGUP_BOT
        await runtime.manager.drain()
        done = await scrape(runtime.port)

    assert value(done, "voicecall_calls_ended_total", carrier="mock", state="hangup-bot") == 1
    assert not [k for k in done if k[0] == "voicecall_calls_active"]
    assert value(done, "voicecall_media_streams_active") == 0
    assert value(done, "voicecall_media_frames_total", direction="in") > 20  # over 0.4 s each way
    assert value(done, "voicecall_media_frames_total", direction="out") > 20
    assert not [k for k in done if k[0].endswith("_created")]
    assert ("voicecall_media_frames_late_total", ()) in done and ("voicecall_media_frames_lost_total", ()) in done
    assert value(done, "voicecall_engine_errors_total", engine="stt") == 1
    assert ("voicecall_store_write_failures_total", ()) in done  # counted by the call store (test_faults)
    # the caller's turn: a total and the parts the mock pipeline can time
    turns = len(call.turns)
    assert turns == 1
    assert value(done, "voicecall_turn_latency_seconds_count", part="total") == turns
    # the caller's speech end comes from the bridge's VAD (the mock's recognizer reports none)
    for part in ("stt", "model", "piece", "tts", "bridge"):
        assert value(done, "voicecall_turn_latency_seconds_count", part=part) == turns, part
    total = value(done, "voicecall_turn_latency_seconds_sum", part="total")
    parts = sum(value(done, "voicecall_turn_latency_seconds_sum", part=p)
                for p in ("stt", "model", "piece", "tts", "bridge"))
    assert value(done, "voicecall_turn_latency_seconds_sum", part="stt") > 0
    # ... and `voicecall latency` reads the same parts back from the call log
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bridge", "latency", "--file", str(tmp_path / "calls.jsonl")],
                          check=False, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert rows["stt"][1] == "1" and float(rows["stt"][2]) > 0 and "not measured" not in proc.stdout
    assert 0 < total < 5 and abs(total - parts) < 0.01  # parts add up to the voice-to-voice total


async def test_late_and_lost_frames_count_live_and_after_the_bridge_closes() -> None:
    metrics = Metrics()
    bridge, _, _ = make(clock=RealClock())
    metrics.track_media(bridge)
    frame = bytes([0xFF]) * ULAW_8K.frame_bytes
    for seq in [1, 2, 3, *range(5, 12)]:  # 4 never comes in time ...
        bridge.receive(frame, seq)
    bridge.receive(frame, 4)  # ... and then it is too late
    assert (bridge.stats.lost_frames, bridge.stats.late_frames) == (1, 1)
    assert metrics.value("voicecall_media_frames_lost_total") == 1
    assert metrics.value("voicecall_media_frames_late_total") == 1
    assert metrics.value("voicecall_media_streams_active") == 1
    await bridge.close()
    assert metrics.value("voicecall_media_streams_active") == 0
    assert metrics.value("voicecall_media_frames_lost_total") == 1 and metrics.value("voicecall_media_frames_late_total") == 1
    assert metrics.value("voicecall_media_frames_total", direction="in") == bridge.stats.frames_in > 0


async def test_a_failing_speech_engine_is_counted_and_reported(tmp_path: Path) -> None:
    """TTS through the fake ElevenLabs with a key it refuses: an engine error, not a crashed task."""
    fake = await FakeElevenLabs().start()
    try:
        config = {**BASE, "tts": {"provider": "elevenlabs",
                                  "elevenlabs": {"apiKey": "xi-wrong", "baseUrl": fake.base_url}}}
        async with run_bridge(config, tmp_path) as runtime:
            events = runtime.manager.subscribe()
            client = rpc_client(runtime)
            call_id = (await client.call("voicecall.initiate", {"message": "Hi!", "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: runtime.metrics.value("voicecall_engine_errors_total", engine="tts") == 1, 15)
            seen = [events.get_nowait() for _ in range(events.qsize())]
            errors = [e for e in seen if e["type"] == "call.error"]
            assert errors == [{"type": "call.error", "callId": call_id, "state": str(call.state),
                               "error": "tts: ElevenLabs TTS failed: HTTP 401", "engine": "tts"}]
            assert fake.api_key not in errors[0]["error"]
            try:
                await client.call("voicecall.speak", {"callId": call_id, "message": "Still there?"})
                raise AssertionError("speaking with a broken engine succeeded")
            except RpcClientError as exc:
                assert "Could not speak" in str(exc) and "HTTP 401" in str(exc)
            assert runtime.metrics.value("voicecall_engine_errors_total", engine="tts") == 2
    finally:
        await fake.stop()
