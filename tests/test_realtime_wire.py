"""The realtime connection's per-message path over real sockets against the OpenAI Realtime fake:
messages handled in the read callback and written without a task hop (media/ws_client.py),
in order with what had to be queued, and the caller's audio batched on the wire."""

from __future__ import annotations

import audioop
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.realtime import events as ev
from bridge.realtime.connection import RealtimeConnection
from bridge.realtime.gemini import GeminiLiveOptions, GeminiLiveProtocol
from bridge.realtime.openai import OpenAiRealtimeOptions, OpenAiRealtimeProtocol
from media.formats import ULAW_8K
from media.ws_client import InlineClientConnection
from tests.fakes.openai_realtime_server import FakeOpenAIRealtime, Reply
from tests.harness import rpc_client, run_bridge, wait_for
from tests.test_realtime_openai import mock_config


@pytest.fixture
async def rt() -> AsyncIterator[FakeOpenAIRealtime]:
    fake = await FakeOpenAIRealtime(replies=[Reply("Certainly, a table for two.")]).start()
    try:
        yield fake
    finally:
        await fake.stop()


def connection(fake: FakeOpenAIRealtime) -> RealtimeConnection:
    options = OpenAiRealtimeOptions(fake.api_key, base_url=fake.base_url)
    return RealtimeConnection(OpenAiRealtimeProtocol(options, wire=ULAW_8K))


def test_prebuilt_audio_json_is_the_audio_message() -> None:
    chunk = bytes(range(256)) * 3
    for proto in (OpenAiRealtimeProtocol(OpenAiRealtimeOptions("k"), wire=ULAW_8K),
                  GeminiLiveProtocol(GeminiLiveOptions("k"))):
        assert json.loads(proto.audio_json(chunk)) == proto.audio(chunk)


async def test_sends_queued_before_the_socket_and_written_at_once_after_keep_their_order(rt: FakeOpenAIRealtime) -> None:
    conn = connection(rt)
    chunks = [bytes([0x10 + i]) * 320 for i in range(12)]
    try:
        for chunk in chunks[:4]:  # no socket yet: queued for the send loop
            conn.send_audio(chunk)
        assert await conn.wait_ready(10)
        ws = conn.socket
        assert isinstance(ws, InlineClientConnection) and ws.inline_ok
        for chunk in chunks[4:]:
            conn.send_audio(chunk)
        await wait_for(lambda: len(rt.sessions[0].audio) == 2 * sum(map(len, chunks)), timeout=5)
        assert bytes(rt.sessions[0].audio) == audioop.ulaw2lin(b"".join(chunks), 2), "all the audio, in order"
        assert ws.written_now >= 8, "with nothing queued ahead, each append was written at once"
        assert conn.sent_audio_bytes == sum(map(len, chunks))
    finally:
        await conn.close()


async def test_model_messages_are_handled_in_the_read_callback(rt: FakeOpenAIRealtime) -> None:
    conn = connection(rt)
    seen: list[ev.RealtimeEvent] = []
    conn.listen(seen.append)
    try:
        assert await conn.wait_ready(10)
        conn.send(conn.protocol.say("Certainly, a table for two.", "t1"))
        await wait_for(lambda: any(isinstance(e, ev.ResponseDone) for e in seen), timeout=10)
        audio = [e for e in seen if isinstance(e, ev.AudioOut)]
        assert len(audio) >= 2 and all(e.audio for e in audio)
        kinds = [type(e).__name__ for e in seen]
        assert kinds.index("ResponseStarted") < kinds.index("AudioOut") < kinds.index("ResponseDone")
        ws = conn.socket
        assert isinstance(ws, InlineClientConnection)
        assert ws.inline_messages >= len(audio) + 2, "no recv() hand-off per message"
    finally:
        await conn.close()


async def test_a_call_sends_the_callers_audio_in_40_ms_appends(rt: FakeOpenAIRealtime, tmp_path: Path) -> None:
    """On the wire: one `input_audio_buffer.append` per 40 ms of caller u-law (320 bytes; the silence
    the bridge fills a stalled leg with goes as its own 100 ms append), never one per 20 ms frame."""
    cfg = mock_config(rt, script=["I would like a table for two please."])
    async with run_bridge(cfg, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hello.", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: any(t.speaker == "bot" and t.text == "Certainly, a table for two." for t in call.transcript),
                       timeout=30)
        session = rt.sessions[0]
        sizes = list(session.append_sizes)
        speech = [n for n in sizes if n != 800]  # 800: 100 ms of filled silence (GAP_FILL_S)
        assert sum(speech) > 8000 * 2, "the callee's speech went up"
        assert speech.count(320) >= 0.9 * len(speech), sizes
        voice = runtime.manager.voice(call_id)
        ws = voice.connection.socket
        assert isinstance(ws, InlineClientConnection) and ws.written_now >= 0.9 * len(sizes)
        await client.call("voicecall.end", {"callId": call_id})
