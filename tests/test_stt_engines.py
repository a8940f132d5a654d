"""STT engines: OpenAI Realtime transcription (real websockets client vs. a local fake server
speaking the Realtime protocol), pocketsphinx offline, and the factory."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import time
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from media import g711
from media.formats import ALAW_8K, ULAW_8K, AudioFormat
from media.pipeline import MediaPipeline
from media.stt.base import SttError, SttEvent
from media.stt.factory import create_stt
from media.stt.openai_realtime import OpenAiRealtimeStt, realtime_url
from media.stt.pocketsphinx import PocketsphinxStt
from media.stt.pocketsphinx import available as pocketsphinx_available
from media.ws_client import InlineClientConnection
from tests.fakes.openai_server import FakeOpenAI

HAVE_ESPEAK = subprocess.run(["which", "espeak-ng"], capture_output=True).returncode == 0


def speech(text: str, rate: int) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="int16")
    y = soxr.resample(x, sr, rate, quality="HQ").astype("<i2")
    gap = np.zeros(rate // 2, dtype="<i2")
    return np.concatenate([gap, y, gap, gap])


def corr_at_best_lag(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a) + len(b)
    size = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    lag = int(np.argmax(xc))
    lag = lag - size if lag > size // 2 else lag
    x, y = a[max(0, lag) :], b[max(0, -lag) :]
    m = min(len(x), len(y))
    return float(np.corrcoef(x[:m], y[:m])[0, 1])


@pytest.fixture
async def fake():  # type: ignore[no-untyped-def]
    f = await FakeOpenAI().start()
    yield f
    await f.stop()


def engine(fake: FakeOpenAI, **kw: object) -> OpenAiRealtimeStt:
    cfg = {"apiKey": fake.api_key, "baseUrl": fake.base_url, "silenceDurationMs": 300, "vadThreshold": 0.4, "prefixPaddingMs": 200}
    cfg.update(kw)  # type: ignore[arg-type]
    stt = create_stt({"provider": "openai", "providers": {"openai": cfg}})
    assert isinstance(stt, OpenAiRealtimeStt)
    stt.backoff_s = 0.05
    return stt


async def wait_until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > timeout:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def test_realtime_url_from_any_base() -> None:
    assert realtime_url("wss://api.openai.com/v1") == "wss://api.openai.com/v1/realtime?intent=transcription"
    assert realtime_url("https://example.test/v1/") == "wss://example.test/v1/realtime?intent=transcription"
    assert realtime_url("http://127.0.0.1:9/v1") == "ws://127.0.0.1:9/v1/realtime?intent=transcription"


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed")
async def test_pcm16_session_events_and_audio_intact(fake: FakeOpenAI) -> None:
    events: list[SttEvent] = []
    session = engine(fake).open(sample_rate=16000, on_event=events.append)
    assert not session.wants_wire
    await session.start()
    x = speech("Hello there, I need some help.", 16000)
    data = x.tobytes()
    for i in range(0, len(data), 640):
        session.feed(data[i : i + 640])
    await wait_until(lambda: any(e.kind == "final" for e in events))
    await session.close()
    s = fake.sessions[0]
    upd = s.updates[0]
    assert upd["type"] == "transcription_session.update"
    assert upd["session"]["input_audio_format"] == "pcm16"
    assert upd["session"]["input_audio_transcription"]["model"] == "gpt-4o-transcribe"
    assert upd["session"]["turn_detection"] == {"type": "server_vad", "threshold": 0.4, "prefix_padding_ms": 200, "silence_duration_ms": 300}
    assert s.headers["Authorization"] == f"Bearer {fake.api_key}" and s.query == {"intent": "transcription"}
    # The audio reached the engine intact, at 24 kHz.
    got = np.frombuffer(bytes(s.audio), dtype="<i2").astype(float)
    ref = soxr.resample(x, 16000, 24000, quality="HQ").astype(float)
    c = corr_at_best_lag(got, ref)
    assert c >= 0.99 and abs(len(got) - len(ref)) < 2400
    kinds = [e.kind for e in events]
    assert kinds[0] == "speech_started" and "partial" in kinds
    assert [e.text for e in events if e.kind == "partial"][-1] == "hello there"
    # the server VAD's speech_stopped is the caller's speech end, ahead of the transcript (turn timing)
    assert session.reports_speech_end and kinds.index("speech_ended") < kinds.index("partial")
    assert [e.text for e in events if e.kind == "final"] == ["hello there"]


@pytest.mark.parametrize("fmt", [ULAW_8K, ALAW_8K], ids=["ulaw", "alaw"])
async def test_g711_passthrough_is_byte_exact(fake: FakeOpenAI, fmt: AudioFormat) -> None:
    session = engine(fake).open(sample_rate=16000, on_event=lambda e: None, wire_format=fmt)
    assert session.wants_wire
    await session.start()
    rng = np.random.default_rng(1)
    payloads = [bytes(rng.integers(0, 256, 160, dtype=np.uint8)) for _ in range(50)]
    for p in payloads:
        session.feed_wire(p)
        session.feed(b"\x00" * 640)  # ignored: passthrough sessions take the wire payloads only
    await wait_until(lambda: len(fake.sessions[0].audio) >= 50 * 320)
    await session.close()
    s = fake.sessions[0]
    assert s.updates[0]["session"]["input_audio_format"] == ("g711_ulaw" if fmt is ULAW_8K else "g711_alaw")
    assert bytes(s.audio) == g711.decode(b"".join(payloads), fmt.encoding)


async def test_appends_are_written_at_once_in_order(fake: FakeOpenAI) -> None:
    """With a socket up and nothing queued, each payload's append is written from feed_wire itself (no
    sender task hop, media/ws_client.py); what was queued before the socket still goes first, in order."""
    session = engine(fake).open(sample_rate=16000, on_event=lambda e: None, wire_format=ULAW_8K)
    payloads = [bytes([0x30 + i]) * 160 for i in range(30)]
    for p in payloads[:5]:
        session.feed_wire(p)  # no socket yet: queued
    await session.start()
    ws = session.socket
    assert isinstance(ws, InlineClientConnection)
    for p in payloads[5:]:
        session.feed_wire(p)
    await wait_until(lambda: len(fake.sessions[0].audio) >= 30 * 320)
    assert bytes(fake.sessions[0].audio) == g711.decode(b"".join(payloads), ULAW_8K.encoding)
    assert ws.written_now >= 25 and session.sent_bytes == 30 * 160
    await session.close()


async def test_passthrough_can_be_disabled_and_l16_wire_uses_pcm16(fake: FakeOpenAI) -> None:
    s1 = engine(fake, passthroughG711=False).open(sample_rate=16000, on_event=lambda e: None, wire_format=ULAW_8K)
    from media.formats import AudioEncoding

    s2 = engine(fake).open(sample_rate=16000, on_event=lambda e: None, wire_format=AudioFormat(AudioEncoding.L16, 16000))
    assert not s1.wants_wire and s1.input_format == "pcm16"
    assert not s2.wants_wire and s2.input_format == "pcm16"


async def test_reconnects_with_backoff_and_loses_no_audio(fake: FakeOpenAI) -> None:
    fake.drop_after_appends = 5
    fake.reject_connections = 0
    events: list[SttEvent] = []
    session = engine(fake).open(sample_rate=8000, on_event=events.append, wire_format=ULAW_8K)
    await session.start()
    payloads = [bytes([i % 256]) * 160 for i in range(40)]
    for p in payloads:
        session.feed_wire(p)
        await asyncio.sleep(0.005)
    await wait_until(lambda: len(fake.sessions) == 2 and sum(len(s.audio) for s in fake.sessions) >= 40 * 320)
    await session.close()
    assert session.connects == 2
    got = b"".join(bytes(s.audio) for s in fake.sessions)
    want = g711.decode(b"".join(payloads), ULAW_8K.encoding)
    # Appends in flight when the socket dropped may be lost, never duplicated or reordered.
    assert len(got) >= len(want) - 2 * 320 * 5
    assert want.endswith(bytes(fake.sessions[1].audio))
    assert fake.sessions[1].updates  # the session was configured again


async def test_initial_connect_retries_then_succeeds(fake: FakeOpenAI) -> None:
    fake.reject_connections = 2
    session = engine(fake).open(sample_rate=16000, on_event=lambda e: None)
    t = time.monotonic()
    await session.start()
    assert session.connects == 1 and len(fake.sessions) == 1
    assert time.monotonic() - t >= 0.05 + 0.1 - 0.01  # backoff 0.05, 0.1
    await session.close()


async def test_auth_failure_reports_error_without_leaking_key(fake: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    events: list[SttEvent] = []
    stt = engine(fake, apiKey="sk-bad-secret-777")
    session = stt.open(sample_rate=16000, on_event=events.append)
    await session.start()
    await wait_until(lambda: bool(events))
    await session.close()
    assert events[0].kind == "error" and "401" in events[0].text
    assert "sk-bad-secret-777" not in caplog.text and "sk-bad-secret-777" not in repr(stt)
    assert fake.sessions == []


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed")
@pytest.mark.parametrize("passthrough", [True, False], ids=["ulaw-passthrough", "pcm16"])
async def test_caller_audio_through_bridge_reaches_stt_intact(fake: FakeOpenAI, passthrough: bool) -> None:
    """Carrier u-law frames -> MediaPipeline -> listener -> STT session -> (fake) OpenAI."""
    events: list[SttEvent] = []
    session = engine(fake, passthroughG711=passthrough).open(sample_rate=16000, on_event=events.append, wire_format=ULAW_8K)

    class Voice:
        def on_pipeline_audio(self, pcm: bytes) -> None:
            session.feed(pcm)

        def on_wire_audio(self, payload: bytes, format: AudioFormat) -> None:
            if session.wants_wire:
                session.feed_wire(payload)

        def on_dtmf(self, digit: str) -> None: ...

        def on_speech_started(self) -> None: ...

    class Leg:
        format = ULAW_8K
        supports_marks = True

        async def send_media(self, payload: bytes) -> None: ...
        async def send_mark(self, name: str) -> None: ...
        async def send_clear(self) -> None: ...

    bridge = MediaPipeline(Leg(), Voice())  # type: ignore[arg-type]
    await session.start()
    caller = speech("Please cancel my subscription.", 8000)
    wire = g711.encode(caller.tobytes(), ULAW_8K.encoding)
    for k, i in enumerate(range(0, len(wire), 160)):
        bridge.receive(wire[i : i + 160], sequence=k)
    await bridge.close()
    await wait_until(lambda: any(e.kind == "final" for e in events))
    await session.close()
    got = np.frombuffer(bytes(fake.sessions[0].audio), dtype="<i2").astype(float)
    heard = np.frombuffer(g711.decode(wire, ULAW_8K.encoding), dtype="<i2")
    rate = 8000 if passthrough else 24000
    ref = heard.astype(float) if passthrough else soxr.resample(heard, 8000, 24000, quality="HQ").astype(float)
    c = corr_at_best_lag(got, ref)
    print(f"\nSTT input ({'u-law passthrough' if passthrough else 'pcm16 24k'}): corr {c:.4f}, {len(got) / rate:.2f} s of {len(ref) / rate:.2f} s")
    assert c >= 0.99 if not passthrough else c > 0.9999
    assert abs(len(got) - len(ref)) <= rate * 0.05


# ------------------------------------------------------------------ pocketsphinx


@pytest.mark.skipif(not pocketsphinx_available(), reason="pocketsphinx (extra 'offline') not installed")
@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed")
async def test_pocketsphinx_keywords_on_clean_speech_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import pocketsphinx

    decoding_threads: set[int] = set()

    class RecordingDecoder(pocketsphinx.Decoder):  # type: ignore[misc]
        def process_raw(self, *args: Any, **kwargs: Any) -> Any:
            decoding_threads.add(threading.get_ident())
            return super().process_raw(*args, **kwargs)

    monkeypatch.setattr(pocketsphinx, "Decoder", RecordingDecoder)
    stt = create_stt({"provider": "pocketsphinx", "providers": {"pocketsphinx": {"keywords": ["yes", "no", "operator", "talk to support"]}}})
    assert isinstance(stt, PocketsphinxStt)
    for text in ("operator", "talk to support", "yes"):
        events: list[SttEvent] = []
        session = stt.open(sample_rate=16000, on_event=events.append)
        await session.start()
        data = speech(text, 16000).tobytes()
        for i in range(0, len(data), 640):
            session.feed(data[i : i + 640])
        await session.close()
        await wait_until(lambda events=events: any(e.kind == "final" for e in events))
        # feed only queues: every decode ran on the worker thread, none on the event loop's
        assert decoding_threads and threading.get_ident() not in decoding_threads
        assert events[0].kind == "speech_started"
        assert [e.text for e in events if e.kind == "final"] == [text]


def test_pocketsphinx_needs_grammar_or_keywords() -> None:
    if not pocketsphinx_available():
        pytest.skip("pocketsphinx (extra 'offline') not installed")
    with pytest.raises(SttError, match="grammar or keywords"):
        create_stt({"provider": "pocketsphinx", "providers": {"pocketsphinx": {}}})


# ------------------------------------------------------------------ factory


def test_factory_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert create_stt({"provider": "none"}) is None
    assert create_stt({}) is None
    assert create_stt(None) is None
    with pytest.raises(SttError, match="apiKey"):
        create_stt({"provider": "openai"})
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    stt = create_stt({})
    assert isinstance(stt, OpenAiRealtimeStt) and stt.api_key == "sk-env"
    assert stt.url == "wss://api.openai.com/v1/realtime?intent=transcription"
    assert stt.silence_duration_ms == 800 and stt.model == "gpt-4o-transcribe"
    with pytest.raises(SttError, match="streaming.provider"):
        create_stt({"provider": "deepgram"})


@pytest.mark.parametrize("passthrough", [True, False], ids=["ulaw-passthrough", "pcm16"])
async def test_call_voice_skips_the_pipeline_copy_when_stt_takes_the_wire(fake: FakeOpenAI, passthrough: bool) -> None:
    """With an STT fed the carrier's u-law as is, no pipeline-rate copy of the caller is made (the
    inbound resampler was a quarter of a call's CPU for nothing); with PCM16 it still is."""
    from bridge.voice import CallVoice
    from media.tts.espeak import EspeakTts

    class Leg:
        format = ULAW_8K
        supports_marks = True

        async def send_media(self, payload: bytes) -> None: ...
        async def send_mark(self, name: str) -> None: ...
        async def send_clear(self) -> None: ...

    voice = CallVoice(call_id="c1", transport=Leg(), tts=EspeakTts(), stt_engine=engine(fake, passthroughG711=passthrough),  # type: ignore[arg-type]
                      emit=lambda event: None, pipeline_rate=16000, barge_in=False)
    copies: list[int] = []
    pipeline_audio = voice.on_pipeline_audio
    voice.on_pipeline_audio = lambda pcm: (copies.append(len(pcm)), pipeline_audio(pcm))  # type: ignore[method-assign]
    await voice.start()
    tone = g711.encode((np.sin(np.arange(8000) / 3) * 8000).astype("<i2").tobytes(), ULAW_8K.encoding)
    for k, i in enumerate(range(0, len(tone), 160)):
        voice.bridge.receive(tone[i : i + 160], sequence=k)
    await wait_until(lambda: len(fake.sessions) == 1 and fake.sessions[0].appends > 0)
    await voice.close()
    assert (sum(copies) == 0) is passthrough
    assert len(fake.sessions[0].audio) > 0


def test_websocket_url_from_any_base() -> None:
    from media.urls import websocket_url

    assert websocket_url("https://api.example/v1/", "listen", {"a": 1, "b": "x y"}) == "wss://api.example/v1/listen?a=1&b=x+y"
    assert websocket_url("http://127.0.0.1:9", "/ws/Svc.Method") == "ws://127.0.0.1:9/ws/Svc.Method"
    assert websocket_url("wss://h.example/v1", "realtime") == "wss://h.example/v1/realtime"
    assert websocket_url("https://h.example", "p", {}) == "wss://h.example/p"  # no query: no "?"
