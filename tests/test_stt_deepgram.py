"""Deepgram streaming STT against its local fake over real sockets: u-law passthrough, linear16,
interim/final results, turn end by speech_final and by UtteranceEnd, SpeechStarted, KeepAlive on the
fake clock, CloseStream -> Metadata; then end to end over Twilio with barge-in and pre-warm."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.calls import CallState
from media import g711
from media.clock import FakeClock
from media.formats import ULAW_8K, AudioEncoding, AudioFormat
from media.stt.base import SttEvent
from media.stt.deepgram import DeepgramStt, TurnBuilder
from media.stt.factory import create_stt
from media.ws_client import InlineClientConnection
from tests.fakes.audio import fake_speech
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.twilio_server import CallerScript, FakeTwilio
from tests.harness import run_bridge, wait_for


@pytest.fixture
async def dg() -> AsyncIterator[FakeDeepgram]:
    fake = await FakeDeepgram().start()
    try:
        yield fake
    finally:
        await fake.stop()


def engine(fake: FakeDeepgram, **kw: Any) -> DeepgramStt:
    stt = create_stt({"provider": "deepgram", "providers": {"deepgram": {"apiKey": fake.api_key, "baseUrl": fake.base_url}}})
    assert isinstance(stt, DeepgramStt)
    for key, value in kw.items():
        setattr(stt, key, value)
    return stt


def speech_then_silence(rate: int, encoding: AudioEncoding | None) -> list[bytes]:
    pcm = fake_speech("book a table for two", rate) + bytes(rate * 2 * 6 // 10)  # 0.6 s of silence after
    data = g711.encode(pcm, encoding) if encoding else pcm
    step = len(data) * 20 // (len(pcm) // 2 * 1000 // rate)
    return [data[i:i + step] for i in range(0, len(data), step)]


@pytest.mark.parametrize("utterance_end", [False, True], ids=["speech_final", "UtteranceEnd"])
async def test_ulaw_passthrough_interims_final_and_close(dg: FakeDeepgram, utterance_end: bool) -> None:
    dg.utterance_end = utterance_end
    events: list[SttEvent] = []
    session = engine(dg).open(sample_rate=16000, on_event=events.append, wire_format=ULAW_8K)
    assert session.wants_wire
    await session.start()
    frames = speech_then_silence(8000, AudioEncoding.PCMU)
    for frame in frames:
        session.feed_wire(frame)
        session.feed(b"\x00" * 640)  # pipeline audio is ignored when the wire passes through
    await wait_for(lambda: any(e.kind == "final" for e in events), timeout=10)
    [listen] = dg.sessions
    assert listen.query["encoding"] == "mulaw" and listen.query["sample_rate"] == "8000"
    assert listen.query["interim_results"] == "true" and listen.query["vad_events"] == "true"
    assert listen.query["endpointing"] == "300" and listen.query["utterance_end_ms"] == "1000"
    assert bytes(listen.raw) == b"".join(frames), "u-law reached Deepgram byte for byte"
    kinds = [e.kind for e in events]
    assert kinds[0] == "speech_started"
    partials = [e.text for e in events if e.kind == "partial"]
    assert len(partials) >= 2 and partials[0] == "book", "interim results grow word by word"
    assert [e.text for e in events if e.kind == "final"] == ["book a table for two"]
    assert kinds.index("speech_ended") == kinds.index("final") - 1 and session.reports_speech_end
    # dated back to the last word's end (the fake's words end 300 ms, its endpointing, before it
    # decided; all 0.6 s of trailing silence may have been sent by then), not to the message's arrival
    (ended,) = [e for e in events if e.kind == "speech_ended"]
    assert 0.28 <= ended.ago_s <= 0.62, ended
    await session.close()
    assert listen.controls[-1] == "CloseStream" and session._metadata.is_set()


async def test_audio_frames_are_written_at_once_in_order(dg: FakeDeepgram) -> None:
    """With a socket up and nothing queued, each frame is written from feed_wire itself (no sender
    task hop, media/ws_client.py); queued ones (before the socket) still go first, in order."""
    session = engine(dg).open(sample_rate=16000, on_event=lambda e: None, wire_format=ULAW_8K)
    frames = [bytes([0x20 + i]) * 160 for i in range(30)]
    for frame in frames[:5]:
        session.feed_wire(frame)  # no socket yet: queued
    await session.start()
    ws = session.socket
    assert isinstance(ws, InlineClientConnection)
    for frame in frames[5:]:
        session.feed_wire(frame)
    await wait_for(lambda: len(dg.sessions) == 1 and len(dg.sessions[0].raw) == 30 * 160, timeout=5)
    assert bytes(dg.sessions[0].raw) == b"".join(frames)
    assert ws.written_now >= 25 and session.sent_bytes == 30 * 160
    await session.close()


async def test_linear16_at_the_pipeline_rate_when_the_wire_is_not_g711(dg: FakeDeepgram) -> None:
    events: list[SttEvent] = []
    session = engine(dg).open(sample_rate=16000, on_event=events.append, wire_format=AudioFormat(AudioEncoding.L16, 16000))
    assert not session.wants_wire
    await session.start()
    frames = speech_then_silence(16000, None)
    for frame in frames:
        session.feed(frame)
    await wait_for(lambda: any(e.kind == "final" for e in events), timeout=10)
    [listen] = dg.sessions
    assert listen.query["encoding"] == "linear16" and listen.query["sample_rate"] == "16000"
    assert bytes(listen.raw) == b"".join(frames)
    await session.close()


async def test_keepalive_only_when_idle_on_the_fake_clock(dg: FakeDeepgram) -> None:
    clock = FakeClock()
    session = engine(dg, clock=clock).open(sample_rate=16000, on_event=lambda e: None, wire_format=ULAW_8K)
    await session.start()
    await clock.advance(4.0)
    assert session.keepalives_sent == 1
    await wait_for(lambda: dg.sessions[0].controls == ["KeepAlive"], timeout=5)
    await clock.advance(2.0)
    session.feed_wire(b"\xff" * 160)  # audio at t=6 s: the tick at t=8 s finds the stream busy
    await clock.advance(2.0)
    assert session.keepalives_sent == 1
    await clock.advance(4.0)  # t=12 s: idle for 6 s
    assert session.keepalives_sent == 2
    await wait_for(lambda: dg.sessions[0].controls == ["KeepAlive", "KeepAlive"], timeout=5)
    await session.close()


def test_turn_builder_concatenates_finals_and_ignores_empty_results() -> None:
    turns = TurnBuilder()

    def results(text: str, final: bool, speech_final: bool = False) -> dict[str, Any]:
        return {"type": "Results", "is_final": final, "speech_final": speech_final,
                "channel": {"alternatives": [{"transcript": text}]}}

    assert turns.handle(results("put me", False)) == [SttEvent("partial", "put me")]
    assert turns.handle(results("put me through", True)) == [SttEvent("partial", "put me through")]
    assert turns.handle(results("to", False)) == [SttEvent("partial", "put me through to")]
    assert turns.handle(results("", True, speech_final=False)) == []
    assert turns.handle(results("to sales", True, speech_final=True)) == [
        SttEvent("partial", "put me through to sales"), SttEvent("speech_ended"),
        SttEvent("final", "put me through to sales")]
    assert turns.handle({"type": "UtteranceEnd", "last_word_end": 4.6}) == [], "nothing pending: no empty final"


async def test_bad_key_is_one_error_event_without_the_key(dg: FakeDeepgram, caplog: pytest.LogCaptureFixture) -> None:
    events: list[SttEvent] = []
    stt = DeepgramStt(api_key="wrong-secret-key", base_url=dg.base_url)
    session = stt.open(sample_rate=16000, on_event=events.append, wire_format=ULAW_8K)
    await session.start()
    await wait_for(lambda: bool(events), timeout=5)
    assert events == [SttEvent("error", "authentication failed (HTTP 401)")]
    assert "wrong-secret-key" not in caplog.text and "wrong-secret-key" not in repr(stt)
    await session.close()


# ====================================================================== end to end over Twilio


async def test_twilio_call_with_deepgram_prewarmed_barge_in_and_turn(dg: FakeDeepgram, tmp_path: Path) -> None:
    long_greeting = ("Hello and welcome. Let me tell you about all of our specials today, starting with the soup, "
                     "then the salads, then the main courses, and finally the desserts.")
    async with FakeTwilio(say_chars_per_second=40) as twilio:
        twilio.default_script = CallerScript(utterances=["Book a table for two."], barge_in=True,
                                             barge_in_after_ms=800, ring_ms=600)
        cfg = {
            "provider": "twilio", "fromNumber": "+15550001234", "toNumber": "+15550005678",
            "twilio": {"accountSid": twilio.account_sid, "authToken": twilio.auth_token, "apiBaseUrl": twilio.api_base_url},
            "streaming": {"enabled": True, "provider": "deepgram",
                          "providers": {"deepgram": {"apiKey": dg.api_key, "baseUrl": dg.base_url}}},
            "tts": {"provider": "espeak"}, "responseModel": "offline",
        }
        async with run_bridge(cfg, tmp_path) as runtime:
            call = await runtime.manager.initiate(None, long_greeting, "conversation")
            await wait_for(lambda: bool(dg.sessions), timeout=5)
            assert call.answeredAt is None, "the Deepgram stream opened while the call was ringing"
            await wait_for(lambda: any(t.speaker == "user" for t in call.transcript), timeout=30)
            [fake_call] = twilio.calls.values()
            assert fake_call.stream is not None and fake_call.stream.clears >= 1, "SpeechStarted cut the greeting"
            assert call.metadata.get("lastInterruptedText") == long_greeting
            assert len(dg.sessions) == 1 and dg.sessions[0].speech_started >= 1
            assert dg.sessions[0].query["encoding"] == "mulaw"
            assert [t.text for t in call.transcript if t.speaker == "user"] == ["book a table for two"]
            await wait_for(lambda: call.transcript[-1].speaker == "bot", timeout=20)  # the reply is under way
            # the turn's `stt` part: from the last word's end (Deepgram's word timings) to the final,
            # i.e. its 300 ms endpointing, where the turn-end message's arrival would read ~0
            await wait_for(lambda: len(call.turns) == 1, timeout=20)
            assert 250 <= call.turns[0].parts()["stt"] <= 1500, call.turns[0]
            await runtime.manager.end(call.callId)
            assert call.state == CallState.HANGUP_BOT
