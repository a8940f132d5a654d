"""Speech-to-speech (OpenAI Realtime, GA events) end to end over real sockets: the bridge (run_bridge)
on every carrier (mock, Twilio, Telnyx, Plivo, Asterisk; SIP in test_realtime_sip.py) against the
local Realtime fake.

Barge-in checks compare the truncate's `audio_end_ms` with what the carrier fake's ear played
before the clear: equal within one 20 ms frame, where the ears count a frame as heard as soon as it
starts playing (so their figure may run up to one more frame ahead): -20 <= heard - audio_end <= 40.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.calls import CallState
from tests.fakes.audio import fake_speech
from tests.fakes.openai_realtime_server import FakeOpenAIRealtime, Reply
from tests.fakes.twilio_server import CallerScript, FakeTwilio
from tests.harness import rpc_client, run_bridge, wait_for

FAST_MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0}
LONG = ("Thank you for calling the hardware store. Today we have discounts on hammers, nails, "
        "screws, drills, saws, ladders, paint and brushes, and much more besides that.")


def realtime_cfg(fake: FakeOpenAIRealtime, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "provider": "openai", "apiKey": fake.api_key, "baseUrl": fake.base_url,
            "model": "gpt-realtime", "instructions": "Be brief.", "apology": "Sorry, goodbye.", **extra}


def mock_config(fake: FakeOpenAIRealtime, *, script: list[str] | None = None, mock: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
    return {
        "provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678",
        "outbound": {"notifyHangupDelaySec": 1}, "maxConcurrentCalls": 3,
        "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
        "mock": {**FAST_MOCK, "calleeScript": script or [], **(mock or {})},
        "realtime": realtime_cfg(fake, **extra),
    }


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(bytes(pcm), dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


@pytest.fixture
async def rt() -> AsyncIterator[FakeOpenAIRealtime]:
    fake = await FakeOpenAIRealtime(transcripts=["realtime heard a table for two"],
                                    replies=[Reply("Certainly, a table for two.")]).start()
    try:
        yield fake
    finally:
        await fake.stop()


async def test_mock_call_prewarmed_greeting_and_a_turn(rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    """The session connects while the call rings; the greeting is the model speaking the agent's
    text in u-law passthrough; the callee's reply is answered by the model; both sides' transcripts land."""
    cfg = mock_config(rt, script=["I would like a table for two please."], mock={"answerDelayMs": 1000})
    async with run_bridge(cfg, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hello from the hardware store.",
                                                            "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        factory = runtime.manager._voice_factory
        await wait_for(lambda: factory.warm(call_id) is not None and factory.warm(call_id).ready.is_set(), timeout=5)
        assert call.answeredAt is None, "the model session was ready while the call was still ringing"
        assert rt.sessions[0].updates and rt.sessions[0].format == "audio/pcmu"
        await wait_for(lambda: any(t.speaker == "bot" and t.text == "Certainly, a table for two." for t in call.transcript),
                       timeout=30)
        session = rt.sessions[0]
        assert len(rt.sessions) == 1, "the pre-warmed session carried the call"
        update = session.updates[0]
        assert update["audio"]["output"]["format"] == {"type": "audio/pcmu"}
        assert update["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        assert [t["name"] for t in update["tools"]] == ["end_call", "send_dtmf", "consult_agent", "transfer_call"], "the in-call tools"
        assert session.responses[0]["tag"] and session.responses[0]["text"] == "Hello from the hardware store."
        callee = runtime.carrier.callee(call_id)
        assert rms(callee.heard) > 500 and len(callee.heard) / 16 > 1000, "the callee heard the model's audio"
        assert len(session.audio) / 16 > 1000, "the callee's audio reached the model"
        lines = [(t.speaker, t.text) for t in call.transcript]
        assert lines[0] == ("bot", "Hello from the hardware store.")
        assert ("user", "realtime heard a table for two") in lines
        # the model answers by itself: no cascade reply (chat model + TTS) to the caller's words
        assert [text for who, text in lines if who == "bot"] == ["Hello from the hardware store.",
                                                                 "Certainly, a table for two."]
        # the caller's turn is timed like a cascade turn: the model's VAD gives the end of speech
        # (its audio_end_ms, dated back) and the turn's end (the `stt` part: its 500 ms of silence)
        await wait_for(lambda: len(call.turns) == 1, timeout=10)
        (turn,) = call.turns
        parts = turn.parts()
        assert turn.mode == "realtime" and {"stt", "model", "bridge", "total"} <= set(parts), turn
        assert 450 <= parts["stt"] <= 1500, parts
        assert abs(parts["stt"] + parts["model"] + parts["bridge"] - parts["total"]) < 1, parts
        await client.call("voicecall.end", {"callId": call_id})
        assert call.state == CallState.HANGUP_BOT


async def test_mock_barge_in_truncates_to_what_was_heard(rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    async with run_bridge(mock_config(rt), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": LONG, "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: runtime.carrier.callee(call_id) is not None, timeout=10)
        callee = runtime.carrier.callee(call_id)
        await wait_for(lambda: len(callee.heard) / 16 >= 800, timeout=20)
        callee.play_later(fake_speech("stop stop stop stop stop stop", 8000), 8000)
        await wait_for(lambda: bool(rt.sessions[0].truncates), timeout=10)
        heard_ms = len(callee.heard) / 16
        truncate = rt.sessions[0].truncates[0]
        assert callee.clears >= 1
        # the fake ear counts a frame as heard once it starts playing: 20 ms steps, rounded up
        assert -20 <= heard_ms - truncate["audio_end_ms"] <= 40, (truncate, heard_ms)
        assert truncate["item_id"].startswith("item_") and truncate["content_index"] == 0
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=10)
        bot = call.transcript[0]
        assert bot.speaker == "bot" and LONG.startswith(bot.text) and 0 < len(bot.text) < len(LONG)
        await client.call("voicecall.end", {"callId": call_id})


async def test_key_presses_reach_the_model_as_user_turns(rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    async with run_bridge(mock_config(rt), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Press one for sales.", "conversation")
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        runtime.carrier.callee(call.callId).press("1")
        await wait_for(lambda: any(t.text == "Certainly, a table for two." for t in call.transcript), timeout=15)
        session = rt.sessions[0]
        assert session.user_texts == ["[The caller pressed the 1 key]"]
        assert call.metadata["dtmf"] == "1"
        await runtime.manager.end(call.callId)


async def test_barge_in_off_lets_the_model_finish(rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    cfg = mock_config(rt)
    cfg["streaming"]["bargeIn"] = False
    async with run_bridge(cfg, tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Please hold while I read the whole notice to you.", "conversation")
        await wait_for(lambda: runtime.carrier.callee(call.callId) is not None, timeout=10)
        callee = runtime.carrier.callee(call.callId)
        await wait_for(lambda: len(callee.heard) / 16 >= 300, timeout=20)
        callee.play_later(fake_speech("stop stop stop", 8000), 8000)
        await wait_for(lambda: call.state == CallState.LISTENING and bool(rt.sessions[0].speech_started_at), timeout=20)
        session = rt.sessions[0]
        assert session.updates[0]["audio"]["input"]["turn_detection"]["interrupt_response"] is False
        assert callee.clears == 0 and session.truncates == [] and session.responses[0]["status"] == "completed"
        assert call.transcript[0].text == "Please hold while I read the whole notice to you."
        await runtime.manager.end(call.callId)


async def test_tool_call_round_trip_ends_the_call(tmp_path: Path) -> None:
    fake = await FakeOpenAIRealtime(transcripts=["that is all, bye"],
                                    replies=[Reply(tool=("end_call", {})), Reply("Goodbye!")]).start()
    try:
        async with run_bridge(mock_config(fake, script=["That is all, bye."]), tmp_path) as runtime:
            client = rpc_client(runtime)
            call_id = (await client.call("voicecall.initiate", {"message": "Anything else?",
                                                                "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: call.terminal, timeout=30)
            session = fake.sessions[0]
            call_ids = [r for r in session.responses if r["tool"]]
            assert call_ids and session.tool_outputs, "the function call's output went back to the model"
            output = session.tool_outputs[0]
            assert output["call_id"].startswith("call_") and "end" in output["output"]
            assert session.responses[-1]["text"] == "Goodbye!" and session.responses[-1]["status"] == "completed"
            assert call.state == CallState.HANGUP_BOT
            [entry] = call.toolCalls  # recorded like the cascade's tool calls
            assert entry.name == "end_call" and entry.endCall
            assert ("bot", "Goodbye!") in [(t.speaker, t.text) for t in call.transcript]
    finally:
        await fake.stop()


async def test_a_local_toolbox_runs_the_models_function_call(tmp_path: Path) -> None:
    """The toolbox contract: OpenAI function-style specs and run(call id, name, arguments JSON)."""
    from bridge.realtime.factory import ToolResult

    class Orders:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, dict[str, Any]]] = []

        def specs(self) -> list[dict[str, Any]]:
            return [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order",
                     "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}]

        async def run(self, call_id: str, name: str, arguments: str) -> ToolResult:
            self.calls.append((call_id, name, json.loads(arguments)))
            return ToolResult(json.dumps({"status": "shipped"}))

    fake = await FakeOpenAIRealtime(transcripts=["where is order 42"],
                                    replies=[Reply(tool=("lookup_order", {"id": "42"})), Reply("It has shipped.")]).start()
    orders = Orders()
    try:
        async with run_bridge(mock_config(fake, script=["Where is my order forty two?"]), tmp_path) as runtime:
            runtime.manager._voice_factory.toolbox_for = lambda call: orders
            call_id = (await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: any(t.text == "It has shipped." for t in call.transcript), timeout=30)
            session = fake.sessions[0]
            assert [t["name"] for t in session.updates[0]["tools"]] == ["lookup_order"]
            assert orders.calls == [(call_id, "lookup_order", {"id": "42"})]
            assert json.loads(session.tool_outputs[0]["output"]) == {"status": "shipped"}
            await runtime.manager.end(call_id)
    finally:
        await fake.stop()


async def test_session_failing_mid_call_apologizes_and_hangs_up(tmp_path: Path) -> None:
    fake = await FakeOpenAIRealtime(fail_after_s=1.0).start()
    try:
        async with run_bridge(mock_config(fake, maxReconnects=1), tmp_path) as runtime:
            client = rpc_client(runtime)
            call_id = (await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: runtime.carrier.callee(call_id) is not None, timeout=10)
            callee = runtime.carrier.callee(call_id)
            await wait_for(lambda: fake.sessions and fake.sessions[0].closed_at is not None, timeout=10)
            heard_at_failure = len(callee.heard)
            await wait_for(lambda: call.terminal, timeout=30)
            assert call.state == CallState.HANGUP_BOT
            assert "could not reconnect" in call.metadata["realtimeFailure"]
            assert fake.refused >= 1, "it tried to reconnect first"
            assert len(callee.heard) - heard_at_failure > 16 * 500, "the apology was played"
            log = (tmp_path / "calls.jsonl").read_text() if (tmp_path / "calls.jsonl").exists() else \
                "".join(p.read_text() for p in tmp_path.glob("**/*.jsonl"))
            assert "realtimeFailure" in log and fake.api_key not in log
    finally:
        await fake.stop()


async def test_speak_and_continue_from_the_agent_in_speech_to_speech_mode(rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    async with run_bridge(mock_config(rt), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        await client.call("voicecall.speak", {"callId": call_id, "message": "Your order has shipped."})
        session = rt.sessions[0]
        assert [r["text"] for r in session.responses] == ["Hi.", "Your order has shipped."]
        assert all(r["tag"] for r in session.responses), "the agent's words are spoken by the model, on request"
        callee = runtime.carrier.callee(call_id)
        turn = asyncio.ensure_future(client.call("voicecall.continue", {"callId": call_id, "message": "Anything else?"}))
        await wait_for(lambda: len(session.responses) == 3 and session.responses[2]["status"] == "completed", timeout=10)
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=10)
        callee.play_later(fake_speech("a table for two please", 8000), 8000)
        result = await asyncio.wait_for(turn, 20)
        assert result["transcript"] == "realtime heard a table for two"
        lines = [(t.speaker, t.text) for t in call.transcript]
        assert lines[:4] == [("bot", "Hi."), ("bot", "Your order has shipped."), ("bot", "Anything else?"),
                             ("user", "realtime heard a table for two")]
        await client.call("voicecall.end", {"callId": call_id})


async def test_dropped_session_reconnects_and_the_call_goes_on(tmp_path: Path) -> None:
    fake = await FakeOpenAIRealtime(transcripts=["after the drop"], replies=[Reply("Still here.")],
                                    drop_first_after_s=1.0).start()
    try:
        async with run_bridge(mock_config(fake, script=["Hello, are you there?"], mock={"replyDelayMs": 1200}),
                              tmp_path) as runtime:
            client = rpc_client(runtime)
            call_id = (await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: any(t.text == "Still here." for t in call.transcript), timeout=30)
            assert len(fake.sessions) == 2 and fake.sessions[0].closed_at is not None
            assert fake.sessions[1].responses[0]["text"] == "Still here.", "the reply came over the new socket"
            assert "realtimeFailure" not in call.metadata
            await client.call("voicecall.end", {"callId": call_id})
    finally:
        await fake.stop()


async def test_refused_key_while_ringing_apologizes_and_hangs_up(rt: FakeOpenAIRealtime, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    cfg = mock_config(rt, apiKey="sk-wrong-secret")
    async with run_bridge(cfg, tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Hello there.", "conversation")
        await wait_for(lambda: call.terminal, timeout=30)
        assert call.state == CallState.HANGUP_BOT
        assert call.metadata["realtimeFailure"] == "authentication failed (HTTP 401)"
        callee = runtime.carrier.callee(call.callId)
        assert len(callee.heard) / 16 > 1000, "the greeting and the apology came through TTS"
        assert rt.sessions == [], "no session was opened with the refused key"
    assert "sk-wrong-secret" not in caplog.text
    assert "sk-wrong-secret" not in "".join(p.read_text() for p in tmp_path.glob("**/*.jsonl"))


# ====================================================================== Twilio media streams


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(say_chars_per_second=40) as server:
        yield server


def twilio_config(fake: FakeTwilio, rt: FakeOpenAIRealtime) -> dict[str, Any]:
    return {
        "provider": "twilio", "fromNumber": "+15550001234", "toNumber": "+15550005678",
        "maxConcurrentCalls": 3,
        "twilio": {"accountSid": fake.account_sid, "authToken": fake.auth_token, "apiBaseUrl": fake.api_base_url},
        # 20 ms messages: the fake's ear counts whole messages once they start, so 40 ms ones would
        # round what was heard up by as much
        "streaming": {"provider": "none", "outboundFrameMs": 20}, "tts": {"provider": "espeak"},
        "realtime": realtime_cfg(rt),
    }


async def test_twilio_turn_and_barge_in_truncation(twilio: FakeTwilio, rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    """Over Twilio media streams: the greeting plays, the caller talks over it after 800 ms, Twilio's
    buffer is cleared and the model is told what was heard (within one frame); the caller's turn is
    then answered."""
    twilio.default_script = CallerScript(utterances=["I need a table for two."], barge_in=True, barge_in_after_ms=800)
    async with run_bridge(twilio_config(twilio, rt), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, LONG, "conversation")
        await wait_for(lambda: bool(rt.sessions) and bool(rt.sessions[0].truncates), timeout=30)
        [fake_call] = twilio.calls.values()
        stream = fake_call.stream
        assert stream is not None and stream.clears >= 1
        truncate = rt.sessions[0].truncates[0]
        heard_ms = len(stream.heard_ulaw()) / 8
        assert -20 <= heard_ms - truncate["audio_end_ms"] <= 40, (truncate, heard_ms)
        assert rt.sessions[0].format == "audio/pcmu"
        await wait_for(lambda: any(t.text == "Certainly, a table for two." for t in call.transcript), timeout=30)
        assert ("user", "realtime heard a table for two") in [(t.speaker, t.text) for t in call.transcript]
        await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})


# ====================================================================== Telnyx (A-law passthrough)


async def test_telnyx_pcma_passthrough_barge_in_truncation(rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    """An EU-style A-law stream: the session runs audio/pcma both ways (no transcoding), Telnyx's own
    transcription is not asked for, and a barge-in truncates to what the caller heard."""
    from tests.fakes.telnyx_server import FakeTelnyx

    async with FakeTelnyx() as telnyx:
        cfg = {
            "provider": "telnyx", "fromNumber": "+15550001234", "toNumber": "+15550005678",
            "streaming": {"provider": "none", "disconnectGraceMs": 500, "outboundFrameMs": 20},
            "tts": {"provider": "espeak"},
            "telnyx": {**telnyx.config(), "streamCodec": "PCMA"}, "realtime": realtime_cfg(rt),
        }
        async with run_bridge(cfg, tmp_path) as runtime:
            telnyx.connection_webhook_url = f"http://127.0.0.1:{runtime.port}/voice/webhook"
            try:
                call = await runtime.manager.initiate(None, LONG, "conversation")
                await wait_for(lambda: len(telnyx.calls) == 1 and next(iter(telnyx.calls.values())).stream is not None,
                               timeout=10)
                tx = next(iter(telnyx.calls.values()))
                assert "transcription" not in tx.dial and tx.dial["stream_bidirectional_codec"] == "PCMA"
                stream = tx.stream
                await wait_for(lambda: len(stream.heard_now()) / 16 >= 800, timeout=20)
                await tx.say("stop stop stop stop", pcm=fake_speech("stop stop stop stop", 8000))
                await wait_for(lambda: bool(rt.sessions[0].truncates), timeout=10)
                heard_ms = len(stream.heard_now()) / 16
                truncate = rt.sessions[0].truncates[0]
                assert rt.sessions[0].format == "audio/pcma" and stream.clears >= 1
                assert -20 <= heard_ms - truncate["audio_end_ms"] <= 40, (truncate, heard_ms)
                await wait_for(lambda: any(t.text == "Certainly, a table for two." for t in call.transcript), timeout=20)
                await runtime.manager.end(call.callId)
            finally:
                await telnyx.close_streams()


# ====================================================================== Asterisk (ARI + ExternalMedia RTP)


async def test_asterisk_inbound_speech_to_speech_with_barge_in(rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    from tests.fakes.ari_server import FakeAsterisk

    async with FakeAsterisk() as ari:
        cfg = {
            "provider": "asterisk", "inboundPolicy": "allowlist", "allowFrom": ["+15550009999"],
            "inboundGreeting": LONG, "streaming": {"provider": "none"}, "tts": {"provider": "espeak"},
            "asterisk": ari.config(rtpPortStart=43600, rtpPortRange=100), "realtime": realtime_cfg(rt),
        }
        async with run_bridge(cfg, tmp_path) as runtime:
            # quiet while 1.2 s of the greeting plays, then the caller talks over it
            phone = ari.inbound_call(caller="+15550009999", exten="100",
                                     audio=bytes(int(1.2 * 16000)) + fake_speech("stop stop stop stop", 8000))
            await wait_for(lambda: bool(rt.sessions) and bool(rt.sessions[0].truncates), timeout=15)
            heard_ms = len(phone.heard) / 16
            truncate = rt.sessions[0].truncates[0]
            assert rt.sessions[0].format == "audio/pcmu", "ExternalMedia ulaw passes straight through"
            assert 800 < heard_ms < len(LONG) * 20 - 500
            assert -20 <= heard_ms - truncate["audio_end_ms"] <= 40, (truncate, heard_ms)
            call = next(iter(runtime.manager.calls.values()))
            await wait_for(lambda: any(t.text == "Certainly, a table for two." for t in call.transcript), timeout=20)
            await runtime.manager.end(call.callId)


# ====================================================================== Plivo


async def test_plivo_speech_to_speech_with_barge_in(rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    from media import g711
    from media.formats import AudioEncoding
    from tests.fakes.plivo_server import FakePlivo

    plivo = await FakePlivo().start()
    try:
        cfg = {
            "provider": "plivo", "fromNumber": "+15550001234",
            "plivo": {"authId": plivo.auth_id, "authToken": plivo.auth_token, "apiBaseUrl": plivo.base_url},
            "streaming": {"provider": "none", "disconnectGraceMs": 200}, "tts": {"provider": "espeak"},
            "realtime": realtime_cfg(rt),
        }
        async with run_bridge(cfg, tmp_path) as runtime:
            call = await runtime.manager.initiate("+15550005678", LONG, "conversation")
            await wait_for(lambda: bool(plivo.calls) and plivo.call().stream is not None, timeout=10)
            stream = plivo.call().stream
            await wait_for(lambda: len(stream.heard) / 8 >= 800, timeout=20)
            stream.say_ulaw(g711.encode(fake_speech("stop stop stop stop", 8000), AudioEncoding.PCMU))
            await wait_for(lambda: bool(rt.sessions[0].truncates), timeout=10)
            heard_ms = len(stream.heard) / 8
            truncate = rt.sessions[0].truncates[0]
            assert rt.sessions[0].format == "audio/pcmu" and stream.clears >= 1
            assert -20 <= heard_ms - truncate["audio_end_ms"] <= 40, (truncate, heard_ms)
            await wait_for(lambda: any(t.text == "Certainly, a table for two." for t in call.transcript), timeout=20)
            await runtime.manager.end(call.callId)
    finally:
        await plivo.stop()
