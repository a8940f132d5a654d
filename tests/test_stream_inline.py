"""Media frames handled in aiohttp's read callback (bridge/ws_inline.py), over real WebSockets on the
real Twilio codec: every media frame after the start takes the inline path, in order, and a stop or
a bad frame hands the socket back to the handler task, which closes it as before and reads nothing
after it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import aiohttp

from bridge.server import STREAM_HANDLER_KEY
from bridge.ws_inline import InlineWebSocketResponse
from media import g711
from media.formats import AudioEncoding
from tests.harness import run_bridge, wait_for
from tests.test_hardening_streams import TWILIO, start_frame
from tests.test_stream_limits import closed_with, inbound_call, stream_url


def media(k: int) -> str:
    payload = base64.b64encode(bytes([k % 256]) * 160).decode()
    return json.dumps({"event": "media", "sequenceNumber": str(k + 2),
                       "media": {"track": "inbound", "chunk": str(k + 1), "timestamp": str(20 * k), "payload": payload}})


def server_socket(runtime) -> InlineWebSocketResponse:  # type: ignore[no-untyped-def]
    (ws,) = runtime.app[STREAM_HANDLER_KEY].sockets
    assert isinstance(ws, InlineWebSocketResponse)
    return ws


async def test_media_frames_are_handled_in_the_read_callback_in_order(tmp_path: Path) -> None:
    async with run_bridge(TWILIO, tmp_path) as runtime, aiohttp.ClientSession() as s:
        call, token = inbound_call(runtime, "CA1")
        ws = await s.ws_connect(stream_url(runtime))
        await ws.send_str(start_frame("CA1", token))
        await wait_for(lambda: runtime.manager.voice(call.callId))
        bridge = runtime.manager.voice(call.callId).bridge
        heard: list[bytes] = []
        bridge.add_tap(lambda pcm, rate: heard.append(pcm[:2]))
        for k in range(50):
            await ws.send_str(media(k))
        await wait_for(lambda: bridge.stats.frames_in == 50)
        assert server_socket(runtime).inline_messages == 50
        # in order: frame k carried u-law byte k
        assert heard == [g711.decode(bytes([k]), AudioEncoding.PCMU) for k in range(50)]
        await ws.send_str(json.dumps({"event": "dtmf", "dtmf": {"digit": "5"}}))
        await wait_for(lambda: bridge.stats.dtmf_outofband == 1)
        assert server_socket(runtime).inline_messages == 51
        # a stop and frames behind it in the same write: the task closes normally, nothing after it is read
        await ws.send_str(json.dumps({"event": "stop"}))
        for k in range(50, 60):
            await ws.send_str(media(k))
        code, _ = await closed_with(ws)
        assert code == 1000
        assert bridge.stats.frames_in == 50


async def test_bad_frame_after_inline_media_closes_1008_with_the_codec_verdict(tmp_path: Path) -> None:
    async with run_bridge(TWILIO, tmp_path) as runtime, aiohttp.ClientSession() as s:
        call, token = inbound_call(runtime, "CA1")
        ws = await s.ws_connect(stream_url(runtime))
        await ws.send_str(start_frame("CA1", token))
        await wait_for(lambda: runtime.manager.voice(call.callId))
        bridge = runtime.manager.voice(call.callId).bridge
        server_ws = server_socket(runtime)
        for k in range(5):
            await ws.send_str(media(k))
        await ws.send_str('{"event":"media","media":{"payload":5}}')
        await ws.send_str(media(5))
        code, reason = await closed_with(ws)
        assert code == 1008 and reason
        assert bridge.stats.frames_in == 5
        assert server_ws.inline_messages == 5
