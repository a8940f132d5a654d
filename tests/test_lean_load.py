"""The lean load generator (bench/lean_load.py + bench/lean_media.c) speaks Twilio's Media Streams
protocol: against a small aiohttp server on 127.0.0.1 that checks every frame it gets (signed inbound
webhook, `connected`/`start` with the token, consecutive media frames carrying the caller's audio,
`stop`), echoes the media and sends marks, both engines (Python and C) must deliver every frame, count
every echoed byte, echo every mark and close cleanly."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from bench import lean_load
from tests.fakes.stream_load import caller_frames
from tests.fakes.twilio_server import twilio_sign

AUTH_TOKEN = "secret-token"
MARK_EVERY = 10


class FakeBridge:
    """What the generator talks to: Twilio's other end, recording what each stream sent."""

    def __init__(self) -> None:
        self.port = 0
        self.streams: list[dict[str, Any]] = []
        self.webhooks = 0
        self.bad_signatures = 0

    async def voice(self, request: web.Request) -> web.Response:
        params = {k: str(v) for k, v in (await request.post()).items()}
        url = f"http://127.0.0.1:{self.port}/voice"
        if request.headers.get("X-Twilio-Signature") != twilio_sign(AUTH_TOKEN, url, params):
            self.bad_signatures += 1
            return web.Response(status=403)
        self.webhooks += 1
        twiml = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="ws://127.0.0.1:{self.port}/ws">'
                 f'<Parameter name="token" value="tok-{params["CallSid"]}"/></Stream></Connect></Response>')
        return web.Response(text=twiml, content_type="text/xml")

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        record: dict[str, Any] = {"events": [], "media": [], "marks_sent": [], "marks_back": [], "stop": None}
        self.streams.append(record)
        sid = ""
        async for msg in ws:
            assert msg.type == WSMsgType.TEXT
            data = json.loads(msg.data)
            record["events"].append(data["event"])
            if data["event"] == "start":
                record["start"] = data
                sid = data["start"]["streamSid"]
            elif data["event"] == "media":
                record["media"].append(data)
                await ws.send_str(json.dumps({"event": "media", "streamSid": sid,
                                              "media": {"payload": data["media"]["payload"]}}))
                if len(record["media"]) % MARK_EVERY == 0:
                    name = f"m{len(record['media'])}"
                    record["marks_sent"].append(name)
                    await ws.send_str(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}}))
            elif data["event"] == "mark":
                record["marks_back"].append(data["mark"]["name"])
            elif data["event"] == "stop":
                record["stop"] = data
        return ws


@pytest.fixture
async def bridge() -> Any:
    fake = FakeBridge()
    app = web.Application()
    app.router.add_post("/voice", fake.voice)
    app.router.add_get("/ws", fake.ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake
    await runner.cleanup()


def engines() -> list[str]:
    return ["python"] + (["c"] if shutil.which("cc") or shutil.which("gcc") else [])


@pytest.mark.parametrize("engine", engines())
async def test_every_frame_echo_and_mark_round_trips(bridge: FakeBridge, engine: str, tmp_path: Path) -> None:
    frames = caller_frames(seconds=1.0)
    target = {"mode": "twilio-webhook", "voice_url": f"http://127.0.0.1:{bridge.port}/voice",
              "auth_token": AUTH_TOKEN, "account_sid": "AC" + "0" * 32}
    timing = {"seconds": 0.6, "ramp_per_s": 50.0, "warmup_s": 0.1, "tail_s": 0.1, "drain_s": 0.5}
    if engine == "c":
        binary = lean_load.build_engine(print)
        assert binary is not None
        run = await lean_load.run_engine(binary, target, 3, frames=frames, keep_audio_first=True, **timing)
    else:
        run = await lean_load.run_streams(target, 3, frames=frames, keep_audio_first=True, **timing)

    assert run.failed == [] and len(run.clients) == 3 and bridge.webhooks == 3 and bridge.bad_signatures == 0
    by_sid = {r["start"]["streamSid"]: r for r in bridge.streams}
    for client in run.clients:
        seen = by_sid[client.stream_sid]
        start = seen["start"]
        assert seen["events"][:2] == ["connected", "start"] and seen["events"][-1] == "stop"
        assert start["start"]["customParameters"] == {"token": f"tok-{start['start']['callSid']}"}
        assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        assert seen["stop"]["stop"]["callSid"] == start["start"]["callSid"]
        media = seen["media"]
        assert len(media) == len(client.sent_at) >= 30  # every frame sent arrived
        seqs = [int(m["sequenceNumber"]) for m in media]
        assert seqs[0] == 2 and all(b > a for a, b in zip(seqs, seqs[1:]))
        for k, m in enumerate(media):  # consecutive 20 ms frames of the caller's speech
            assert m["streamSid"] == client.stream_sid and m["media"]["track"] == "inbound"
            assert (m["media"]["chunk"], m["media"]["timestamp"]) == (str(k + 1), str(k * 20))
            assert base64.b64decode(m["media"]["payload"]) == frames[k % len(frames)]
        # every echoed byte counted, every mark echoed back, nothing misread
        assert client.frames_received == len(media) and client.recv_ends[-1] == 160 * len(media)
        assert all(b >= a for a, b in zip(client.recv_times, client.recv_times[1:]))
        assert seen["marks_back"] == seen["marks_sent"] and len(seen["marks_sent"]) >= 3
        assert client.bad_frames == 0
    first = next(c for c in run.clients if c.keep_audio)
    assert first.heard_ulaw() == b"".join(frames[k % len(frames)] for k in range(len(first.sent_at)))


def test_http_reply_parsing() -> None:
    """Content-Length and chunked bodies, a 101 without one, and 'not yet' for a partial reply."""
    buf = bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r\n")
    reply, used = lean_load.parse_reply(buf) or (None, 0)
    assert reply is not None and (reply.status, reply.body) == (200, b"hello")
    del buf[:used]
    reply, used = lean_load.parse_reply(buf) or (None, 0)
    assert reply is not None and reply.status == 101 and reply.headers["upgrade"] == "websocket" and used == len(buf)
    chunked = bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert lean_load.parse_reply(chunked[:-3]) is None
    reply, _ = lean_load.parse_reply(chunked) or (None, 0)
    assert reply is not None and reply.body == b"abcde"
    assert lean_load.parse_reply(bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhell")) is None
    with pytest.raises(lean_load.HttpError):
        lean_load.parse_reply(bytearray(b"garbage\r\n\r\n"))
