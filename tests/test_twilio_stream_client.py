"""The fake Twilio's Media Streams client (also the benchmark's load generator) against a stub
bridge: frames on the wire, real-time cadence, mark echo after play-out, clear, many streams."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from tests.fakes.http_app import serve_local
from tests.fakes.twilio_server import SILENCE, TwilioMediaStreamClient, pace_streams
from tests.harness import wait_for

Script = Callable[[web.WebSocketResponse, str], Any]


class StubBridge:
    """Records what clients send; `script(ws, stream_sid)` plays the bridge's side after `start`."""

    def __init__(self, script: Script | None = None, echo: bool = False) -> None:
        self.script = script
        self.scripts: set[asyncio.Future[None]] = set()  # running scripts, kept referenced
        self.echo = echo
        self.frames: list[list[dict[str, Any]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/voice/stream"

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        seen: list[dict[str, Any]] = []
        self.frames.append(seen)
        async for msg in ws:
            assert msg.type == WSMsgType.TEXT
            frame = json.loads(msg.data)
            seen.append(frame)
            if frame["event"] == "start" and self.script is not None:
                self.scripts.add(task := asyncio.ensure_future(self.script(ws, frame["start"]["streamSid"])))
                task.add_done_callback(self.scripts.discard)
            elif frame["event"] == "media" and self.echo:
                await ws.send_str(json.dumps({"event": "media", "streamSid": frame["streamSid"],
                                              "media": {"payload": frame["media"]["payload"]}}))
        return ws

    async def __aenter__(self) -> StubBridge:
        app = web.Application()
        app.router.add_get("/voice/stream", self.handler)
        self._runner, self.port = await serve_local(app)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def media(stream_sid: str, payload: bytes) -> str:
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": base64.b64encode(payload).decode()}})


@pytest.fixture
async def loop_time() -> AsyncIterator[Callable[[], float]]:
    yield asyncio.get_running_loop().time


async def test_handshake_frames_and_real_time_cadence() -> None:
    async with StubBridge() as bridge:
        client = TwilioMediaStreamClient(bridge.url, parameters={"token": "t0k", "callId": "c1"})
        await client.connect()
        client.say_ulaw(b"\x00" * 800)  # 5 frames of speech, then silence
        await asyncio.sleep(0.5)
        await client.stop()
        frames = bridge.frames[0]
        assert frames[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        start = frames[1]
        assert start["event"] == "start" and start["sequenceNumber"] == "1"
        assert start["start"]["customParameters"] == {"token": "t0k", "callId": "c1"}
        assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        assert start["start"]["callSid"].startswith("CA") and start["streamSid"].startswith("MZ")
        media_frames = [f for f in frames if f["event"] == "media"]
        assert 20 <= len(media_frames) <= 27  # 0.5 s at 20 ms
        payloads = [base64.b64decode(f["media"]["payload"]) for f in media_frames]
        assert payloads[:5] == [b"\x00" * 160] * 5 and payloads[5] == SILENCE
        assert [f["media"]["chunk"] for f in media_frames[:3]] == ["1", "2", "3"]
        assert [f["media"]["timestamp"] for f in media_frames[:3]] == ["0", "20", "40"]
        sequence = [int(f["sequenceNumber"]) for f in frames[1:]]
        assert sequence == list(range(1, len(sequence) + 1))
        assert frames[-1]["event"] == "stop" and frames[-1]["stop"]["callSid"] == start["start"]["callSid"]
        gaps = [b - a for a, b in zip(client.sent_at, client.sent_at[1:])]
        assert sum(gaps) / len(gaps) == pytest.approx(0.020, abs=0.003)


async def test_mark_comes_back_after_the_audio_before_it_has_played(loop_time: Callable[[], float]) -> None:
    sent_at: list[float] = []

    async def script(ws: web.WebSocketResponse, sid: str) -> None:
        for _ in range(25):  # 0.5 s of audio, sent all at once
            await ws.send_str(media(sid, b"\x10" * 160))
        await ws.send_str(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": "utterance-1"}}))
        sent_at.append(loop_time())

    async with StubBridge(script) as bridge:
        client = TwilioMediaStreamClient(bridge.url)
        await client.connect()
        await wait_for(lambda: any(f["event"] == "mark" for f in bridge.frames[0]), timeout=5)
        echoed = [f for f in bridge.frames[0] if f["event"] == "mark"]
        assert [f["mark"]["name"] for f in echoed] == ["utterance-1"]
        assert echoed[0]["streamSid"] == client.stream_sid
        assert len(client.heard_ulaw()) == 25 * 160
        assert client.frames_received == 25 and client.received[0][1] == b"\x10" * 160
        await client.stop()


async def test_clear_drops_unplayed_audio_and_returns_pending_marks(loop_time: Callable[[], float]) -> None:
    async def script(ws: web.WebSocketResponse, sid: str) -> None:
        for _ in range(100):  # 2 s of audio
            await ws.send_str(media(sid, b"\x10" * 160))
        await ws.send_str(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": "long"}}))
        await asyncio.sleep(0.3)
        await ws.send_str(json.dumps({"event": "clear", "streamSid": sid}))

    async with StubBridge(script) as bridge:
        client = TwilioMediaStreamClient(bridge.url)
        await client.connect()
        await wait_for(lambda: client.clears == 1, timeout=5)
        assert client.marks_echoed == ["long"], "clear returns the pending mark at once"
        heard_s = len(client.heard_ulaw()) / 8000
        assert 0.2 <= heard_s <= 0.45, "only what played before the clear was heard"
        assert not client.bot_talking
        await client.stop()


async def test_many_streams_from_one_metronome() -> None:
    async with StubBridge(echo=True) as bridge:
        clients = [TwilioMediaStreamClient(bridge.url, self_paced=False, keep_audio=False) for _ in range(40)]
        try:
            await asyncio.gather(*(c.connect() for c in clients))
            ticks = await pace_streams(clients, 1.0)
            await wait_for(lambda: all(c.frames_received == 50 for c in clients), timeout=5)
            assert ticks == 50
            for client in clients:
                assert client.frames_sent == 50
                assert client.frames_received == 50, "every echoed frame came back"
                assert client.received[0][1] == b""  # keep_audio=False: timestamps only
                latencies = sorted(r - s for (r, _), s in zip(client.received, client.sent_at))
                # echoes come back as they are sent, not queued: half within 0.2 s, none late by a second
                # (a single 0.2 s stall of this process is possible beside other test processes on 2 cores)
                assert latencies[0] >= 0 and latencies[len(latencies) // 2] < 0.2 and latencies[-1] < 1.0, latencies
            assert all(len([f for f in frames if f["event"] == "media"]) == 50 for frames in bridge.frames)
        finally:  # open sockets would hold the stub's shutdown (and hide a failure behind the test timeout)
            await asyncio.gather(*(c.stop() for c in clients))
