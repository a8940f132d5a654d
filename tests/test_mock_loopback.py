"""Loopback audio on a mock call, measured as signals.

1. Bot -> caller: what the mock caller hears after the bridge and G.711 matches the espeak-ng
   output (correlation >= 0.95 after alignment, no missing frame, duration within one frame).
2. Caller -> bot: a caller WAV (speech, then DTMF tones) goes through the bridge; the digits are
   detected exactly and the speech reaches the STT engine's input intact.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from bridge.calls import CallState
from media import g711
from media.dtmf import dtmf_tones
from media.formats import AudioEncoding
from media.resample import StreamResampler
from media.stt.base import SttEngine, SttSession
from media.tts.espeak import EspeakTts
from tests.harness import rpc_client, run_bridge, wait_for

FAST_MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0,
             "calleeScript": []}
BASE = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678",
        "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
        "responseModel": "offline", "mock": FAST_MOCK}


def to_array(pcm: bytes) -> np.ndarray:
    return np.frombuffer(bytes(pcm), dtype="<i2").astype(np.float64)


def resample(pcm: bytes, rate_in: int, rate_out: int) -> bytes:
    r = StreamResampler(rate_in, rate_out)
    return r.process(pcm) + r.flush()


def best_alignment(reference: np.ndarray, signal: np.ndarray, max_lag: int) -> tuple[int, float]:
    """Lag of `signal` against `reference` with the highest normalized correlation."""
    best = (0, -1.0)
    for lag in range(0, max_lag):
        a = signal[lag:lag + len(reference)]
        b = reference[:len(a)]
        if len(a) < len(reference) // 2:
            break
        c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
        if c > best[1]:
            best = (lag, c)
    return best


async def synthesize(text: str) -> tuple[bytes, int]:
    engine = EspeakTts()
    return b"".join([c async for c in engine.synthesize(text)]), engine.sample_rate


async def test_bot_speech_reaches_the_caller_intact(tmp_path: Path) -> None:
    message = "The quick brown fox jumps over the lazy dog, twice."
    async with run_bridge(BASE, tmp_path) as runtime:
        call_id = (await rpc_client(runtime).call("voicecall.initiate",
                                                  {"message": message, "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        callee = runtime.carrier.callee(call_id)
        heard = to_array(callee.heard)
        frames = callee.frames_received
    source, rate = await synthesize(message)
    reference = to_array(resample(source, rate, 8000))
    # G.711 is part of the path: compare with the u-law round trip of the reference too
    lag, corr = best_alignment(reference, heard, max_lag=800)
    assert corr >= 0.95, f"correlation {corr:.4f}"
    expected_frames = math.ceil(len(reference) / 160)
    assert frames == expected_frames, "no missing (or extra) frame"
    assert abs(len(heard) - len(reference)) <= 160, "duration within one 20 ms frame"
    print(f"loopback bot->caller: correlation {corr:.4f} at lag {lag}, {frames} frames")


class CaptureStt(SttEngine):
    """An STT engine that records its input (what a real engine would receive)."""

    def __init__(self) -> None:
        self.sessions: list[CaptureSession] = []

    def open(self, *, sample_rate: int, on_event, wire_format=None) -> SttSession:  # type: ignore[override]
        session = CaptureSession(sample_rate, on_event)
        self.sessions.append(session)
        return session


class CaptureSession(SttSession):
    wants_wire = False

    def __init__(self, rate: int, on_event) -> None:  # type: ignore[no-untyped-def]
        self.rate = rate
        self.audio = bytearray()
        self.on_event = on_event

    async def start(self) -> None:
        return None

    def feed(self, pcm: bytes) -> None:
        self.audio += pcm

    def feed_wire(self, payload: bytes) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_caller_speech_and_dtmf_reach_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    capture = CaptureStt()
    monkeypatch.setattr("media.stt.factory.create_stt", lambda streaming: capture)
    config = {**BASE, "streaming": {"enabled": True, "provider": "pocketsphinx"}}
    speech, rate = await synthesize("Hello, I am calling about my order.")
    silence = bytes(int(rate * 0.3) * 2)
    caller_wav = speech + silence + dtmf_tones("159#", rate) + silence
    async with run_bridge(config, tmp_path) as runtime:
        call_id = (await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        callee = runtime.carrier.callee(call_id)
        session = capture.sessions[-1]
        session.audio.clear()
        await asyncio.wait_for(callee.play(caller_wav, rate), 20)
        await wait_for(lambda: call.metadata.get("dtmf") == "159#", timeout=5)
        received = to_array(bytes(session.audio))
        pipeline_rate = session.rate
    # reference: the caller's audio through the same wire path (8 kHz u-law), at the pipeline rate
    wire = g711.decode(g711.encode(resample(speech, rate, 8000), AudioEncoding.PCMU), AudioEncoding.PCMU)
    reference = to_array(resample(wire, 8000, pipeline_rate))
    lag, corr = best_alignment(reference, received, max_lag=pipeline_rate // 5)
    assert corr >= 0.95, f"correlation at the STT input {corr:.4f}"
    print(f"loopback caller->pipeline: correlation {corr:.4f} at lag {lag}; digits {call.metadata['dtmf']}")


async def test_echo_mode_plays_the_caller_back(tmp_path: Path) -> None:
    """The benchmark pipeline: caller audio -> decode -> resample -> resample back -> encode -> paced send."""
    config = {**BASE, "streaming": {"enabled": True, "provider": "none", "echo": True}}
    speech, rate = await synthesize("Echo, echo, can you hear me?")
    async with run_bridge(config, tmp_path) as runtime:
        call_id = (await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        callee = await _wait_callee(runtime, call_id)
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        callee.heard.clear()
        await asyncio.wait_for(callee.play(speech, rate), 20)
        await asyncio.sleep(0.6)  # the tail of the echo is still in flight
        heard = to_array(callee.heard)
    wire = g711.decode(g711.encode(resample(speech, rate, 8000), AudioEncoding.PCMU), AudioEncoding.PCMU)
    lag, corr = best_alignment(to_array(wire), heard, max_lag=4000)
    assert corr >= 0.95, f"echo correlation {corr:.4f}"


async def _wait_callee(runtime, call_id):  # type: ignore[no-untyped-def]
    await wait_for(lambda: runtime.carrier.callee(call_id) is not None, timeout=10)
    return runtime.carrier.callee(call_id)


async def test_recording_has_caller_and_bridge_on_their_own_channels(tmp_path: Path) -> None:
    import soundfile

    config = {**BASE, "recording": {"enabled": True}, "mock": {**FAST_MOCK, "calleeScript": ["Hello from the caller side."]}}
    async with run_bridge(config, tmp_path) as runtime:
        call_id = (await rpc_client(runtime).call("voicecall.initiate", {"message": "Hello from the bridge.",
                                                                          "mode": "notify"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.terminal, timeout=20)
        await runtime.manager.drain()  # the voice's close (it waits for the recorder's writer thread)
    path = tmp_path / "recordings" / f"{call_id}.wav"
    data, rate = soundfile.read(path, dtype="int16", always_2d=True)
    assert data.shape[1] == 2 and rate == runtime.settings.pipelineSampleRate
    caller, bridge = data[:, 0].astype(float), data[:, 1].astype(float)
    block = rate // 10

    def active(ch: np.ndarray) -> np.ndarray:
        return np.array([np.sqrt(np.mean(ch[i:i + block] ** 2)) > 300 for i in range(0, len(ch) - block, block)])

    bot_on, caller_on = active(bridge), active(caller)
    assert bot_on.sum() >= 8, "the bridge channel holds the spoken message"
    assert caller_on.sum() >= 5, "the caller channel holds the caller's reply"
    # one timeline: the caller answers after the bot's message, not on top of it
    assert np.argmax(caller_on) > np.argmax(bot_on)
