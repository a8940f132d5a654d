"""Speech-to-speech: the bridge's added latency between the model's first audio delta and the caller.

    python bench/s2s_latency.py --calls 1,100 [--rounds 3] [--json]

The "model" is the OpenAI Realtime fake (tests/fakes/openai_realtime_server.py) in its own process
on the other CPU (a remote service: its CPU is not the bridge's). In one process pinned to one CPU:
a real bridge in speech-to-speech mode (tests.harness.run_bridge: Twilio carrier, realtime.enabled,
the real RealtimeVoice, RealtimeConnection and MediaPipeline) and N Twilio media streams
(tests/fakes/stream_load.py, each opened through a signed inbound webhook, sending 20 ms frames of
silence at real-time cadence from one metronome). Each call's session is pre-warmed on the webhook.

Each round, every call's session gets a `response.create` (spread over 200 ms); the fake streams
1 s of u-law reply audio as 100 ms deltas, `--model-speed` times faster than real time (default 4;
0 sends the whole second at once). Timed per reply: from the moment the fake hands its first
`response.output_audio.delta` to its WebSocket until the caller's stream receives the first media
message of that reply (both processes read the same CLOCK_MONOTONIC). That span is the bridge's whole share:
model socket in, JSON + base64 decode, the play queue, frame + pace, Twilio socket out.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.callers import callers_parser, stream_callers  # noqa: E402
from bench.common import cpu_seconds, finish, loadavg, machine, pin_cpu, pinned, table  # noqa: E402
from tests.fakes.openai_realtime_server import FakeOpenAIRealtime  # noqa: E402
from tests.fakes.stream_load import percentile  # noqa: E402
from tests.harness import run_bridge  # noqa: E402

REPLY = "Fifty characters of reply tone, one second of audio"  # 20 ms per character


class RemoteFake:
    """The fake in a subprocess (pinned to `cpu`); its response records come back over HTTP."""

    api_key = FakeOpenAIRealtime.api_key

    def __init__(self, cpu: int | None, speed: float) -> None:
        self.cpu = cpu
        self.delta_interval_s = 0.1 / speed if speed > 0 else 0.0  # 100 ms deltas
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> RemoteFake:
        root = Path(__file__).resolve().parent.parent
        argv = pinned(self.cpu, [sys.executable, "-m", "tests.fakes.openai_realtime_server", REPLY,
                                 str(self.delta_interval_s)])
        self.proc = await asyncio.create_subprocess_exec(*argv, cwd=root, stdout=asyncio.subprocess.PIPE,
                                                         env={**os.environ, "PYTHONPATH": str(root)})
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 20)).decode()
        self.port = int(line.split()[1])
        return self

    async def responses(self, session: Any) -> list[dict[str, Any]]:
        async with session.get(f"http://127.0.0.1:{self.port}/_fake/responses") as resp:
            return list(await resp.json())

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


def config(account_sid: str, auth_token: str, calls: int, fake: RemoteFake) -> dict[str, Any]:
    return {
        "provider": "twilio", "fromNumber": "+15550001234", "inboundPolicy": "open", "inboundGreeting": "",
        "maxConcurrentCalls": calls + 10, "maxDurationSeconds": 3600,
        "twilio": {"accountSid": account_sid, "authToken": auth_token, "apiBaseUrl": "http://127.0.0.1:9"},
        "streaming": {"enabled": True, "provider": "none", "maxConnections": calls + 10,
                      "maxPendingConnectionsPerIp": 64, "maxPendingConnections": 256},
        "webhookSecurity": {"maxInFlightPerIp": 64},
        "tts": {"provider": "espeak"},
        "realtime": {"enabled": True, "provider": "openai", "apiKey": fake.api_key, "baseUrl": fake.base_url},
    }


async def measure(calls: int, rounds: int, fake_cpu: int | None, speed: float) -> dict[str, Any]:
    import secrets


    loop = asyncio.get_running_loop()
    account_sid, auth_token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
    # a caller who never speaks: the fake's VAD stays quiet; replies come only from response.create
    fake = await RemoteFake(fake_cpu, speed).start()
    added_ms: list[float] = []
    missed = 0
    cpu_pct = model_cpu_pct = float("nan")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-s2s-") as tmp:
            async with run_bridge(config(account_sid, auth_token, calls, fake), Path(tmp)) as runtime:
                voice_url = runtime.settings.publicUrl or ""
                async with stream_callers(voice_url, calls, account_sid=account_sid,
                                          auth_token=auth_token) as (clients, session):
                    manager = runtime.manager
                    async with asyncio.timeout(30):
                        while sum(1 for cid in clients if manager.voice(cid) is not None
                                  and manager.voice(cid).connection.ready.is_set()) < calls:
                            await asyncio.sleep(0.05)
                    await asyncio.sleep(1.0)
                    cpu0, wall0, fake_cpu0 = time.process_time(), loop.time(), fake.cpu_seconds()
                    for r in range(rounds):
                        async def one(call_id: str, r: int = r) -> None:
                            await asyncio.sleep(random.random() * 0.2)
                            manager.voice(call_id).connection.send(
                                [{"type": "response.create", "response": {"metadata": {"bench": f"{call_id}/{r}"}}}])

                        await asyncio.gather(*(one(cid) for cid in clients))
                        await asyncio.sleep(0.2 + 1.0 + 0.5)  # every reply sent and played out
                        async with asyncio.timeout(15):
                            while any(manager.voice(cid).bridge.playing for cid in clients):
                                await asyncio.sleep(0.05)
                        responses = {(rec["metadata"] or {}).get("bench"): rec for rec in await fake.responses(session)}
                        for call_id, client in clients.items():
                            rec = responses.get(f"{call_id}/{r}")
                            t0 = rec and rec["first_delta_at"]
                            heard = next((t for t in client.recv_times if t0 is not None and t >= t0), None)
                            if t0 is None or heard is None:
                                missed += 1
                                continue
                            added_ms.append((heard - t0) * 1000)
                    cpu_pct = 100 * (time.process_time() - cpu0) / (loop.time() - wall0)
                    model_cpu_pct = 100 * (fake.cpu_seconds() - fake_cpu0) / (loop.time() - wall0)
    finally:
        await fake.stop()
    return {"calls": calls, "replies": len(added_ms), "missed": missed,
            "added_p50_ms": percentile(added_ms, 50), "added_p99_ms": percentile(added_ms, 99),
            "added_max_ms": max(added_ms) if added_ms else float("nan"), "process_cpu_pct": cpu_pct,
            "model_fake_cpu_pct": model_cpu_pct,
            "loadavg": loadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = callers_parser(__doc__, rounds=3)
    parser.add_argument("--model-speed", type=float, default=4.0,
                        help="seconds of reply audio the fake model streams per second (0: all at once)")
    args = parser.parse_args(argv)
    pin_cpu(args.cpu)
    random.seed(1)
    points = []
    for n in (int(x) for x in args.calls.split(",")):
        started = time.monotonic()
        fake_cpu = None if args.cpu < 0 else (1 if args.cpu == 0 else 0)
        points.append(asyncio.run(measure(n, args.rounds, fake_cpu, args.model_speed)))
        print(f"[s2s] {n} calls: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    data = {"benchmark": "s2s_latency", "machine": machine(), "rounds": args.rounds,
            "model_speed": args.model_speed, "points": points}
    print(table(["calls", "replies", "missed", "added p50", "added p99", "added max", "cpu %", "model cpu %", "load1"],
                [[p["calls"], p["replies"], p["missed"], p["added_p50_ms"], p["added_p99_ms"], p["added_max_ms"],
                  p["process_cpu_pct"], p["model_fake_cpu_pct"], p["loadavg"][0]] for p in points]))
    print("(ms from the model's first audio delta leaving the fake to the caller receiving that reply's first frame;"
          " cpu % = this process, bridge + callers, over the measured rounds)")
    return finish("s2s_latency", data, args)


if __name__ == "__main__":
    sys.exit(main())
