"""Telnyx end to end over real sockets: the bridge (run_bridge) against the fake Telnyx (REST,
signed webhooks, media-stream WebSocket with a caller on it)."""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.calls import CallState
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.telnyx_server import FakeCall, FakeMediaStream, FakeTelnyx, frame_rms
from tests.harness import rpc_client, run_bridge, wait_for

CALLER = "+15550009999"
OUR_NUMBER = "+15550001234"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelnyx]:
    async with FakeTelnyx() as server:
        yield server


def config(fake: FakeTelnyx, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "provider": "telnyx",
        "fromNumber": OUR_NUMBER,
        "toNumber": "+15550005678",
        "inboundPolicy": "allowlist",
        "allowFrom": [CALLER],
        "outbound": {"notifyHangupDelaySec": 1},
        "maxConcurrentCalls": 3,
        # no local STT engine: transcripts come from Telnyx transcription
        "streaming": {"enabled": True, "provider": "none", "disconnectGraceMs": 500},
        "tts": {"provider": "espeak"},
        "responseModel": "offline",
        "telnyx": fake.config(),
    }
    base.update(overrides)
    return base


def rms(pcm: bytes) -> float:
    x = np.frombuffer(bytes(pcm), dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


@asynccontextmanager
async def bridge(fake: FakeTelnyx, cfg: dict[str, Any], store: Path) -> AsyncIterator[Any]:
    """run_bridge with the fake's inbound webhooks pointed at it; media sockets dropped before it stops."""
    async with run_bridge(cfg, store) as runtime:
        fake.connection_webhook_url = f"http://127.0.0.1:{runtime.port}/voice/webhook"
        try:
            yield runtime
        finally:
            await fake.close_streams()


def stream_of(call: FakeCall) -> FakeMediaStream:
    assert call.stream is not None, "Telnyx opened no media stream"
    return call.stream


def only_call(fake: FakeTelnyx) -> FakeCall:
    assert len(fake.calls) == 1
    return next(iter(fake.calls.values()))


async def test_outbound_notify_call_dials_with_stream_speaks_and_hangs_up(tmp_path: Path, fake: FakeTelnyx) -> None:
    async with bridge(fake, config(fake), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Your table is ready.", "mode": "notify"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.terminal, timeout=20)
        assert call.state == CallState.HANGUP_BOT
        tx = only_call(fake)
        dial = tx.dial
        assert dial["connection_id"] == fake.connection_id and dial["to"] == "+15550005678" and dial["from"] == OUR_NUMBER
        assert f"callId={call_id}" in dial["webhook_url"]
        assert base64.b64decode(dial["client_state"]).decode() == call_id
        assert dial["timeout_secs"] == 30 and dial["command_id"]
        assert dial["stream_url"] == f"ws://127.0.0.1:{runtime.port}/voice/stream"
        assert (dial["stream_track"], dial["stream_bidirectional_mode"]) == ("inbound_track", "rtp")
        assert dial["stream_codec"] == dial["stream_bidirectional_codec"] == "PCMU"
        assert dial["stream_auth_token"] == call.metadata["streamToken"]
        assert dial["transcription"] is True  # the carrier transcribes: no local STT engine
        assert call.providerCallId == tx.ccid
        heard = stream_of(tx).heard_now()
        assert len(heard) / 16000 > 0.8 and rms(heard) > 500, "the callee heard the message"
        assert tx.command_names() == ["hangup"] and tx.commands[0][1]["command_id"]
        assert tx.hangup_cause == "normal_clearing"
        assert all(status == 200 for _, status in tx.webhooks)


async def test_outbound_conversation_turn_through_telnyx_transcription(tmp_path: Path, fake: FakeTelnyx) -> None:
    async with bridge(fake, config(fake), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hi!", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        tx = only_call(fake)
        greeting_ms = stream_of(tx).ms_received
        turn = asyncio.ensure_future(client.call("voicecall.continue",
                                                 {"callId": call_id, "message": "What is your favourite colour?"}))
        await wait_for(lambda: call.state == CallState.LISTENING and stream_of(tx).ms_received > greeting_ms + 400,
                       timeout=15)
        await tx.say("Blue, definitely.")
        reply = await asyncio.wait_for(turn, 15)
        assert reply == {"success": True, "transcript": "Blue, definitely."}
        assert call.metadata["turnCount"] == 1
        # the reply went out through the media stream, not Telnyx `speak`
        assert "speak" not in tx.command_names()
        assert (await client.call("voicecall.end", {"callId": call_id})) == {"success": True}
        assert call.state == CallState.HANGUP_BOT
        await wait_for(lambda: not tx.alive)


async def test_conversation_turn_through_local_stt_on_pcma(tmp_path: Path, fake: FakeTelnyx) -> None:
    """telnyx.streamCodec PCMA: A-law both ways, and the caller's A-law goes to OpenAI Realtime as is."""
    openai = await FakeOpenAI(transcripts=["a table for two"]).start()
    cfg = config(fake, streaming={"enabled": True, "provider": "openai", "providers": {
        "openai": {"apiKey": openai.api_key, "baseUrl": openai.base_url, "silenceDurationMs": 200}}})
    cfg["telnyx"] = {**cfg["telnyx"], "streamCodec": "PCMA"}
    try:
        async with bridge(fake, cfg, tmp_path) as runtime:
            client = rpc_client(runtime)
            call_id = (await client.call("voicecall.initiate", {"message": "Hi!", "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
            tx = only_call(fake)
            assert tx.dial["stream_bidirectional_codec"] == "PCMA" and "transcription" not in tx.dial
            assert stream_of(tx).codec == "PCMA"
            turn = asyncio.ensure_future(client.call("voicecall.continue", {"callId": call_id, "message": "How many?"}))
            await wait_for(lambda: call.state == CallState.LISTENING and call.metadata.get("turnCount") is not None
                           and stream_of(tx).ms_received > 1200, timeout=15)
            await asyncio.sleep(0.3)
            await tx.say("A table for two, please.")
            assert await asyncio.wait_for(turn, 15) == {"success": True, "transcript": "a table for two"}
            session = openai.sessions[0]
            assert session.input_format == "g711_alaw" and len(session.audio) > 8000
            assert rms(stream_of(tx).heard_now()) > 500 and frame_rms(stream_of(tx).heard_now()).min() < 30
            await client.call("voicecall.end", {"callId": call_id})
    finally:
        await openai.stop()


async def test_inbound_allowlisted_call_answered_greeted_on_pcma(tmp_path: Path, fake: FakeTelnyx) -> None:
    """EU leg: the caller offers PCMA first; the stream runs A-law both ways and the greeting is
    clean (no static: quiet frames decode to near silence in A-law)."""
    async with bridge(fake, config(fake), tmp_path) as runtime:
        tx = fake.inbound_call(CALLER, OUR_NUMBER, offered_codecs="PCMA,PCMU,G722")
        await wait_for(lambda: bool(runtime.manager.calls), timeout=10)
        call = next(iter(runtime.manager.calls.values()))
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        assert (call.direction, call.from_, call.to) == ("inbound", CALLER, OUR_NUMBER)
        answer = dict(tx.commands)["answer"]
        assert base64.b64decode(answer["client_state"]).decode() == call.callId
        assert f"callId={call.callId}" in answer["webhook_url"]
        assert answer["stream_codec"] == answer["stream_bidirectional_codec"] == "PCMA"
        assert answer["stream_auth_token"] == call.metadata["streamToken"]
        assert stream_of(tx).codec == "PCMA"
        assert runtime.manager.voice(call.callId).bridge.wire.encoding == "pcma"
        heard = stream_of(tx).heard_now()
        assert call.transcript[0].text == runtime.settings.inboundGreeting
        assert len(heard) / 16000 > 1.0 and rms(heard) > 500
        levels = frame_rms(heard)
        assert levels.min() < 30, "A-law silence decodes to silence (u-law bytes would read as a DC of 848)"
        # the caller says something; Telnyx transcribes it; the bridge answers through the stream
        before = stream_of(tx).ms_received
        await tx.say("Do you have a table for two?")
        await wait_for(lambda: any(t.speaker == "user" for t in call.transcript), timeout=10)
        await wait_for(lambda: call.state == CallState.LISTENING and stream_of(tx).ms_received > before + 400,
                       timeout=15)
        assert [t.speaker for t in call.transcript][-2:] == ["user", "bot"]
        await tx.hang_up()
        await wait_for(lambda: call.terminal, timeout=10)
        assert call.state == CallState.HANGUP_USER


async def test_inbound_rejected_call(tmp_path: Path, fake: FakeTelnyx) -> None:
    async with bridge(fake, config(fake), tmp_path) as runtime:
        tx = fake.inbound_call("+15550001111", OUR_NUMBER)
        await wait_for(lambda: not tx.alive, timeout=10)
        assert tx.command_names() == ["reject"]
        assert tx.commands[0][1]["cause"] == "CALL_REJECTED"
        assert tx.hangup_cause == "call_rejected"
        await tx.flush()
        assert runtime.manager.active_calls() == [] and not runtime.manager.calls
        assert all(status == 200 for _, status in tx.webhooks)


async def test_barge_in_clears_the_telnyx_buffer(tmp_path: Path, fake: FakeTelnyx) -> None:
    long_message = ("This is a rather long announcement about the many opening hours of our store, "
                    "which we will now read out to you in great and loving detail, day by day.")
    async with bridge(fake, config(fake), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        tx = only_call(fake)
        speak = asyncio.ensure_future(client.call("voicecall.speak", {"callId": call_id, "message": long_message}))
        await wait_for(lambda: call.state == CallState.SPEAKING, timeout=10)
        await asyncio.sleep(1.0)
        await tx.say("Wait, stop please.")
        await asyncio.wait_for(speak, 15)
        assert stream_of(tx).clears >= 1, "the bridge sent clear"
        bot_line = [t.text for t in call.transcript if t.speaker == "bot"][-1]
        assert 0 < len(bot_line.split()) < len(long_message.split())
        await tx.hang_up()
        await wait_for(lambda: call.terminal)
        assert call.state == CallState.HANGUP_USER


async def test_dtmf_arrives_once_and_bot_hangs_up(tmp_path: Path, fake: FakeTelnyx) -> None:
    async with bridge(fake, config(fake), tmp_path) as runtime:
        client = rpc_client(runtime)
        events = runtime.manager.subscribe()
        call_id = (await client.call("voicecall.initiate", {"message": "Press one.", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        tx = only_call(fake)
        await tx.press("1")
        await tx.flush()
        await wait_for(lambda: call.metadata.get("dtmf") == "1", timeout=5)
        await asyncio.sleep(0.3)
        assert call.metadata["dtmf"] == "1", "stream frame and webhook are one key press"
        seen = []
        while not events.empty():
            seen.append(events.get_nowait())
        assert [e["digits"] for e in seen if e["type"] == "call.dtmf"] == ["1"]
        await client.call("voicecall.end", {"callId": call_id})
        assert call.state == CallState.HANGUP_BOT
        await wait_for(lambda: tx.hangup_cause == "normal_clearing")


async def test_out_of_order_frames_reach_the_pipeline_in_order(tmp_path: Path, fake: FakeTelnyx) -> None:
    async with bridge(fake, config(fake, inboundPolicy="open", streaming={"enabled": True, "provider": "none",
                                                                        "bargeIn": False}), tmp_path) as runtime:
        tx = fake.inbound_call(CALLER, OUR_NUMBER)
        await wait_for(lambda: tx.stream is not None and bool(runtime.manager.calls), timeout=10)
        call = next(iter(runtime.manager.calls.values()))
        await wait_for(lambda: runtime.manager.voice(call.callId) is not None, timeout=10)
        media = runtime.manager.voice(call.callId).bridge
        received: list[bytes] = []

        class Tap:
            def on_pipeline_audio(self, pcm: bytes) -> None:
                received.append(pcm)

            def on_dtmf(self, digit: str) -> None: ...

            def on_speech_started(self) -> None: ...

        media.set_listener(Tap())  # the tap is the only consumer in this test
        # frame k is a 400 Hz tone of amplitude 500*(k+1): the envelope rises only if order is kept
        t = np.arange(160) / 8000
        pcm = b"".join((500 * (k + 1) * np.sin(2 * np.pi * 400 * t)).astype("<i2").tobytes() for k in range(30))
        await stream_of(tx).play(pcm, swap={5, 11, 17})
        assert stream_of(tx).sent_chunks[5] > stream_of(tx).sent_chunks[6], "the fake really sent them out of order"
        await wait_for(lambda: media.stats.frames_in >= 27, timeout=5)
        assert media.stats.reordered_frames >= 3
        assert media.stats.lost_frames == 0 and media.stats.late_frames == 0
        audio = np.frombuffer(b"".join(received), dtype="<i2").astype(np.float64)
        rate = runtime.settings.pipelineSampleRate
        per_frame = rate // 50
        levels = [np.sqrt(np.mean(audio[i:i + per_frame] ** 2)) for i in range(per_frame, len(audio) - per_frame,
                                                                                per_frame)]
        assert len(levels) >= 20
        assert all(b > a for a, b in itertools.pairwise(levels[2:21])), "pipeline audio rises frame by frame"
        await tx.hang_up()
        await wait_for(lambda: call.terminal)


async def test_redelivered_webhooks_have_no_second_effect(tmp_path: Path, fake: FakeTelnyx) -> None:
    fake.redeliver = 1  # every webhook twice: same data.id, new attempt, new signature
    async with bridge(fake, config(fake), tmp_path) as runtime:
        client = rpc_client(runtime)
        events = runtime.manager.subscribe()
        call_id = (await client.call("voicecall.initiate", {"message": "Hello there.", "mode": "notify"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.terminal, timeout=20)
        seen = []
        while not events.empty():
            seen.append(events.get_nowait()["type"])
        assert seen.count("call.answered") == 1 and seen.count("call.ended") == 1
        assert [t.text for t in call.transcript] == ["Hello there."]
        tx = only_call(fake)
        assert sum(1 for e, _ in tx.webhooks if e == "call.answered") == 2


async def test_busy_and_no_answer(tmp_path: Path, fake: FakeTelnyx) -> None:
    async with bridge(fake, config(fake), tmp_path) as runtime:
        client = rpc_client(runtime)
        busy = (await client.call("voicecall.initiate", {"to": "+15550000002", "message": "Hi"}))["callId"]
        silent = (await client.call("voicecall.initiate", {"to": "+15550000003", "message": "Hi"}))["callId"]
        calls = runtime.manager.calls
        await wait_for(lambda: calls[busy].terminal and calls[silent].terminal, timeout=10)
        assert (calls[busy].state, calls[silent].state) == (CallState.BUSY, CallState.NO_ANSWER)


async def test_native_speak_and_listen_without_streaming(tmp_path: Path, fake: FakeTelnyx) -> None:
    cfg = config(fake, streaming={"enabled": False})
    async with bridge(fake, cfg, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hello!", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=10)
        tx = only_call(fake)
        assert "stream_url" not in tx.dial and tx.stream is None
        assert tx.spoken[0]["payload"] == "Hello!" and tx.spoken[0]["voice"] == "AWS.Polly.Joanna-Neural"
        turn = asyncio.ensure_future(client.call("voicecall.continue", {"callId": call_id, "message": "Name?"}))
        await wait_for(lambda: tx.transcribing, timeout=10)
        start = dict(tx.commands)["transcription_start"]
        assert base64.b64decode(start["client_state"]).decode().startswith(f"{call_id} listen:")
        await tx.say("Ada Lovelace.")
        assert (await asyncio.wait_for(turn, 10))["transcript"] == "Ada Lovelace."
        await wait_for(lambda: "transcription_stop" in tx.command_names(), timeout=5)
        await tx.hang_up()
        await wait_for(lambda: call.terminal)
        assert call.state == CallState.HANGUP_USER


@pytest.mark.parametrize("outbound_ms", [None, 20])
async def test_outbound_media_messages_on_the_wire(tmp_path: Path, fake: FakeTelnyx, outbound_ms: int | None) -> None:
    """streaming.outboundFrameMs (default 40): every media message but a play's last carries exactly
    that much audio; the last is whole 20 ms frames."""
    cfg = config(fake)
    if outbound_ms is not None:
        cfg["streaming"] = {**cfg["streaming"], "outboundFrameMs": outbound_ms}
    async with bridge(fake, cfg, tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Your table is ready.", "notify")
        await wait_for(lambda: call.terminal, timeout=20)
        stream = stream_of(only_call(fake))
        size = (outbound_ms or 40) * 8
        sizes = stream.sizes_received
        assert len(sizes) > 10 and sizes[:-1] == [size] * (len(sizes) - 1)
        assert sizes[-1] in range(160, size + 1, 160)
        assert stream.marks_echoed
        assert len(stream.heard_now()) == 2 * sum(sizes)  # all of it played (PCM16)
