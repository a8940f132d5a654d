"""Speech-to-speech with Gemini Live over real sockets (mock carrier): 16 kHz up, 24 kHz down,
`interrupted` barge-in, a tool call round trip, and a goAway hand-over to a resumed session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.calls import CallState
from tests.fakes.audio import fake_speech
from tests.fakes.gemini_live_server import FakeGeminiLive, GeminiReply
from tests.harness import rpc_client, run_bridge, wait_for
from tests.test_realtime_openai import FAST_MOCK, LONG

GREETING = "Hello, this is the booking line of the hardware store, how can I help?"  # 1.5 s


def config(fake: FakeGeminiLive, *, script: list[str] | None = None) -> dict[str, Any]:
    return {
        "provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678",
        "maxConcurrentCalls": 3, "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
        "mock": {**FAST_MOCK, "calleeScript": script or []},
        "realtime": {"enabled": True, "provider": "gemini", "apiKey": fake.api_key, "baseUrl": fake.base_url,
                     "voice": "Puck", "instructions": "Be brief.",
                     "tools": [{"name": "lookup_order", "description": "Find an order",
                                "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}]},
    }


@pytest.fixture
async def gemini() -> AsyncIterator[FakeGeminiLive]:
    fake = await FakeGeminiLive(transcripts=["gemini heard goodbye"],
                                replies=[GeminiReply(tool=("end_call", {})), GeminiReply("Goodbye then!")]).start()
    try:
        yield fake
    finally:
        await fake.stop()


async def test_gemini_barge_in_then_tool_call_ends_the_call(gemini: FakeGeminiLive, tmp_path: Path) -> None:
    async with run_bridge(config(gemini), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": LONG, "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: runtime.carrier.callee(call_id) is not None, timeout=10)
        callee = runtime.carrier.callee(call_id)
        await wait_for(lambda: len(callee.heard) / 16 >= 800, timeout=20)
        # in line silence (the mock's leg sends nothing between utterances): the bridge's VAD hears it end
        callee.play_later(bytes(8000) + fake_speech("goodbye goodbye goodbye", 8000) + bytes(8000), 8000)
        await wait_for(lambda: callee.clears >= 1, timeout=10)
        heard_at_clear = len(callee.heard) / 16
        await wait_for(lambda: call.terminal, timeout=30)
        session = gemini.sessions[0]
        setup = session.setup
        assert setup["model"].startswith("models/") and setup["generationConfig"]["responseModalities"] == ["AUDIO"]
        assert setup["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"] == "Puck"
        names = [d["name"] for d in setup["tools"][0]["functionDeclarations"]]
        assert names == ["lookup_order", "end_call", "send_dtmf", "consult_agent", "transfer_call"]
        assert session.mime_types == {"audio/pcm;rate=16000"}
        greeting = session.turns[0]
        assert greeting["text"] == LONG and greeting["status"] == "interrupted", "the caller cut the greeting"
        assert heard_at_clear < len(LONG) * 20 - 500, "the greeting was cut, not played out"
        bot = call.transcript[0]
        assert bot.speaker == "bot" and LONG.startswith(bot.text) and 0 < len(bot.text) < len(LONG)
        assert ("user", "gemini heard goodbye") in [(t.speaker, t.text) for t in call.transcript]
        assert session.tool_responses and session.tool_responses[0]["name"] == "end_call"
        assert "end" in session.tool_responses[0]["response"]["result"]
        assert [e.name for e in call.toolCalls] == ["end_call"]
        assert ("bot", "Goodbye then!") in [(t.speaker, t.text) for t in call.transcript]
        assert call.state == CallState.HANGUP_BOT
        # Gemini reports no end of speech: the bridge's VAD dates it, so the turn has its `stt` part
        (turn,) = call.turns
        assert turn.mode == "realtime" and turn.sttMs is not None and turn.sttMs >= 0 and turn.totalMs, turn


async def test_gemini_go_away_hands_over_to_a_resumed_session_without_silence(tmp_path: Path) -> None:
    fake = await FakeGeminiLive(transcripts=["table for two"], replies=[GeminiReply("Booked, see you soon.")],
                                go_away_after_s=0.5, time_left_s=2.0).start()
    try:
        async with run_bridge(config(fake, script=["A table for two please."]), tmp_path) as runtime:
            client = rpc_client(runtime)
            call_id = (await client.call("voicecall.initiate", {"message": GREETING, "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: any(t.text == "Booked, see you soon." for t in call.transcript), timeout=40)
            first, second = fake.sessions[:2]
            assert len(fake.sessions) == 2
            assert first.go_away_at is not None and second.resumed_from in fake.handles
            assert first.go_away_at < second.opened_at < first.closed_at, "the new session was up before the old closed"
            assert call.transcript[0].text == GREETING, "the greeting played out whole across the hand-over"
            callee = runtime.carrier.callee(call_id)
            assert callee.clears == 0
            assert second.turns and second.turns[0]["text"] == "Booked, see you soon."
            assert len(second.audio) > 16000 * 2, "the caller's audio went to the resumed session"
            await client.call("voicecall.end", {"callId": call_id})
    finally:
        await fake.stop()


async def test_gemini_broken_socket_resumes_with_the_last_handle(tmp_path: Path) -> None:
    fake = await FakeGeminiLive(transcripts=["still there"], replies=[GeminiReply("Yes, still here.")],
                                drop_first_after_s=0.8).start()
    try:
        cfg = config(fake, script=["Hello, are you still there?"])
        cfg["mock"]["replyDelayMs"] = 1000
        async with run_bridge(cfg, tmp_path) as runtime:
            client = rpc_client(runtime)
            call_id = (await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: any(t.text == "Yes, still here." for t in call.transcript), timeout=30)
            first, second = fake.sessions[:2]
            assert first.go_away_at is None and first.closed_at is not None
            assert second.resumed_from in fake.handles, "the new socket resumed the conversation"
            assert second.turns[0]["text"] == "Yes, still here."
            assert "realtimeFailure" not in call.metadata
            await client.call("voicecall.end", {"callId": call_id})
    finally:
        await fake.stop()
