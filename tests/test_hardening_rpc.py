"""Bad RPC input over real HTTP and WebSocket: every refusal is a JSON-RPC error or a 4xx, in one log
line at most, never a 500, a dropped socket or a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest

from tests.harness import run_bridge

SLOW_MOCK = {"ringDelayMs": 60_000, "answerDelayMs": 60_000}
CONFIG = {"provider": "mock", "fromNumber": "+15550001234", "maxConcurrentCalls": 3, "responseModel": "none",
          "mock": SLOW_MOCK, "webhookSecurity": {"bodyTimeoutMs": 300}}
DEEP = "[" * 3000 + "]" * 3000


def request(method: str, params: object, request_id: int = 1) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


async def post_raw(url: str, data: bytes | str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.post(url, data=data) as resp:
        return resp.status, await resp.json(content_type=None)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("params, message", [
    ({"limit": "abc"}, "parameter `limit` must be an integer from 1 to 1000"),
    ({"limit": []}, "parameter `limit` must be an integer from 1 to 1000"),
    ({"limit": 1e300}, "parameter `limit` must be an integer from 1 to 1000"),
    ({"limit": 0}, "parameter `limit` must be an integer from 1 to 1000"),
    ({"limit": True}, "parameter `limit` must be an integer from 1 to 1000"),
    ({"active": "yes"}, "parameter `active` must be true or false"),
])
async def test_list_parameters_are_validated(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             params: dict[str, object], message: str) -> None:
    async with run_bridge(CONFIG, tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/rpc"
        status, body = await post_raw(url, json.dumps(request("voicecall.list", params)))
        assert status == 200 and body["error"] == {"code": -32602, "message": message}
    no_tracebacks(caplog)


async def test_deep_nesting_and_non_json_numbers_are_parse_errors(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    async with run_bridge(CONFIG, tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/rpc"
        status, body = await post_raw(url, DEEP)
        assert status == 400 and body["error"]["code"] == -32700 and "deeper" in body["error"]["message"]
        status, body = await post_raw(url, '{"jsonrpc":"2.0","id":1,"method":"voicecall.list","params":{"limit":Infinity}}')
        assert status == 400 and body["error"]["code"] == -32700
        status, body = await post_raw(url, json.dumps([request("voicecall.list", {}, i) for i in range(51)]))
        assert status == 200 and body["error"]["code"] == -32600
        status, body = await post_raw(url, json.dumps({"jsonrpc": "2.0", "id": {"a": 1}, "method": "voicecall.list"}))
        assert status == 200 and body["error"]["code"] == -32600
    no_tracebacks(caplog)


async def test_websocket_survives_deep_nesting_and_bad_frames(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with run_bridge(CONFIG, tmp_path) as runtime, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://127.0.0.1:{runtime.port}/rpc")
        await ws.send_str(DEEP)
        reply = json.loads((await ws.receive(timeout=5)).data)
        assert reply["error"]["code"] == -32700
        await ws.send_str(json.dumps(request("voicecall.list", {"limit": "abc"}, 7)))
        reply = json.loads((await ws.receive(timeout=5)).data)
        assert reply["id"] == 7 and reply["error"]["code"] == -32602
        await ws.send_str(json.dumps(request("voicecall.list", {}, 8)))
        reply = json.loads((await ws.receive(timeout=5)).data)
        assert reply == {"jsonrpc": "2.0", "id": 8, "result": {"calls": []}}
        await ws.close()
    no_tracebacks(caplog)


async def test_call_arguments_are_validated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with run_bridge(CONFIG, tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/rpc"
        _, body = await post_raw(url, json.dumps(request("voicecall.initiate", {"message": "hi", "to": "+15550009999", "mode": "loud"})))
        assert body["error"] == {"code": -32000, "message": "`mode` must be notify or conversation (got 'loud')"}
        _, body = await post_raw(url, json.dumps(request("voicecall.initiate", {"message": "hi", "to": "+15550009999"})))
        call_id = body["result"]["callId"]
        # ringing, never answered: keys cannot be sent yet
        _, body = await post_raw(url, json.dumps(request("voicecall.dtmf", {"callId": call_id, "digits": "1"})))
        assert body["error"]["code"] == -32000 and "not answered yet" in body["error"]["message"]
        _, body = await post_raw(url, json.dumps(request("voicecall.dtmf", {"callId": call_id, "digits": "1" * 33})))
        assert body["error"] == {"code": -32602, "message": "`digits` may be at most 32 keys"}
    no_tracebacks(caplog)


async def test_body_length_and_time_limits(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path) as runtime:
        reader, writer = await asyncio.open_connection("127.0.0.1", runtime.port)
        writer.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
        head = await asyncio.wait_for(reader.read(100), 5)
        assert head.startswith(b"HTTP/1.1 413"), head
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", runtime.port)
        writer.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        head = await asyncio.wait_for(reader.read(100), 5)
        assert head.startswith(b"HTTP/1.1 408"), head
        writer.close()


async def raw(port: int, data: bytes, *, hang_up: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        if hang_up:
            return b""
        return await asyncio.wait_for(reader.read(100), 5)
    finally:
        writer.close()


async def test_malformed_http_is_400_in_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with run_bridge(CONFIG, tmp_path) as runtime:
        port = runtime.port
        reply = await raw(port, b"POST /rpc HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}")
        assert reply.startswith(b"HTTP/1.0 400")
        reply = await raw(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 400")
        for path in (b"/rpc", b"/voice/webhook"):
            await raw(port, b"POST " + path + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{\"a\"", hang_up=True)
        status, body = await post_raw(f"http://127.0.0.1:{port}/rpc", json.dumps(request("voicecall.list", {})))
        assert status == 200 and body["result"] == {"calls": []}
    no_tracebacks(caplog)
    refused = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(refused) == 2 and all(r.levelno == logging.WARNING and "aaaa" not in r.getMessage() for r in refused)
