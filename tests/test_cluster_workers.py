"""`serve.workers: 2`: two real `voicecall serve` processes on one port (SO_REUSEPORT) sharing a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import yaml

from bridge.client import RpcClient
from tests.harness import free_port
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent
MOCK = {"ringDelayMs": 20, "answerDelayMs": 40, "replyDelayMs": 50, "calleeHangupAfterMs": 0, "calleeScript": []}


async def _health(port: int) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as response:
        body = await response.json()
        return body if isinstance(body, dict) and body.get("ok") else {}


async def _node_of(port: int) -> str:
    return str((await _health(port)).get("node", ""))


async def _pids(port: int, want: dict[str, int], done: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """node id -> pid of each worker seen, asking (new connections, spread by the kernel) until `done`."""
    async with asyncio.timeout(30):
        while not done(want):
            try:
                body = await _health(port)
            except aiohttp.ClientError:
                body = {}
            if body:
                want[str(body["node"])] = int(str(body["pid"]))
            await asyncio.sleep(0.02)
    return want


async def test_two_workers_share_the_port_and_serve_calls(redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "workers.yaml"
    config.write_text(yaml.safe_dump({
        "provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "maxConcurrentCalls": 4,
        "store": str(tmp_path / "store"), "serve": {"port": port, "workers": 2},
        "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"}, "responseModel": "offline",
        "mock": MOCK, "cluster": {"redisUrl": redis_server.url, "nodeId": "box", "leaseSeconds": 30}}))
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "serve", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        seen: set[str] = set()

        async def both_answer() -> bool:
            try:
                seen.add(await _node_of(port))  # a new connection each time: the kernel spreads them
            except aiohttp.ClientError:
                pass
            return {"box-w0", "box-w1"} <= seen

        async with asyncio.timeout(30):
            while not await both_answer():
                await asyncio.sleep(0.05)
        client = RpcClient(f"http://127.0.0.1:{port}/rpc")
        calls = [(await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
                 for _ in range(3)]
        for call_id in calls:  # whichever worker answers, the command reaches the call's worker
            async def answered(c: str = call_id) -> bool:
                status = await client.call("voicecall.status", {"callId": c})
                return bool(status["found"] and status["call"].get("answeredAt"))

            async with asyncio.timeout(20):
                while not await answered():
                    await asyncio.sleep(0.05)
            await client.call("voicecall.end", {"callId": call_id})
            status = await client.call("voicecall.status", {"callId": call_id})
            assert status["call"]["state"] == "hangup-bot"

        # kill -9 one worker: the supervisor starts a new process under the same node id, and it serves
        pids = await _pids(port, {}, lambda seen: {"box-w0", "box-w1"} <= seen.keys())
        os.kill(pids["box-w1"], signal.SIGKILL)
        await _pids(port, {}, lambda seen: seen.get("box-w1", pids["box-w1"]) != pids["box-w1"])
        placed = [(await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
                  for _ in range(2)]
        for call_id in placed:
            await client.call("voicecall.end", {"callId": call_id})
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "2 workers on port" in out
    assert "worker 1 exited with code -9; started again" in out

