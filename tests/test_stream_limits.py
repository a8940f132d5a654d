"""Media-stream connection limits and bad input, over real WebSockets, with exact close codes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from bridge.calls import CallEvent, Direction, EventType
from bridge.server import STREAM_GATE_KEY
from bridge.streams import WebSocketTransport
from media.formats import ULAW_8K
from tests.fakes.carrier import JsonStreamCodec, SignedJsonCarrier
from tests.harness import run_bridge, wait_for

LIMITS = {"maxConnections": 3, "maxPendingConnections": 2, "maxPendingConnectionsPerIp": 2, "preStartTimeoutMs": 400}
CONFIG = {"provider": "mock", "inboundPolicy": "open", "maxConcurrentCalls": 5,
          "streaming": {"enabled": True, "provider": "none", **LIMITS}}


def stream_url(runtime) -> str:  # type: ignore[no-untyped-def]
    return f"http://127.0.0.1:{runtime.port}/voice/stream"


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    return ws.close_code, str(msg.extra or "")


def inbound_call(runtime, provider_id: str):  # type: ignore[no-untyped-def]
    call = runtime.manager.process_event(CallEvent(EventType.INITIATED, provider_call_id=provider_id,
                                                   direction=Direction.INBOUND, from_number="+15550001111"))
    return call, runtime.manager.stream_token(call.callId)


async def test_pending_limit_per_ip_closes_1013(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime, aiohttp.ClientSession() as s:
        first = await s.ws_connect(stream_url(runtime))
        second = await s.ws_connect(stream_url(runtime))
        third = await s.ws_connect(stream_url(runtime))
        code, reason = await closed_with(third)
        assert code == 1013 and "Too many pending connections" in reason
        for ws in (first, second):
            await ws.close()


async def test_max_connections_refuses_the_upgrade_with_503(tmp_path: Path) -> None:
    config = {**CONFIG, "streaming": {**CONFIG["streaming"], "maxConnections": 2, "maxPendingConnections": 5,
                                      "maxPendingConnectionsPerIp": 5}}
    async with run_bridge(config, tmp_path, carrier=SignedJsonCarrier()) as runtime, aiohttp.ClientSession() as s:
        open_ = [await s.ws_connect(stream_url(runtime)) for _ in range(2)]
        await wait_for(lambda: runtime.app[STREAM_GATE_KEY].open == 2)
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(stream_url(runtime))
        assert info.value.status == 503
        for ws in open_:
            await ws.close()


async def test_no_start_frame_closes_1008_after_timeout(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime, aiohttp.ClientSession() as s:
        ws = await s.ws_connect(stream_url(runtime))
        await ws.send_str(json.dumps({"event": "connected"}))
        started = asyncio.get_running_loop().time()
        code, reason = await closed_with(ws)
        assert code == 1008 and reason == "Start timeout"
        assert 0.3 < asyncio.get_running_loop().time() - started < 2.0


@pytest.mark.parametrize(("token", "call_sid"), [("wrong-token", "P1"), (None, "P1"), ("x", "nobody")])
async def test_bad_token_or_unknown_call_closes_1008(tmp_path: Path, token: str | None, call_sid: str) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime, aiohttp.ClientSession() as s:
        inbound_call(runtime, "P1")
        ws = await s.ws_connect(stream_url(runtime))
        await ws.send_str(json.dumps({"event": "start", "callSid": call_sid, "token": token}))
        assert await closed_with(ws) == (1008, "Unknown call")


async def test_bad_frame_closes_only_that_stream(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime, aiohttp.ClientSession() as s:
        call, token = inbound_call(runtime, "P1")
        ws = await s.ws_connect(stream_url(runtime))
        await ws.send_str(json.dumps({"event": "start", "callSid": "P1", "token": token}))
        await ws.send_str(json.dumps({"event": "media", "payload": "ff" * 160}))
        await ws.send_str("{not json")
        code, reason = await closed_with(ws)
        assert code == 1008 and reason.startswith("bad frame")
        binary = await s.ws_connect(stream_url(runtime))
        await binary.send_bytes(b"\x00\x01")
        assert (await closed_with(binary))[0] == 1003
        # the server keeps serving, and the gate counted everything back down
        async with s.get(f"http://127.0.0.1:{runtime.port}/healthz") as resp:
            assert resp.status == 200
        gate = runtime.app[STREAM_GATE_KEY]
        await wait_for(lambda: gate.open == 0 and gate.pending == 0)


async def test_dropped_stream_ends_the_call_after_the_grace(tmp_path: Path) -> None:
    config = {**CONFIG, "streaming": {**CONFIG["streaming"], "disconnectGraceMs": 300}}
    async with run_bridge(config, tmp_path, carrier=SignedJsonCarrier()) as runtime, aiohttp.ClientSession() as s:
        call, token = inbound_call(runtime, "P1")
        ws = await s.ws_connect(stream_url(runtime))
        await ws.send_str(json.dumps({"event": "start", "callSid": "P1", "token": token}))
        await wait_for(lambda: runtime.manager.voice(call.callId) is not None)
        closed_at = runtime.manager.clock.time()
        await ws.close()
        await wait_for(lambda: call.terminal, timeout=3)
        assert call.metadata.get("streamLost") is True
        assert call.endedAt is not None and call.endedAt - closed_at >= 0.3  # the grace, when a new stream could take over


async def test_send_buffer_cap_closes_a_stream_whose_peer_stopped_reading() -> None:
    closed: list[tuple[int, bytes]] = []

    class StuckSocket:
        closed = False
        _writer = SimpleNamespace(transport=SimpleNamespace(get_write_buffer_size=lambda: 2_000_000))

        async def send_str(self, text: str) -> None:
            raise AssertionError("nothing may be sent past the cap")

        async def close(self, *, code: int, message: bytes) -> None:
            closed.append((code, message))

    transport = WebSocketTransport(StuckSocket(), JsonStreamCodec(), ULAW_8K, max_buffer=1024 * 1024)  # type: ignore[arg-type]
    await transport.send_media(b"\xff" * 160)
    await transport.send_media(b"\xff" * 160)
    assert closed == [(1013, b"Send buffer full")]
