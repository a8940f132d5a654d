"""CPU per message of the bridge's realtime-model connection (µs of the bridge process per message).

    python bench/realtime_cost.py [--sessions 20] [--messages 250] [--repeat 3] [--cpu 0]

`--sessions` RealtimeConnections (OpenAI Realtime protocol, G.711 passthrough) in this process,
pinned to `--cpu`, against a small WebSocket server in its own process on the next CPU that speaks just
enough of the protocol (session.update -> session.updated):
- delta: the server sends each session `--messages` `response.output_audio.delta` messages of
  100 ms u-law (the size the realtime fake sends), one every 20 ms; the bridge side decodes each to
  PCM as RealtimeVoice does. Figure: this process's CPU time / deltas received.
- append: every 40 ms each session gets 40 ms of caller u-law (`send_audio`, what RealtimeVoice
  hands it); the server counts the `input_audio_buffer.append` messages and the bytes in them.
  Figure: CPU time / appends the server received.
- STT frame: the cascade's streaming STT sessions (OpenAI Realtime transcription, G.711 passthrough)
  get 20 ms of caller u-law every 20 ms (`feed_wire`, what CallVoice hands them). Figure: CPU time /
  frames.
CPU time, not wall time, so the figures hold on a busy machine; best of `--repeat` runs.
Only the public RealtimeConnection API is used, so the same script measures an older checkout
(`PYTHONPATH=/that/checkout python bench/realtime_cost.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if not os.environ.get("PYTHONPATH"):  # else the checkout named there is the one measured
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import websockets  # noqa: E402

from bench.common import add_output_args, finish, loadavg, machine, pin_cpu, pinned  # noqa: E402

SERVER = r"""
import asyncio, base64, json, sys
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
DELTA = json.dumps({"type": "response.output_audio.delta", "response_id": "r1", "item_id": "i1",
                    "output_index": 0, "content_index": 0, "delta": base64.b64encode(b"\xff" * 800).decode()})
appends = {"n": 0, "bytes": 0}
async def session(ws):
    try:
        await serve_one(ws)
    except ConnectionClosed:  # the STT sessions are cancelled at the end, not closed politely
        pass
async def serve_one(ws):
    async for raw in ws:
        msg = json.loads(raw)
        kind = msg.get("type")
        if kind == "session.update":
            await ws.send(json.dumps({"type": "session.updated", "session": msg.get("session", {})}))
        elif kind == "input_audio_buffer.append":
            appends["n"] += 1
            appends["bytes"] += len(base64.b64decode(msg["audio"]))
        elif kind == "bench.count":
            await ws.send(json.dumps({"type": "bench.count", **appends}))
            appends.update(n=0, bytes=0)
        elif kind == "bench.deltas":
            for _ in range(int(msg["n"])):
                await ws.send(DELTA)
                await asyncio.sleep(0.02)
async def main():
    async with serve(session, "127.0.0.1", 0, compression=None, max_size=2**24) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


async def one_run(port: int, sessions: int, messages: int) -> dict[str, float]:
    from bridge.realtime import events as ev
    from bridge.realtime.connection import RealtimeConnection
    from bridge.realtime.openai import OpenAiRealtimeOptions, OpenAiRealtimeProtocol
    from media.formats import ULAW_8K

    received = 0
    done = asyncio.Event()
    counts: list[dict[str, int]] = []

    def make(i: int) -> RealtimeConnection:
        protocol = OpenAiRealtimeProtocol(OpenAiRealtimeOptions("sk-bench", base_url=f"http://127.0.0.1:{port}/v1"),
                                          wire=ULAW_8K)
        conn = RealtimeConnection(protocol)

        def on_event(event: ev.RealtimeEvent) -> None:
            nonlocal received
            if isinstance(event, ev.AudioOut):
                protocol.decode_output(event.audio)
                received += 1
                if received == sessions * messages:
                    done.set()

        conn.listen(on_event)
        return conn

    conns = [make(i) for i in range(sessions)]
    for conn in conns:
        conn.start()
    await asyncio.gather(*(c.wait_ready(10) for c in conns))

    # deltas
    cpu0 = time.process_time()
    for conn in conns:
        conn.send([{"type": "bench.deltas", "n": messages}])
    await asyncio.wait_for(done.wait(), 60)
    delta_cpu = time.process_time() - cpu0

    # appends: 40 ms of u-law per session every 40 ms
    chunk = b"\x7f" * 320
    loop = asyncio.get_running_loop()
    cpu0, start = time.process_time(), loop.time()
    for k in range(messages):
        for conn in conns:
            conn.send_audio(chunk)
        await asyncio.sleep(max(0.0, start + (k + 1) * 0.04 - loop.time()))
    append_cpu = time.process_time() - cpu0
    await asyncio.sleep(0.3)  # let the last ones arrive before asking for the count

    # the protocol ignores the server's count message: read it off a plain socket
    counts.append(await server_count(port))

    # the cascade's streaming STT (OpenAI Realtime transcription): 20 ms of caller u-law per session every 20 ms
    from media.stt.factory import create_stt

    stt = create_stt({"provider": "openai", "providers": {"openai": {
        "apiKey": "sk-bench", "baseUrl": f"http://127.0.0.1:{port}/v1"}}})
    stts = [stt.open(sample_rate=16000, on_event=lambda e: None, wire_format=ULAW_8K) for _ in range(sessions)]
    await asyncio.gather(*(s.start() for s in stts))
    frame = b"\x7f" * 160
    cpu0, start = time.process_time(), loop.time()
    for k in range(messages):
        for s in stts:
            s.feed_wire(frame)
        await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - loop.time()))
    stt_cpu = time.process_time() - cpu0
    await asyncio.sleep(0.3)
    stt_count = await server_count(port)
    for s in stts:
        await s.close()
    for conn in conns:
        await conn.close()
    appended = counts[0]["n"]
    return {"delta_us": 1e6 * delta_cpu / (sessions * messages),
            "append_us": 1e6 * append_cpu / appended if appended else float("nan"),
            "appends": appended, "audio_bytes_ok": counts[0]["bytes"] == sessions * messages * len(chunk),
            "stt_frame_us": 1e6 * stt_cpu / (sessions * messages), "stt_appends": stt_count["n"],
            "stt_audio_ok": stt_count["bytes"] == sessions * messages * len(frame)}


async def server_count(port: int) -> dict[str, int]:
    """The appends (and their audio bytes) the server got since it was last asked."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
        await ws.send(json.dumps({"type": "bench.count"}))
        count: dict[str, int] = json.loads(await ws.recv())
        return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=0, help="pin this process to this CPU, the server to the next (-1: no)")
    add_output_args(parser)
    args = parser.parse_args()
    pin_cpu(args.cpu)
    ncpu = os.cpu_count() or 1
    server_cpu = (args.cpu + 1) % ncpu if args.cpu >= 0 and ncpu > 1 else None
    server = subprocess.Popen(pinned(server_cpu, [sys.executable, "-c", SERVER]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        runs = [asyncio.run(one_run(port, args.sessions, args.messages)) for _ in range(args.repeat)]
    finally:
        server.terminate()
        server.wait(5)
    data = {"benchmark": "realtime_cost", "machine": machine(), "sessions": args.sessions, "messages": args.messages,
            "delta_us": min(r["delta_us"] for r in runs), "append_us": min(r["append_us"] for r in runs),
            "stt_frame_us": min(r["stt_frame_us"] for r in runs),
            "audio_complete": all(r["audio_bytes_ok"] and r["stt_audio_ok"] for r in runs), "runs": runs, "loadavg": loadavg()}
    print(f"sessions {args.sessions}, {args.messages} messages each way per session, best of {args.repeat}")
    print(f"  per model audio delta (receive, parse, decode): {data['delta_us']:6.1f} us CPU")
    print(f"  per caller audio append (40 ms, encode, send):  {data['append_us']:6.1f} us CPU"
          f"   (all audio arrived: {data['audio_complete']})")
    print(f"  per streaming-STT frame (20 ms, OpenAI Realtime transcription): {data['stt_frame_us']:6.1f} us CPU"
          f"   (all audio arrived: {all(r['stt_audio_ok'] for r in runs)})")
    print(f"  runs: {[(round(r['delta_us'], 1), round(r['append_us'], 1)) for r in runs]}  load {data['loadavg']}")
    return finish("realtime_cost", data, args)


if __name__ == "__main__":
    sys.exit(main())
