"""A local fake of Gemini Live (BidiGenerateContent over WebSocket).

The first message must be `setup` (answered with `setupComplete`, then a `sessionResumptionUpdate`
handle); `realtimeInput.audio` (16 kHz PCM16; camelCase or snake_case keys, as the real server
accepts both) runs through an energy VAD: speech while the model talks sends
`serverContent.interrupted` (then `turnComplete`); the end of speech sends the caller's
`inputTranscription` and a model turn: `modelTurn` inline audio at 24 kHz with
`outputTranscription`, `generationComplete`, `turnComplete`, and a fresh resumption handle.
`clientContent` with the bridge's "Say exactly ...: TEXT" speaks TEXT. A scripted reply can be a
`toolCall`; the `toolResponse` is recorded and answered with the next reply. `go_away_after_s`
sends `goAway` on the first connection and closes it `time_left_s` later; a new connection
with a known handle resumes that conversation.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.audio import fake_speech
from tests.fakes.http_app import serve_local
from tests.fakes.openai_server import _ServerVad

PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
SAY = re.compile(r"word for word, and nothing else: (.*)$", re.DOTALL)


@dataclass
class GeminiReply:
    text: str = ""
    tool: tuple[str, dict[str, Any]] | None = None


@dataclass
class LiveSession:
    opened_at: float
    setup: dict[str, Any] = field(default_factory=dict)
    resumed_from: str | None = None
    audio: bytearray = field(default_factory=bytearray)  # caller audio, PCM16 16 kHz
    mime_types: set[str] = field(default_factory=set)
    turns: list[dict[str, Any]] = field(default_factory=list)  # {"text", "status", "audio_ms", "sent_ms_at_interrupt"}
    tool_responses: list[dict[str, Any]] = field(default_factory=list)
    interrupted_at: list[float] = field(default_factory=list)
    go_away_at: float | None = None
    closed_at: float | None = None


@dataclass
class FakeGeminiLive:
    api_key: str = "gm-test-key"
    transcripts: list[str] = field(default_factory=lambda: ["hello"])
    replies: list[GeminiReply] = field(default_factory=lambda: [GeminiReply("Sure.")])
    chunk_ms: int = 100
    # generation pace: seconds per second of audio (a live model streams a little faster than real
    # time, so a caller who talks over it still finds the turn running and gets `interrupted`)
    pace: float = 0.8
    go_away_after_s: float | None = None
    drop_first_after_s: float | None = None  # the first socket just breaks (no goAway) this long after setup
    time_left_s: float = 1.0
    sessions: list[LiveSession] = field(default_factory=list)
    handles: dict[str, int] = field(default_factory=dict)  # issued handle -> conversation turn count
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeGeminiLive:
        app = web.Application()
        app.router.add_get(PATH, self._live)
        self._runner, self.port = await serve_local(app)
        self._ids = itertools.count(1)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _live(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if key != self.api_key:
            return web.Response(status=401, text="API key not valid")
        ws = web.WebSocketResponse(max_msg_size=2**24)
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        sess = LiveSession(opened_at=loop.time())
        self.sessions.append(sess)
        conn = _Live(self, sess, ws, first=len(self.sessions) == 1)
        try:
            await conn.run()
        finally:
            sess.closed_at = loop.time()
        return ws


def _get(msg: dict[str, Any], camel: str) -> Any:
    snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)
    return msg.get(camel, msg.get(snake))


class _Live:
    def __init__(self, fake: FakeGeminiLive, sess: LiveSession, ws: web.WebSocketResponse, *, first: bool) -> None:
        self.fake = fake
        self.sess = sess
        self.ws = ws
        self.first = first
        self.vad = _ServerVad()
        self.vad.configure(16000, 0.5, 400)
        self.turn_count = 0
        self.streaming: asyncio.Task[None] | None = None
        self.current: dict[str, Any] | None = None
        self.loop = asyncio.get_running_loop()

    async def send(self, msg: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(msg))

    async def run(self) -> None:
        first = await self.ws.receive()
        if first.type != WSMsgType.TEXT or "setup" not in json.loads(first.data):
            await self.ws.close(code=1007, message=b"first message must be setup")
            return
        setup = json.loads(first.data)["setup"]
        self.sess.setup = setup
        handle = (setup.get("sessionResumption") or {}).get("handle")
        if handle:
            if handle not in self.fake.handles:
                await self.ws.close(code=1008, message=b"unknown resumption handle")
                return
            self.sess.resumed_from = handle
            self.turn_count = self.fake.handles[handle]
        await self.send({"setupComplete": {"sessionId": f"s{next(self.fake._ids)}"}})
        await self.issue_handle()
        if self.first and self.fake.go_away_after_s is not None:
            self.loop.call_later(self.fake.go_away_after_s, lambda: asyncio.ensure_future(self.go_away()))
        if self.first and self.fake.drop_first_after_s is not None:
            self.loop.call_later(self.fake.drop_first_after_s,
                                 lambda: asyncio.ensure_future(self.ws.close(code=1011, message=b"internal error")))
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                await self.handle(json.loads(msg.data))
        if self.streaming is not None:
            self.streaming.cancel()

    async def go_away(self) -> None:
        self.sess.go_away_at = self.loop.time()
        await self.send({"goAway": {"timeLeft": f"{self.fake.time_left_s}s"}})
        await asyncio.sleep(self.fake.time_left_s)
        await self.ws.close(code=1000, message=b"session expired")

    async def issue_handle(self) -> None:
        handle = f"handle-{next(self.fake._ids)}"
        self.fake.handles[handle] = self.turn_count
        await self.send({"sessionResumptionUpdate": {"newHandle": handle, "resumable": True}})

    async def handle(self, msg: dict[str, Any]) -> None:
        realtime = _get(msg, "realtimeInput")
        content = _get(msg, "clientContent")
        tool_response = _get(msg, "toolResponse")
        if isinstance(realtime, dict):
            audio = realtime.get("audio")
            if isinstance(audio, dict):
                self.sess.mime_types.add(str(_get(audio, "mimeType")))
                await self.audio(base64.b64decode(audio["data"]))
        elif isinstance(content, dict):
            text = " ".join(p.get("text", "") for t in content.get("turns") or [] for p in t.get("parts") or [])
            said = SAY.search(text)
            self.start_turn(GeminiReply(said.group(1)) if said else self.next_reply())
        elif isinstance(tool_response, dict):
            self.sess.tool_responses.extend(_get(tool_response, "functionResponses") or [])
            self.start_turn(self.next_reply())

    def next_reply(self) -> GeminiReply:
        replies = self.fake.replies
        reply = replies[min(self.turn_count, len(replies) - 1)] if replies else GeminiReply("Okay.")
        self.turn_count += 1
        return reply

    async def audio(self, pcm: bytes) -> None:
        self.sess.audio += pcm
        for change in self.vad.feed(pcm):
            if change == "started":
                if self.streaming is not None and not self.streaming.done() and self.current is not None:
                    self.streaming.cancel()
                    self.current["status"] = "interrupted"
                    self.sess.interrupted_at.append(self.loop.time())
                    await self.send({"serverContent": {"interrupted": True}})
                    await self.send({"serverContent": {"turnComplete": True}})
            else:
                text = self.fake.transcripts[self.turn_count % len(self.fake.transcripts)]
                await self.send({"serverContent": {"inputTranscription": {"text": text, "finished": True}}})
                self.start_turn(self.next_reply())

    def start_turn(self, reply: GeminiReply) -> None:
        if self.streaming is not None and not self.streaming.done():
            self.streaming.cancel()
        record = {"text": reply.text, "status": "in_progress", "tool": reply.tool, "first_chunk_at": None}
        self.sess.turns.append(record)
        self.current = record
        self.streaming = asyncio.ensure_future(self.stream(record, reply))

    async def stream(self, record: dict[str, Any], reply: GeminiReply) -> None:
        if reply.tool is not None:
            name, args = reply.tool
            await self.send({"toolCall": {"functionCalls": [{"id": f"fc-{next(self.fake._ids)}", "name": name,
                                                             "args": args}]}})
            record["status"] = "completed"
            return
        pcm = fake_speech(reply.text, 24000)
        step = 24000 * self.fake.chunk_ms // 1000 * 2
        words = reply.text.split(" ")
        for n, offset in enumerate(range(0, len(pcm), step)):
            if n == 0:
                record["first_chunk_at"] = self.loop.time()
            content: dict[str, Any] = {"modelTurn": {"parts": [{"inlineData": {
                "mimeType": "audio/pcm;rate=24000", "data": base64.b64encode(pcm[offset:offset + step]).decode()}}]}}
            if n < len(words):
                content["outputTranscription"] = {"text": words[n] if n == 0 else " " + words[n]}
            await self.send({"serverContent": content})
            await asyncio.sleep(self.fake.chunk_ms / 1000 * self.fake.pace)
        await self.send({"serverContent": {"generationComplete": True}})
        await self.send({"serverContent": {"turnComplete": True}, "usageMetadata": {"totalTokenCount": 10}})
        record["status"] = "completed"
        await self.issue_handle()
