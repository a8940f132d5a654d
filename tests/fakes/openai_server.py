"""A local fake of the OpenAI endpoints the bridge uses, speaking the real wire protocol:

- POST /v1/chat/completions -> with `stream: true`, Server-Sent Events of `chat.completion.chunk`s
  at a configurable time to first token and token rate, scripted text and tool-call fragments,
  mid-stream `error` payloads, `data: [DONE]`; it records each request and whether the client
  closed the stream before the end (barge-in). Without `stream`, one `chat.completion` after the
  same total time (the batch path);
- POST /v1/audio/speech -> raw PCM16 24 kHz (response_format=pcm), chunked at odd sizes, after a
  configurable first-byte delay;
- GET  /v1/realtime?intent=transcription -> the Realtime transcription WebSocket: session update,
  input_audio_buffer.append, server VAD events, transcription delta/completed events.

The Realtime fake keeps every audio byte it received (decoded to PCM16) so tests can measure
what reached the engine; its "recognizer" returns scripted transcripts, one per utterance.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from tests.fakes.audio import fake_speech, odd_chunks
from tests.fakes.http_app import serve_local

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


@dataclass
class RealtimeSession:
    headers: dict[str, str]
    query: dict[str, str]
    updates: list[dict[str, Any]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)  # PCM16 at `rate`
    rate: int = 24000
    input_format: str = "pcm16"
    appends: int = 0


@dataclass
class ChatReply:
    """One scripted model reply: text (streamed as word tokens), then tool calls (name, arguments JSON)."""

    text: str = ""
    tool_calls: list[tuple[str, str]] = field(default_factory=list)
    fail_after_tokens: int | None = None  # send a mid-stream error payload after this many tokens
    status: int = 200  # >= 400: answer this HTTP error instead


@dataclass
class ChatStream:
    request: dict[str, Any]
    started: float  # loop time the request arrived
    tokens_sent: int = 0
    first_token_at: float | None = None
    completed: bool = False  # [DONE] was written
    client_closed: bool = False  # the client went away before the end


def tokens(text: str) -> list[str]:
    """Word tokens with their leading space, like a BPE model's."""
    return re.findall(r"\s*\S+", text) + ([text[len(text.rstrip()):]] if text != text.rstrip() else [])


def _last_user(body: dict[str, Any]) -> str:
    return str(next((m.get("content") or "" for m in reversed(body.get("messages", [])) if m.get("role") == "user"), ""))


def default_chat_reply(body: dict[str, Any]) -> ChatReply:
    last = _last_user(body)
    return ChatReply(f"You said {last.strip().rstrip('.!?')}. What else can I do for you today?")


@dataclass
class FakeOpenAI:
    api_key: str = "sk-test-123"
    transcripts: list[str] = field(default_factory=lambda: ["hello there", "second thing"])
    speech_requests: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[RealtimeSession] = field(default_factory=list)
    drop_after_appends: int | None = None  # close the first socket after N appends (reconnect tests)
    reject_connections: int = 0  # refuse this many WebSocket handshakes with 503 first
    chunk_delay_s: float = 0.0
    speech_first_byte_s: float = 0.0
    speech_fail_after: int | None = None  # answer HTTP 500 to every speech request after this many
    speech_chunk_bytes: int | None = None  # fixed-size chunks (cheap, for benchmarks) instead of odd sizes
    # chat completions: replies in order (then `chat_reply`), pacing, and what happened
    chat_script: list[ChatReply] = field(default_factory=list)
    chat_reply: Callable[[dict[str, Any]], ChatReply] = default_chat_reply
    chat_ttft_s: float = 0.0
    chat_tokens_per_s: float = 0.0  # 0: as fast as possible
    chat_streams: list[ChatStream] = field(default_factory=list)
    speech_first_byte: list[float] = field(default_factory=list)  # seconds from request to first audio byte
    speech_times: list[tuple[float, float, str]] = field(default_factory=list)  # (arrived, first byte out, input)
    # every HTTP request as (method, path, the client's port): which connection each one came on
    requests_seen: list[tuple[str, str, int]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @web.middleware
    async def _note_request(self, request: web.Request, handler: Any) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        self.requests_seen.append((request.method, request.path, int(peer[1]) if peer else 0))
        response: web.StreamResponse = await handler(request)
        return response

    async def start(self) -> FakeOpenAI:
        app = web.Application(middlewares=[self._note_request])
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/_stats", self._stats)  # benchmarks: how late the fake itself answered
        app.router.add_get("/v1/realtime", self._realtime)
        self._runner, self.port = await serve_local(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response(
                {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}},
                status=401,
            )
        arrived = time.monotonic()
        body = await request.json()
        self.speech_requests.append(body)
        if self.speech_fail_after is not None and len(self.speech_requests) > self.speech_fail_after:
            return web.json_response({"error": {"message": "scripted failure", "type": "server_error"}}, status=500)
        if body.get("response_format") != "pcm" or not body.get("input"):
            return web.json_response({"error": {"message": "bad request", "type": "invalid_request_error"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        await resp.prepare(request)
        audio = _speech_audio(body["input"])
        if self.speech_first_byte_s:  # from the request's arrival, like a real service's time to first byte
            await asyncio.sleep(max(0.0, arrived + self.speech_first_byte_s - time.monotonic()))
        step = self.speech_chunk_bytes
        chunks = [audio[i:i + step] for i in range(0, len(audio), step)] if step else \
            odd_chunks(audio, seed=len(body["input"]))
        for i, chunk in enumerate(chunks):
            await resp.write(chunk)
            if i == 0:
                now = time.monotonic()
                self.speech_first_byte.append(now - arrived)
                self.speech_times.append((arrived, now, body["input"]))
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        await resp.write_eof()
        return resp

    async def _stats(self, request: web.Request) -> web.Response:
        ttft = [s.first_token_at - s.started for s in self.chat_streams if s.first_token_at is not None]
        # absolute loop times (CLOCK_MONOTONIC, comparable across processes on one machine)
        data = {"chat_first_token_s": ttft, "speech_first_byte_s": list(self.speech_first_byte),
                "chat_times": [(s.started, s.first_token_at, _last_user(s.request)) for s in self.chat_streams
                               if s.first_token_at is not None],
                "speech_times": list(self.speech_times)}
        if request.query.get("reset"):
            self.chat_streams.clear()
            self.speech_first_byte.clear()
            self.speech_times.clear()
            self.speech_requests.clear()
        return web.json_response(data)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        return [s.request for s in self.chat_streams]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                                "code": "invalid_api_key"}}, status=401)
        body = await request.json()
        record = ChatStream(body, time.monotonic())
        self.chat_streams.append(record)
        reply = self.chat_script.pop(0) if self.chat_script else self.chat_reply(body)
        if reply.status >= 400:
            return web.json_response({"error": {"message": "scripted failure", "type": "server_error"}},
                                     status=reply.status)
        words = tokens(reply.text)
        gap = 1 / self.chat_tokens_per_s if self.chat_tokens_per_s else 0.0
        if not body.get("stream"):
            await asyncio.sleep(self.chat_ttft_s + gap * max(0, len(words) - 1))
            record.tokens_sent, record.completed = len(words), True
            message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
            if reply.tool_calls:
                message["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                                          "function": {"name": n, "arguments": a}}
                                         for i, (n, a) in enumerate(reply.tool_calls)]
            return web.json_response({"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                                      "model": body.get("model"), "choices": [{"index": 0, "message": message,
                                      "finish_reason": "tool_calls" if reply.tool_calls else "stop"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created,
                   "model": body.get("model"), "obfuscation": "xyz",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        # token i is due ttft + i * gap after the request came in (a steady rate: a late wake-up here
        # does not push every later token back)
        due = record.started + self.chat_ttft_s
        try:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await resp.write(chunk({"role": "assistant", "content": ""}))
            for i, word in enumerate(words):
                if reply.fail_after_tokens is not None and i >= reply.fail_after_tokens:
                    await resp.write(b'data: {"error": {"message": "The server had an error while processing '
                                     b'your request.", "type": "server_error"}}\n\n')
                    await resp.write_eof()
                    return resp
                if i and gap:
                    await asyncio.sleep(max(0.0, due + i * gap - time.monotonic()))
                await resp.write(chunk({"content": word}))
                record.tokens_sent += 1
                if record.first_token_at is None:
                    record.first_token_at = time.monotonic()
            for index, (name, arguments) in enumerate(reply.tool_calls):
                await resp.write(chunk({"tool_calls": [{"index": index, "id": f"call_{len(self.chat_streams)}_{index}",
                                                        "type": "function",
                                                        "function": {"name": name, "arguments": ""}}]}))
                half = len(arguments) // 2  # arguments arrive in fragments
                for part in (arguments[:half], arguments[half:]):
                    await resp.write(chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]}))
            await resp.write(chunk({}, "tool_calls" if reply.tool_calls else "stop"))
            await resp.write(b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","choices":[],'
                             b'"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}\n\n')
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            record.completed = True
        except (ConnectionResetError, asyncio.CancelledError):
            record.client_closed = True
            raise
        return resp

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        if self.reject_connections > 0:
            self.reject_connections -= 1
            return web.Response(status=503, text="overloaded")
        if not self._authorized(request) or request.query.get("intent") != "transcription":
            return web.Response(status=401, text="unauthorized")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sess = RealtimeSession(headers=dict(request.headers), query=dict(request.query))
        self.sessions.append(sess)
        await ws.send_json({"type": "transcription_session.created", "session": {"id": f"sess_{len(self.sessions)}"}})
        vad = _ServerVad()
        item = 0
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            ev = json.loads(msg.data)
            kind = ev.get("type")
            if kind in ("transcription_session.update", "session.update"):
                sess.updates.append(ev)
                s = ev.get("session", {})
                fmt = s.get("input_audio_format") or s.get("audio", {}).get("input", {}).get("format", {}).get("type")
                sess.input_format = fmt or "pcm16"
                sess.rate = 8000 if sess.input_format in ("g711_ulaw", "g711_alaw", "audio/pcmu", "audio/pcma") else 24000
                td = s.get("turn_detection") or {}
                vad.configure(sess.rate, td.get("threshold", 0.5), td.get("silence_duration_ms", 500))
                await ws.send_json({"type": "transcription_session.updated", "session": s})
            elif kind == "input_audio_buffer.append":
                raw = base64.b64decode(ev["audio"])
                if sess.input_format in ("g711_ulaw", "audio/pcmu"):
                    pcm = audioop.ulaw2lin(raw, 2)
                elif sess.input_format in ("g711_alaw", "audio/pcma"):
                    pcm = audioop.alaw2lin(raw, 2)
                else:
                    pcm = raw
                sess.audio += pcm
                sess.appends += 1
                for event in vad.feed(pcm):
                    if event == "started":
                        await ws.send_json({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": f"item_{item}"})
                    else:
                        await ws.send_json({"type": "input_audio_buffer.speech_stopped", "item_id": f"item_{item}"})
                        await ws.send_json({"type": "input_audio_buffer.committed", "item_id": f"item_{item}"})
                        text = self.transcripts[item % len(self.transcripts)]
                        words = text.split(" ")
                        for i, w in enumerate(words):
                            await ws.send_json({
                                "type": "conversation.item.input_audio_transcription.delta",
                                "item_id": f"item_{item}", "content_index": 0,
                                "delta": w if i == 0 else " " + w,
                            })
                        await ws.send_json({
                            "type": "conversation.item.input_audio_transcription.completed",
                            "item_id": f"item_{item}", "content_index": 0, "transcript": text,
                        })
                        item += 1
                if self.drop_after_appends is not None and sess.appends >= self.drop_after_appends and len(self.sessions) == 1:
                    await ws.close()
                    break
            else:
                await ws.send_json({"type": "error", "error": {"type": "invalid_request_error", "message": f"unknown event {kind}"}})
        return ws


@functools.lru_cache(maxsize=256)
def _speech_audio(text: str) -> bytes:
    return fake_speech(text, 24000)


class _ServerVad:
    """Energy VAD standing in for the server's: speech when 20 ms RMS > threshold-scaled level."""

    def __init__(self) -> None:
        self.rate = 24000
        self.level = 1000.0
        self.silence_frames = 25
        self.buf = bytearray()
        self.speaking = False
        self.quiet = 0

    def configure(self, rate: int, threshold: float, silence_ms: int) -> None:
        self.rate = rate
        self.level = 2000.0 * threshold
        self.silence_frames = max(1, silence_ms // 20)

    def feed(self, pcm: bytes) -> list[str]:
        self.buf += pcm
        fb = self.rate // 50 * 2
        events = []
        while len(self.buf) >= fb:
            x = np.frombuffer(bytes(self.buf[:fb]), dtype="<i2").astype(float)
            del self.buf[:fb]
            loud = float(np.sqrt(np.mean(x * x))) > self.level
            if loud:
                self.quiet = 0
                if not self.speaking:
                    self.speaking = True
                    events.append("started")
            elif self.speaking:
                self.quiet += 1
                if self.quiet >= self.silence_frames:
                    self.speaking = False
                    events.append("stopped")
        return events
