"""Server CPU per inbound media message at the WebSocket edge (µs): aiohttp's queue + receive() loop
vs the inline read callback (bridge/ws_inline.py), and the inline callback on frames in Twilio's own
text layout (`inline-twilio`: the codec reads them without the JSON parser, carriers/wire.py MediaLayout;
the other modes send `json.dumps` text, which takes the full parse).

    python bench/media_edge_cost.py [--sockets 200] [--rounds 150] [--uvloop]

This process is the server: an aiohttp app whose WebSocket handlers parse each text frame with the
Twilio codec (depth gate + JSON + base64, what the stream handler does before MediaPipeline), one
route per mode. A client process (aiohttp, CPU 1 when there are two) opens --sockets streams per
mode and sends real Twilio media frames round-robin, one frame per socket per round, a round every
10 ms, so each socket read carries one frame as on a real call. Figure: the server's CPU time
(`time.process_time`, not wall time: a shared machine slows it down but does not add to it) from
the first to the last frame, divided by the frames; best of --repeat alternating runs per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import WSMsgType, web  # noqa: E402

from bench.common import free_port, loadavg, machine, pinned, write_results  # noqa: E402
from bridge.streams import _parse  # noqa: E402
from bridge.ws_inline import InlineWebSocketResponse  # noqa: E402
from carriers.twilio.protocol import TwilioStreamCodec  # noqa: E402

SID = "MZ" + "0" * 32


def start_message() -> str:
    return json.dumps({"event": "start", "streamSid": SID,
                       "start": {"callSid": "CA1", "streamSid": SID, "customParameters": {"token": "t"}}})


def media_message(k: int, layout: str = "json") -> str:
    if layout == "twilio":  # byte for byte how Twilio writes it (tests/fakes/twilio_server.py)
        return ('{"event":"media","sequenceNumber":"' + str(k + 2) + '","media":{"track":"inbound","chunk":"'
                + str(k + 1) + '","timestamp":"' + str(k * 20) + '","payload":"'
                + base64.b64encode(bytes([k % 256]) * 160).decode() + '"},"streamSid":"' + SID + '"}')
    return json.dumps({"event": "media", "sequenceNumber": str(k + 2), "streamSid": SID,
                       "media": {"track": "inbound", "chunk": str(k + 1), "timestamp": str(k * 20),
                                 "payload": base64.b64encode(bytes([k % 256]) * 160).decode()}})


class Counter:
    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        self.t0 = 0.0
        self.cpu = 0.0
        self.done = asyncio.get_running_loop().create_future()

    def one(self) -> None:
        if self.n == 0:
            self.t0 = time.process_time()
        self.n += 1
        if self.n == self.total:
            self.cpu = time.process_time() - self.t0
            self.done.set_result(None)


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    counters: dict[str, Counter] = {}

    async def queue_mode(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=64 * 1024)
        await ws.prepare(request)
        codec = TwilioStreamCodec()
        count = counters["queue"]
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                _parse(codec, msg.data)
                count.one()
        return ws

    async def inline_mode(request: web.Request) -> web.WebSocketResponse:
        ws = InlineWebSocketResponse(max_msg_size=64 * 1024)
        await ws.prepare(request)
        codec = TwilioStreamCodec()
        count = counters[request.path.strip("/")]

        def on_text(text: str) -> bool:
            _parse(codec, text)
            count.one()
            return True

        assert ws.inline(on_text)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/queue", queue_mode)
    app.router.add_get("/inline", inline_mode)
    app.router.add_get("/inline-twilio", inline_mode)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    results: dict[str, list[float]] = {"queue": [], "inline": [], "inline-twilio": []}
    total = args.sockets * (args.rounds + 1)  # + the start message
    try:
        for _ in range(args.repeat):
            for mode in results:
                counters[mode] = Counter(total)
                client = subprocess.Popen(pinned(1, [sys.executable, __file__, "--role", "client", "--url",
                                                     f"ws://127.0.0.1:{port}/{mode}", "--sockets", str(args.sockets),
                                                     "--rounds", str(args.rounds), "--layout",
                                                     "twilio" if mode.endswith("twilio") else "json"]),
                                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
                await asyncio.wait_for(counters[mode].done, 120)
                await asyncio.get_running_loop().run_in_executor(None, client.wait)
                results[mode].append(counters[mode].cpu / total * 1e6)
    finally:
        await runner.cleanup()
    return {"sockets": args.sockets, "frames_per_run": total, "us_per_frame": results}


async def client(args: argparse.Namespace) -> None:
    import aiohttp

    frames = [media_message(k, args.layout) for k in range(50)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = [await session.ws_connect(args.url) for _ in range(args.sockets)]
        for ws in sockets:
            await ws.send_str(start_message())
        for r in range(args.rounds):
            t = time.monotonic()
            for ws in sockets:
                await ws.send_str(frames[r % 50])
            await asyncio.sleep(max(0.0, 0.010 - (time.monotonic() - t)))
        await asyncio.sleep(0.2)
        for ws in sockets:
            await ws.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--out", help="results file (default bench/results/media_edge_cost.json)")
    parser.add_argument("--role", default="server")
    parser.add_argument("--url")
    parser.add_argument("--layout", default="json")
    args = parser.parse_args()
    if args.role == "client":
        asyncio.run(client(args))
        return 0
    if args.uvloop:
        import uvloop

        uvloop.install()
    load = loadavg()
    out = asyncio.run(serve(args))
    out.update({"benchmark": "media_edge_cost", "machine": machine(), "loop": "uvloop" if args.uvloop else "asyncio",
                "loadavg_before": load, "loadavg_after": loadavg(), "argv": sys.argv[1:]})
    print(f"{out['sockets']} sockets, {out['frames_per_run']} frames per run, loop {out['loop']}, "
          f"load {load[0]:.1f} -> {out['loadavg_after'][0]:.1f}")
    for mode, us in out["us_per_frame"].items():
        print(f"  {mode:<13} server CPU per inbound message: best {min(us):6.1f} µs  (runs: "
              + ", ".join(f"{u:.1f}" for u in us) + ")")
    print(f"results: {write_results('media_edge_cost', out, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
