"""A local fake of the OpenAI Realtime speech-to-speech WebSocket (GA event names).

`GET /v1/realtime?model=...` with `Authorization: Bearer <key>`. It answers `session.update` with
`session.updated`, decodes `input_audio_buffer.append` in the session's format (audio/pcmu,
audio/pcma, audio/pcm 24 kHz), runs an energy "server VAD" over it (speech_started / _stopped,
committed), transcribes each user turn from a script, and answers with scripted replies: audio
deltas (a deterministic tone per character, in the session's output format) with transcript
deltas, or a function call. `response.create` with the bridge's "Say exactly ...: TEXT"
instructions speaks TEXT. Caller speech during a response cancels it (`response.done` with
`status: cancelled`, `turn_detected`). It records every truncate (and checks `audio_end_ms`
against the item's audio length, as the service does), function outputs and cancels.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.audio import fake_speech
from tests.fakes.http_app import serve_local
from tests.fakes.openai_server import _ServerVad

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

SAY = re.compile(r"word for word, and nothing else: (.*)$", re.DOTALL)


@dataclass
class Reply:
    text: str = ""
    tool: tuple[str, dict[str, Any]] | None = None  # (name, arguments): a function call instead of speech


@dataclass
class RtSession:
    query: dict[str, str]
    opened_at: float
    updates: list[dict[str, Any]] = field(default_factory=list)
    format: str = "audio/pcm"
    audio: bytearray = field(default_factory=bytearray)  # caller audio as PCM16 at `rate`
    appends: int = 0
    append_sizes: list[int] = field(default_factory=list)  # bytes of audio in each append, as sent
    responses: list[dict[str, Any]] = field(default_factory=list)  # {"id", "text", "tag", "status", "first_delta_at"}
    truncates: list[dict[str, Any]] = field(default_factory=list)
    tool_outputs: list[dict[str, Any]] = field(default_factory=list)
    user_texts: list[str] = field(default_factory=list)
    cancels: int = 0
    speech_started_at: list[float] = field(default_factory=list)
    closed_at: float | None = None

    @property
    def rate(self) -> int:
        return 8000 if self.format in ("audio/pcmu", "audio/pcma") else 24000


@dataclass
class FakeOpenAIRealtime:
    api_key: str = "sk-rt-test"
    transcripts: list[str] = field(default_factory=lambda: ["hello"])
    replies: list[Reply] = field(default_factory=lambda: [Reply("Sure, I can help with that.")])
    delta_ms: int = 100  # audio per delta
    delta_interval_s: float = 0.0  # time between deltas (a real model generates faster than real time)
    first_delta_delay_s: float = 0.0
    vad_threshold_level: float | None = None
    fail_after_s: float | None = None  # close every socket this long after it opened, refuse new ones
    drop_first_after_s: float | None = None  # close the first socket this long after it opened (once)
    sessions: list[RtSession] = field(default_factory=list)
    refused: int = 0
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> FakeOpenAIRealtime:
        app = web.Application()
        app.router.add_get("/v1/realtime", self._realtime)
        app.router.add_get("/_fake/responses", self._responses)  # for a benchmark running this fake apart
        self._runner, self.port = await serve_local(app)
        self._ids = itertools.count(1)
        self._failing = False
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _responses(self, request: web.Request) -> web.Response:
        """Every response so far (`?reset=1`: then forget them); `session`: the session's number in
        opening order, `session_text`: the first text item a client added to it (a benchmark's tag)."""
        data = [{**{k: r[k] for k in ("id", "status", "first_delta_at", "metadata")}, "session": i,
                 "session_text": s.user_texts[0] if s.user_texts else None}
                for i, s in enumerate(self.sessions) for r in s.responses]
        if request.query.get("reset"):
            self.sessions = [s for s in self.sessions if s.closed_at is None]
            for s in self.sessions:
                s.responses.clear()
        return web.json_response(data)

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.Response(status=401, text="unauthorized")
        if self._failing or "model" not in request.query:
            self.refused += 1
            return web.Response(status=503, text="unavailable")
        ws = web.WebSocketResponse(max_msg_size=2**24)
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        sess = RtSession(query=dict(request.query), opened_at=time.monotonic())
        self.sessions.append(sess)
        conn = _Conn(self, sess, ws)
        killer = None
        if self.fail_after_s is not None:
            killer = loop.call_later(self.fail_after_s, conn.fail)
        elif self.drop_first_after_s is not None and len(self.sessions) == 1:
            killer = loop.call_later(self.drop_first_after_s,
                                     lambda: asyncio.ensure_future(ws.close(code=1011, message=b"server error")))
        try:
            await conn.run()
        finally:
            if killer is not None:
                killer.cancel()
            sess.closed_at = time.monotonic()
        return ws


class _Conn:
    def __init__(self, fake: FakeOpenAIRealtime, sess: RtSession, ws: web.WebSocketResponse) -> None:
        self.fake = fake
        self.sess = sess
        self.ws = ws
        self.vad = _ServerVad()
        self.turns = 0
        self.replies = fake.replies
        self.streaming: asyncio.Task[None] | None = None
        self.current: dict[str, Any] | None = None
        self.item_ms: dict[str, float] = {}
        self.interrupt = True
        self.closing: asyncio.Future[bool] | None = None
        self.loop = asyncio.get_running_loop()

    def fail(self) -> None:
        self.fake._failing = True
        self.closing = asyncio.ensure_future(self.ws.close(code=1011, message=b"server error"))

    async def send(self, event: dict[str, Any]) -> None:
        if not self.ws.closed:
            event.setdefault("event_id", self.fake._id("event"))
            await self.ws.send_str(json.dumps(event))

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": {"type": "realtime", "id": self.fake._id("sess"),
                                                                "model": self.sess.query.get("model")}})
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            await self.handle(event)
        if self.streaming is not None:
            self.streaming.cancel()

    async def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "session.update":
            session = event.get("session") or {}
            if session.get("type") != "realtime":
                await self.error("session.type must be realtime")
                return
            self.sess.updates.append(session)
            audio_in = (session.get("audio") or {}).get("input") or {}
            self.sess.format = (audio_in.get("format") or {}).get("type", self.sess.format)
            td = audio_in.get("turn_detection") or {}
            self.interrupt = bool(td.get("interrupt_response", True))
            self.vad.configure(self.sess.rate, td.get("threshold", 0.5), td.get("silence_duration_ms", 500))
            if self.fake.vad_threshold_level is not None:
                self.vad.level = self.fake.vad_threshold_level
            await self.send({"type": "session.updated", "session": session})
        elif kind == "input_audio_buffer.append":
            await self.append(base64.b64decode(event["audio"]))
        elif kind == "response.create":
            response = event.get("response") or {}
            instructions = str(response.get("instructions") or "")
            said = SAY.search(instructions)
            reply = Reply(said.group(1)) if said else self.next_reply()
            metadata = response.get("metadata") or {}
            self.start_response(reply, metadata.get("say"), metadata)
        elif kind == "response.cancel":
            self.sess.cancels += 1
            if not await self.cancel("client_cancelled"):
                await self.error("Cancellation failed: no active response found")
        elif kind == "conversation.item.truncate":
            self.sess.truncates.append({"item_id": event.get("item_id"), "content_index": event.get("content_index"),
                                        "audio_end_ms": event.get("audio_end_ms"), "at": time.monotonic()})
            total = self.item_ms.get(str(event.get("item_id")))
            if total is None or int(event.get("audio_end_ms", -1)) > total + 1:
                await self.error(f"audio_end_ms {event.get('audio_end_ms')} is beyond the item's audio ({total})")
            else:
                await self.send({"type": "conversation.item.truncated", "item_id": event["item_id"],
                                 "content_index": 0, "audio_end_ms": event["audio_end_ms"]})
        elif kind == "conversation.item.create":
            item = event.get("item") or {}
            if item.get("type") == "function_call_output":
                self.sess.tool_outputs.append(item)
            elif item.get("type") == "message" and item.get("role") == "user":
                self.sess.user_texts += [c.get("text", "") for c in item.get("content") or [] if c.get("type") == "input_text"]
            await self.send({"type": "conversation.item.added", "item": {**item, "id": self.fake._id("item")}})
        else:
            await self.error(f"unknown client event {kind!r}")

    async def error(self, message: str) -> None:
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "message": message}})

    def next_reply(self) -> Reply:
        reply = self.replies[min(self.turns, len(self.replies) - 1)] if self.replies else Reply("Okay.")
        self.turns += 1
        return reply

    def decode(self, raw: bytes) -> bytes:
        if self.sess.format == "audio/pcmu":
            return audioop.ulaw2lin(raw, 2)
        if self.sess.format == "audio/pcma":
            return audioop.alaw2lin(raw, 2)
        return raw

    def encode(self, pcm: bytes) -> bytes:
        if self.sess.format == "audio/pcmu":
            return audioop.lin2ulaw(pcm, 2)
        if self.sess.format == "audio/pcma":
            return audioop.lin2alaw(pcm, 2)
        return pcm

    async def append(self, raw: bytes) -> None:
        pcm = self.decode(raw)
        self.sess.audio += pcm
        self.sess.appends += 1
        self.sess.append_sizes.append(len(raw))
        for change in self.vad.feed(pcm):
            user_item = f"item_u{self.turns}"
            if change == "started":
                self.sess.speech_started_at.append(time.monotonic())
                await self.send({"type": "input_audio_buffer.speech_started", "item_id": user_item,
                                 "audio_start_ms": len(self.sess.audio) * 500 // self.sess.rate})
                if self.interrupt:
                    await self.cancel("turn_detected")
            else:
                # where the speech ended, as the service reports it: before the silence that ended the turn
                await self.send({"type": "input_audio_buffer.speech_stopped", "item_id": user_item,
                                 "audio_end_ms": len(self.sess.audio) * 500 // self.sess.rate
                                 - self.vad.silence_frames * 20})
                await self.send({"type": "input_audio_buffer.committed", "item_id": user_item})
                await self.send({"type": "conversation.item.added",
                                 "item": {"id": user_item, "type": "message", "role": "user", "content": []}})
                self.start_response(self.next_reply(), None)
                text = self.fake.transcripts[(self.turns - 1) % len(self.fake.transcripts)]
                await self.send({"type": "conversation.item.input_audio_transcription.delta",
                                 "item_id": user_item, "content_index": 0, "delta": text.split(" ")[0]})
                await self.send({"type": "conversation.item.input_audio_transcription.completed",
                                 "item_id": user_item, "content_index": 0, "transcript": text})

    async def cancel(self, reason: str) -> bool:
        task, current = self.streaming, self.current
        if task is None or task.done() or current is None:
            return False
        task.cancel()
        current["status"] = "cancelled"
        await self.send({"type": "response.done", "response": {
            "id": current["id"], "object": "realtime.response", "status": "cancelled",
            "status_details": {"type": "cancelled", "reason": reason}, "output": [], "usage": None}})
        return True

    def start_response(self, reply: Reply, tag: str | None, metadata: dict[str, Any] | None = None) -> None:
        if self.streaming is not None and not self.streaming.done():
            self.streaming.cancel()
        record = {"id": self.fake._id("resp"), "text": reply.text, "tag": tag, "status": "in_progress",
                  "first_delta_at": None, "tool": reply.tool, "metadata": metadata or {}}
        self.sess.responses.append(record)
        self.current = record
        self.streaming = asyncio.ensure_future(self.stream(record, reply, tag))

    async def stream(self, record: dict[str, Any], reply: Reply, tag: str | None) -> None:
        rid = record["id"]
        response = {"id": rid, "object": "realtime.response", "status": "in_progress", "output": [],
                    "metadata": record["metadata"] or None}
        await self.send({"type": "response.created", "response": response})
        if reply.tool is not None:
            name, args = reply.tool
            item = self.fake._id("item")
            call_id = self.fake._id("call")
            await self.send({"type": "response.output_item.added", "response_id": rid, "output_index": 0,
                             "item": {"id": item, "type": "function_call", "call_id": call_id, "name": name}})
            arguments = json.dumps(args)
            await self.send({"type": "response.function_call_arguments.delta", "response_id": rid, "item_id": item,
                             "output_index": 0, "call_id": call_id, "delta": arguments})
            await self.send({"type": "response.function_call_arguments.done", "response_id": rid, "item_id": item,
                             "output_index": 0, "call_id": call_id, "name": name, "arguments": arguments})
            await self.send({"type": "response.output_item.done", "response_id": rid, "output_index": 0,
                             "item": {"id": item, "type": "function_call", "call_id": call_id, "name": name,
                                      "arguments": arguments}})
            record["status"] = "completed"
            await self.send({"type": "response.done", "response": {**response, "status": "completed"}})
            return
        item = self.fake._id("item")
        ids = {"response_id": rid, "item_id": item, "output_index": 0, "content_index": 0}
        await self.send({"type": "response.output_item.added", "response_id": rid, "output_index": 0,
                         "item": {"id": item, "type": "message", "role": "assistant", "content": []}})
        await self.send({"type": "conversation.item.added",
                         "item": {"id": item, "type": "message", "role": "assistant", "content": []}})
        pcm = fake_speech(reply.text, self.sess.rate)
        self.item_ms[item] = len(pcm) / 2 / self.sess.rate * 1000
        step = self.sess.rate * self.fake.delta_ms // 1000 * 2
        words = reply.text.split(" ")
        if self.fake.first_delta_delay_s:
            await asyncio.sleep(self.fake.first_delta_delay_s)
        for n, offset in enumerate(range(0, len(pcm), step)):
            if n == 0:
                record["first_delta_at"] = time.monotonic()
            await self.send({"type": "response.output_audio.delta", **ids,
                             "delta": base64.b64encode(self.encode(pcm[offset:offset + step])).decode()})
            if n < len(words):
                await self.send({"type": "response.output_audio_transcript.delta", **ids,
                                 "delta": words[n] if n == 0 else " " + words[n]})
            if self.fake.delta_interval_s:
                await asyncio.sleep(self.fake.delta_interval_s)
            else:
                await asyncio.sleep(0)
        await self.send({"type": "response.output_audio.done", **ids})
        await self.send({"type": "response.output_audio_transcript.done", **ids, "transcript": reply.text})
        await self.send({"type": "response.output_item.done", "response_id": rid, "output_index": 0,
                         "item": {"id": item, "type": "message", "role": "assistant"}})
        record["status"] = "completed"
        await self.send({"type": "response.done", "response": {**response, "status": "completed"}})


