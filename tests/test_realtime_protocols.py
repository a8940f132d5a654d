"""The realtime protocols sans I/O (dicts in, events/dicts out), the connection's backoff on the fake
clock against a real refusing server, and the `realtime` config section."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from aiohttp import web

from bridge.config import ConfigError, build_settings
from bridge.realtime import events as ev
from bridge.realtime.connection import RealtimeConnection
from bridge.realtime.gemini import GeminiLiveOptions, GeminiLiveProtocol, live_url, parse_duration
from bridge.realtime.openai import OpenAiRealtimeOptions, OpenAiRealtimeProtocol, realtime_url
from media import g711
from media.clock import FakeClock
from media.formats import ALAW_8K, ULAW_8K, AudioEncoding, AudioFormat
from tests.fakes.http_app import serve_local
from tests.harness import wait_for

NESTED_TOOL = {"type": "function", "function": {"name": "transfer", "description": "Transfer",
                                                "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}


def openai(wire: AudioFormat | None) -> OpenAiRealtimeProtocol:
    return OpenAiRealtimeProtocol(OpenAiRealtimeOptions(api_key="sk-x", base_url="https://api.openai.com/v1",
                                                        instructions="Be brief."), wire, tools=[NESTED_TOOL])


def test_openai_formats_follow_the_wire() -> None:
    ulaw, alaw, l16 = openai(ULAW_8K), openai(ALAW_8K), openai(AudioFormat(AudioEncoding.L16, 16000))
    assert (ulaw.format, ulaw.wire_passthrough, ulaw.output_rate) == ("audio/pcmu", True, 8000)
    assert (alaw.format, alaw.wire_passthrough) == ("audio/pcma", True)
    assert (l16.format, l16.wire_passthrough, l16.input_rate) == ("audio/pcm", False, 24000)
    session = l16.session_update()["session"]
    assert session["type"] == "realtime" and session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["output"]["voice"] == "marin" and session["instructions"] == "Be brief."
    assert session["tools"] == [{"type": "function", "name": "transfer", "description": "Transfer",
                                 "parameters": NESTED_TOOL["function"]["parameters"]}], "chat-style tools flattened"
    # a pre-warmed session guessed u-law: only a different wire costs a session.update
    assert ulaw.set_wire(ULAW_8K) == []
    assert ulaw.set_wire(AudioFormat(AudioEncoding.L16, 8000))[0]["session"]["audio"]["output"]["format"]["type"] == "audio/pcm"
    assert realtime_url("https://api.openai.com/v1", "gpt-realtime") == "wss://api.openai.com/v1/realtime?model=gpt-realtime"


def test_openai_server_events() -> None:
    proto = openai(ULAW_8K)
    tone = g711.encode(b"\x10\x20" * 400, AudioEncoding.PCMU)
    assert proto.handle({"type": "session.updated", "session": {}}) == [ev.Ready()]
    assert proto.handle({"type": "response.created", "response": {"id": "r1", "metadata": {"say": "t1"}}}) == [
        ev.ResponseStarted("r1", "t1")]
    [audio] = proto.handle({"type": "response.output_audio.delta", "item_id": "i1", "response_id": "r1",
                            "delta": base64.b64encode(tone).decode()})
    assert audio == ev.AudioOut("i1", tone, "r1")
    assert proto.decode_output(tone) == g711.decode(tone, AudioEncoding.PCMU)
    proto.handle({"type": "response.output_audio_transcript.delta", "item_id": "i1", "delta": "Hi "})
    proto.handle({"type": "response.output_audio_transcript.delta", "item_id": "i1", "delta": "there"})
    assert proto.handle({"type": "response.output_audio_transcript.done", "item_id": "i1"}) == [ev.BotTranscript("i1", "Hi there")]
    assert proto.handle({"type": "conversation.item.input_audio_transcription.delta", "item_id": "u1", "delta": "book"}) == [
        ev.UserTranscript("book", final=False)]
    assert proto.handle({"type": "conversation.item.input_audio_transcription.completed", "item_id": "u1",
                         "transcript": "book a table"}) == [ev.UserTranscript("book a table", final=True)]
    assert proto.handle({"type": "response.function_call_arguments.done", "call_id": "c1", "name": "transfer",
                         "arguments": '{"to":"+1555"}'}) == [ev.ToolCall("c1", "transfer", '{"to":"+1555"}')]
    assert proto.handle({"type": "input_audio_buffer.speech_started"}) == [ev.SpeechStarted()]
    assert proto.handle({"type": "response.done", "response": {"id": "r1", "status": "cancelled"}}) == [
        ev.ResponseDone("r1", "cancelled")]
    assert proto.handle({"type": "rate_limits.updated"}) == []
    assert proto.truncate("i1", 1234) == [{"type": "conversation.item.truncate", "item_id": "i1", "content_index": 0,
                                           "audio_end_ms": 1234}]
    create, respond = proto.tool_result("c1", "transfer", '{"ok":true}')
    assert create["item"] == {"type": "function_call_output", "call_id": "c1", "output": '{"ok":true}'}
    assert respond == {"type": "response.create"}


def test_gemini_turns_interruptions_tools_and_resumption() -> None:
    proto = GeminiLiveProtocol(GeminiLiveOptions(api_key="g", model="gemini-live", instructions="Hi."), tools=[NESTED_TOOL])
    setup = proto.opening()[0]["setup"]
    assert setup["model"] == "models/gemini-live" and setup["sessionResumption"] == {}
    assert setup["tools"][0]["functionDeclarations"][0]["name"] == "transfer"
    assert setup["systemInstruction"] == {"parts": [{"text": "Hi."}]}
    assert proto.handle({"setupComplete": {}}) == [ev.Ready()]
    proto.handle({"sessionResumptionUpdate": {"newHandle": "h1", "resumable": True}})
    proto.handle({"sessionResumptionUpdate": {"newHandle": "h2", "resumable": False}})
    assert proto.opening()[0]["setup"]["sessionResumption"] == {"handle": "h1"}, "only resumable handles count"
    proto.say("Hello there", "tag1")
    chunk = base64.b64encode(b"\x01\x00" * 480).decode()
    part = {"serverContent": {"modelTurn": {"parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": chunk}}]},
                              "outputTranscription": {"text": "Hello"}}}
    first = proto.handle(part)
    assert first == [ev.ResponseStarted("turn-1", "tag1"), ev.AudioOut("turn-1", b"\x01\x00" * 480, "turn-1")]
    assert proto.handle(part)[0] == ev.AudioOut("turn-1", b"\x01\x00" * 480, "turn-1")
    assert proto.handle({"serverContent": {"interrupted": True}}) == [
        ev.SpeechStarted(), ev.AudioDone("turn-1"), ev.BotTranscript("turn-1", "HelloHello"),
        ev.ResponseDone("turn-1", "cancelled")]
    assert proto.handle({"serverContent": {"turnComplete": True}}) == []
    assert proto.handle({"serverContent": {"inputTranscription": {"text": "book it", "finished": True}}}) == [
        ev.UserTranscript("book it", final=True)]
    assert proto.handle({"toolCall": {"functionCalls": [{"id": "f1", "name": "transfer", "args": {"to": "x"}}]}}) == [
        ev.ToolCall("f1", "transfer", json.dumps({"to": "x"}))]
    assert proto.tool_result("f1", "transfer", "done") == [
        {"toolResponse": {"functionResponses": [{"id": "f1", "name": "transfer", "response": {"result": "done"}}]}}]
    assert proto.handle({"goAway": {"timeLeft": "2.5s"}}) == [ev.GoAway(2.5)]
    assert parse_duration("bogus") == 0.0
    assert live_url("https://x.example").endswith("/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent")
    assert live_url("https://x.example").startswith("wss://")
    assert proto.audio(b"\x00\x00")["realtimeInput"]["audio"]["mimeType"] == "audio/pcm;rate=16000"


async def test_connection_backs_off_on_the_fake_clock_then_reports_failure() -> None:
    attempts: list[float] = []

    async def refuse(request: web.Request) -> web.Response:
        attempts.append(asyncio.get_running_loop().time())
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/v1/realtime", refuse)
    runner, port = await serve_local(app)
    clock = FakeClock()
    proto = openai(ULAW_8K)
    proto.url = realtime_url(f"http://127.0.0.1:{port}/v1", "gpt-realtime")
    failures: list[str] = []
    conn = RealtimeConnection(proto, clock=clock, max_retries=2, backoff_s=0.5)
    conn.on_failed = failures.append
    try:
        conn.start()
        await wait_for(lambda: len(attempts) == 1 and clock.pending == 1, timeout=5)
        await clock.advance(0.49)
        assert len(attempts) == 1, "no retry before the backoff"
        await clock.advance(0.01)
        await wait_for(lambda: len(attempts) == 2 and clock.pending == 1, timeout=5)
        await clock.advance(1.0)  # second backoff doubles
        await wait_for(lambda: bool(failures), timeout=5)
        assert len(attempts) == 3 and "could not reconnect after 2 attempts (HTTP 503)" in failures[0]
        conn.send_audio(b"\xff" * 160)  # a failed session takes nothing more
        assert conn.failed and not conn.ready.is_set()
    finally:
        await conn.close()
        await runner.cleanup()


def test_realtime_config_rules_and_env_fallback() -> None:
    base = {"provider": "mock", "realtime": {"enabled": True, "provider": "gemini"}}
    with pytest.raises(ConfigError) as err:
        build_settings(base, {})
    assert err.value.problems == ["realtime.apiKey: required when realtime.enabled with provider gemini (or set GEMINI_API_KEY)"]
    settings = build_settings(base, {"GEMINI_API_KEY": "gm-secret"})
    assert settings.realtime.apiKey is not None and settings.realtime.apiKey.get_secret_value() == "gm-secret"
    assert settings.realtime.effective("voice") == "Charon" and settings.streaming.enabled
    assert "gm-secret" not in json.dumps(settings.masked())
    with pytest.raises(ConfigError) as err:
        build_settings({"realtime": {"enabled": True, "apiKey": "k", "voise": "marin"}}, {})
    assert err.value.problems == ["realtime.voise: unknown key; did you mean 'voice'?"]
    with pytest.raises(ConfigError) as err:
        build_settings({"realtime": {"enabled": True, "apiKey": "k", "baseUrl": "ftp://x"}}, {})
    assert err.value.problems == ["realtime.baseUrl: must start with wss:// or https:// (got 'ftp://x')"]
    # the seed system's shape: providers.<name> fills the keys, streamPath is accepted
    seed = build_settings({"realtime": {"enabled": True, "streamPath": "/voice/stream/realtime",
                                        "providers": {"openai": {"apiKey": "sk-seed", "model": "gpt-realtime-mini"}}}}, {})
    assert seed.realtime.effective("model") == "gpt-realtime-mini"
    assert "sk-seed" not in json.dumps(seed.masked())


def test_protocol_modules_are_sans_io() -> None:
    """The realtime protocols and Deepgram's turn builder import with every socket library refused."""
    import subprocess
    import sys

    blocker = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('aiohttp', 'websockets'):\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import bridge.realtime.openai, bridge.realtime.gemini, media.stt.deepgram\n"
        "assert not {'aiohttp', 'websockets'} & set(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_realtime_voice_offers_what_the_manager_uses_of_a_call_voice() -> None:
    import inspect

    from bridge.realtime_voice import RealtimeVoice
    from bridge.voice import CallVoice

    for name in ("start", "close", "say", "interrupt", "on_pipeline_audio", "on_wire_audio", "on_dtmf",
                 "on_speech_started"):
        ours, theirs = getattr(RealtimeVoice, name), getattr(CallVoice, name)
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), name
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), name
