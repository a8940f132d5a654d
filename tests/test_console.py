"""Console over HTTP and the RPC WebSocket (no browser): login, cookie, same-origin, levels, recordings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from bridge.config import build_settings
from bridge.runtime import Runtime
from media.clock import FakeClock
from tests.harness import free_port, rpc_client, run_bridge, wait_for
from tests.test_mock_e2e import BASE, FAST_MOCK

TOKEN = "console-test-token-0123456789"
CONFIG = {**BASE, "rpc": {"token": TOKEN}, "recording": {"enabled": True},
          "mock": {**FAST_MOCK, "calleeScript": ["Yes, Thursday works.", "Goodbye!"]}}


def origin(port: int) -> dict[str, str]:
    return {"Origin": f"http://127.0.0.1:{port}"}


async def logged_in(port: int) -> aiohttp.ClientSession:
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with session.post(f"http://127.0.0.1:{port}/console/login", json={"token": TOKEN},
                            headers=origin(port)) as resp:
        assert resp.status == 200
    return session


async def test_login_refuses_wrong_missing_and_cross_origin_tokens(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path) as runtime, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{runtime.port}"
        async with http.get(f"{base}/console") as resp:
            assert resp.status == 200 and "<title>voicecall console</title>" in await resp.text()
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        async with http.get(f"{base}/console/static/app.js") as resp:
            assert resp.status == 200 and resp.content_type == "application/javascript"
        async with http.get(f"{base}/console/static/../default.yaml") as resp:
            assert resp.status == 404
        async with http.get(f"{base}/console/session") as resp:
            assert (await resp.json())["authenticated"] is False
        for body, headers, status in (({"token": "wrong"}, origin(runtime.port), 401),
                                      ({}, origin(runtime.port), 401),
                                      ({"token": TOKEN}, {}, 403),
                                      ({"token": TOKEN}, {"Origin": "http://evil.example"}, 403)):
            async with http.post(f"{base}/console/login", json=body, headers=headers) as resp:
                assert resp.status == status, (body, headers)
                assert "Set-Cookie" not in resp.headers
        async with http.post(f"{base}/console/login", data=b"{not json", headers=origin(runtime.port)) as resp:
            assert resp.status == 400
        async with http.post(f"{base}/console/login", json={"token": TOKEN}, headers=origin(runtime.port)) as resp:
            assert resp.status == 200
            cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert TOKEN not in cookie


async def test_login_is_throttled_after_ten_wrong_tokens_a_minute(tmp_path: Path) -> None:
    clock = FakeClock()
    raw = {**CONFIG, "store": str(tmp_path), "serve": {"port": free_port(), "bind": "127.0.0.1"}}
    runtime = Runtime(build_settings(raw, {}), clock=clock)
    await runtime.start()
    try:
        async with aiohttp.ClientSession() as http:
            async def login(token: str) -> int:
                async with http.post(f"http://127.0.0.1:{runtime.port}/console/login", json={"token": token},
                                     headers=origin(runtime.port)) as resp:
                    return resp.status

            assert [await login("guess") for _ in range(10)] == [401] * 10
            assert await login(TOKEN) == 429  # even the right token waits out the window
            await clock.advance(30)
            assert await login(TOKEN) == 429
            await clock.advance(31)
            assert await login(TOKEN) == 200
    finally:
        await runtime.stop()


async def test_websocket_needs_the_cookie_and_our_origin(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/rpc"
        async with aiohttp.ClientSession() as anonymous:
            try:
                await anonymous.ws_connect(url, headers=origin(runtime.port))
                raise AssertionError("a WebSocket without a session was accepted")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 401
        session = await logged_in(runtime.port)
        try:
            try:
                await session.ws_connect(url, headers={"Origin": "http://evil.example"})
                raise AssertionError("a cross-origin WebSocket with the cookie was accepted")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 401
            async with session.ws_connect(url, headers=origin(runtime.port)) as ws:
                await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "voicecall.list", "params": {}})
                assert (await ws.receive_json())["result"] == {"calls": []}
            async with session.post(f"http://127.0.0.1:{runtime.port}/console/logout",
                                    headers=origin(runtime.port)) as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{runtime.port}/console/session") as resp:
                assert (await resp.json())["authenticated"] is False
        finally:
            await session.close()


async def test_levels_of_both_sides_stream_while_watched_then_the_recording_plays(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path) as runtime:
        base = f"http://127.0.0.1:{runtime.port}"
        session = await logged_in(runtime.port)
        try:
            async with session.ws_connect(f"{base}/rpc", headers=origin(runtime.port)) as ws:
                await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "voicecall.initiate",
                                    "params": {"message": "Hello, does Thursday work?", "mode": "conversation"}})
                call_id = (await ws.receive_json())["result"]["callId"]
                await ws.send_json({"jsonrpc": "2.0", "id": 2, "method": "voicecall.levels",
                                    "params": {"callId": "nope"}})
                assert (await ws.receive_json())["error"]["code"] == -32602
                await ws.send_json({"jsonrpc": "2.0", "id": 3, "method": "voicecall.levels",
                                    "params": {"callId": call_id, "on": True}})
                peak = {"caller": 0.0, "bot": 0.0}
                samples = 0
                async with asyncio.timeout(30):
                    while min(peak.values()) < 0.01:
                        msg: dict[str, Any] = json.loads((await ws.receive()).data)
                        params = msg.get("params") or {}
                        if params.get("type") == "call.levels":
                            samples += 1
                            for side in peak:
                                peak[side] = max(peak[side], params[side])
                assert samples >= 3
                bridge = runtime.manager.voice(call_id).bridge
                assert len(bridge._level_taps) == 1
                await ws.send_json({"jsonrpc": "2.0", "id": 4, "method": "voicecall.levels",
                                    "params": {"callId": call_id, "on": False}})
                await wait_for(lambda: not bridge._level_taps)
                await rpc_client(runtime, TOKEN).call("voicecall.end", {"callId": call_id})
            await runtime.manager.drain()
            recording = tmp_path / "recordings" / f"{call_id}.wav"
            await wait_for(lambda: recording.exists() and recording.stat().st_size > 44)
            async with session.get(f"{base}/console/recordings/{call_id}") as resp:
                assert resp.status == 200 and resp.content_type == "audio/wav"
                assert (await resp.read())[:4] == b"RIFF"
            async with aiohttp.ClientSession() as anonymous:
                async with anonymous.get(f"{base}/console/recordings/{call_id}") as resp:
                    assert resp.status == 401
            for bad in ("..%2Fcalls.jsonl", "nope", "calls.jsonl"):
                async with session.get(f"{base}/console/recordings/{bad}") as resp:
                    assert resp.status == 404, bad
        finally:
            await session.close()
