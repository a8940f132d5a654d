"""`voicecall demo`: a whole call on the offline mock carrier, driven through the real server and RPC.

It starts the server in this process (an ephemeral port if the configured one is taken), places a
conversation call over RPC, prints the live events from the RPC WebSocket, and prints the call's
transcript from `voicecall.status` once the call has ended.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from bridge.calls import turns_of
from bridge.client import RpcClient
from bridge.config import Settings
from bridge.runtime import Runtime, StartupError


async def run_demo(settings: Settings, *, to: str | None, message: str, as_json: bool = False,
                   timeout_s: float = 90) -> int:
    if settings.provider != "mock":
        raise StartupError("the demo runs on the mock carrier only (provider: mock)")
    runtime = Runtime(settings)
    try:
        await runtime.start()
    except StartupError:
        await runtime.stop()
        runtime = Runtime(settings)
        await runtime.start(port=0)
    started = time.monotonic()

    def say(line: str) -> None:
        if not as_json:
            print(f"[{time.monotonic() - started:6.2f}s] {line}", flush=True)

    try:
        client = RpcClient(runtime.rpc_url)
        async with aiohttp.ClientSession() as session, session.ws_connect(runtime.rpc_url) as ws:
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "voicecall.subscribe"}))
            await ws.receive()
            say(f"server up at {runtime.rpc_url.removesuffix('/rpc')} (provider mock, offline voice)")
            result = await client.call("voicecall.initiate",
                                       {"to": to or settings.toNumber, "message": message, "mode": "conversation"})
            call_id = result["callId"]
            say(f"call {call_id} placed to {to or settings.toNumber}")
            await _follow(ws, call_id, say, timeout_s)
            status = await client.call("voicecall.status", {"callId": call_id})
    finally:
        await runtime.stop()
    call = status["call"]
    wall = time.monotonic() - started
    if as_json:
        print(json.dumps({"call": call, "wallSeconds": round(wall, 2)}, indent=2))
        return 0 if call["state"] in ("hangup-bot", "hangup-user", "completed") else 1
    print("\nTranscript")
    for entry in call["transcript"]:
        print(f"  {'bot   ' if entry['speaker'] == 'bot' else 'caller'}: {entry['text']}")
    turns = turns_of(call)
    if turns:
        print("\nVoice-to-voice turn latency (caller done speaking -> first audio of the answer)")
        for turn in turns:
            parts = turn.parts()
            total = parts.pop("total", 0.0)
            print(f"  turn {turn.n}: {total:.0f} ms ({', '.join(f'{k} {v:.0f}' for k, v in parts.items())})")
    print(f"\nEnded: {call['state']} after {wall:.1f}s wall time. Call log: {settings.store_dir / 'calls.jsonl'}")
    print("Latency over all calls: voicecall latency; live view: voicecall serve, then open /console")
    return 0 if call["state"] in ("hangup-bot", "hangup-user", "completed") else 1


async def _follow(ws: aiohttp.ClientWebSocketResponse, call_id: str, say: Any, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        async for msg in ws:
            event = json.loads(msg.data).get("params") or {}
            if event.get("callId") != call_id:
                continue
            kind = event.get("type")
            if kind == "call.state":
                say(f"state  {event['state']}")
            elif kind == "call.speaking":
                say(f"bot    {event['text']}")
            elif kind == "call.speech":
                say(f"caller {event['transcript']}")
            elif kind == "call.dtmf":
                say(f"dtmf   {event['digits']}")
            elif kind == "call.ended":
                say(f"ended  {event['reason']}")
                return
