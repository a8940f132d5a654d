"""Verified Twilio status callbacks per second on one core, and their latency.

    python bench/webhook_throughput.py --seconds 10 [--concurrency 64] [--calls 2000] [--json]

`voicecall serve` (Twilio carrier, signature verification ON, replay cache on) runs pinned to CPU 0.
A client process pinned to CPU 1 (aiohttp, keep-alive, `--concurrency` requests in flight) first
places `--calls` inbound calls through signed voice webhooks, then for `--seconds` posts signed status
callbacks for them (`?callId=..&type=status`, CallStatus in-progress, a fresh SequenceNumber and
Timestamp each, so every one verifies, passes the replay check and is processed: event, dedupe,
state, call-log line). Reported: requests/s (status 200 only), non-200 answers, latency p50/p99/max,
both processes' CPU%.

`webhookSecurity.maxInFlightPerIp` (default 8) caps requests in flight from one address, and the
whole load comes from 127.0.0.1: it is set to --concurrency + 16 for this benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    Server,
    add_output_args,
    cpu_seconds,
    finish,
    free_port,
    loadavg,
    machine,
    pinned,
    table,
)


def write_config(tmp: Path, port: int, account_sid: str, auth_token: str, concurrency: int, uvloop: bool) -> Path:
    import yaml

    config = {
        "provider": "twilio", "fromNumber": "+15550001234", "inboundPolicy": "open", "inboundGreeting": "",
        "maxConcurrentCalls": 100000, "maxDurationSeconds": 3600, "store": str(tmp / "store"),
        "serve": {"port": port, "bind": "127.0.0.1", "path": "/voice/webhook",
                  "eventLoop": "uvloop" if uvloop else "asyncio"},
        "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
        "twilio": {"accountSid": account_sid, "authToken": auth_token, "apiBaseUrl": "http://127.0.0.1:9"},
        "streaming": {"enabled": False},
        "skipSignatureVerification": False,
        "webhookSecurity": {"maxInFlightPerIp": concurrency + 16},
        "tts": {"provider": "espeak"}, "responseModel": "offline",
    }
    path = tmp / "voicecall.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def client(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    from tests.fakes.twilio_server import twilio_sign

    url, token, account = spec["url"], spec["auth_token"], spec["account_sid"]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=spec["concurrency"]))
    calls: list[tuple[str, str]] = []
    try:
        for i in range(spec["calls"]):
            sid = "CA" + secrets.token_hex(16)
            params = {"AccountSid": account, "CallSid": sid, "CallStatus": "ringing", "Direction": "inbound",
                      "From": f"+1555{i:07d}", "To": "+15550001234", "ApiVersion": "2010-04-01"}
            async with session.post(url, data=params, headers={"X-Twilio-Signature": twilio_sign(token, url, params)}) as r:
                await r.read()
            calls.append((sid, ""))  # noqa: PERF401
        seq = itertools.count(1)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + spec["seconds"]
        me = os.getpid()
        cpu0, t0 = cpu_seconds(me), time.monotonic()
        print(json.dumps({"window": "start"}), flush=True)

        async def worker(w: int) -> None:
            i = w
            while time.monotonic() < deadline:
                sid, _ = calls[i % len(calls)]
                target = f"{url}?type=status"  # the call is found by its CallSid
                n = next(seq)
                params = {"AccountSid": account, "CallSid": sid, "CallStatus": "in-progress", "Direction": "inbound",
                          "CallbackSource": "call-progress-events", "SequenceNumber": str(n),
                          "Timestamp": time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()),
                          "From": "+15550009999", "To": "+15550001234", "ApiVersion": "2010-04-01"}
                headers = {"X-Twilio-Signature": twilio_sign(token, target, params)}
                started = time.monotonic()
                async with session.post(target, data=params, headers=headers) as resp:
                    await resp.read()
                latencies.append((time.monotonic() - started) * 1000)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                i += spec["concurrency"]

        await asyncio.gather(*(worker(w) for w in range(spec["concurrency"])))
        elapsed = time.monotonic() - t0
        print(json.dumps({"window": "end"}), flush=True)
        cpu = (cpu_seconds(me) - cpu0) / elapsed * 100
    finally:
        await session.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q / 100 * (len(latencies) - 1)))] if latencies else float("nan")

    ok = statuses.get(200, 0)
    return {"requests": len(latencies), "ok": ok, "non_200": {str(k): v for k, v in statuses.items() if k != 200},
            "elapsed_s": elapsed, "per_s": ok / elapsed, "p50_ms": pct(50), "p99_ms": pct(99),
            "max_ms": latencies[-1] if latencies else float("nan"), "client_cpu_pct": cpu}


def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    account_sid, auth_token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmpdir:
        tmp = Path(tmpdir)
        cfg = write_config(tmp, port, account_sid, auth_token, args.concurrency, args.uvloop)
        argv = [sys.executable, "-m", "bridge.cli", "serve", "--config", str(cfg)]  # serve.eventLoop picks the loop
        with Server(pinned(0, argv), log=tmp / "server.log", env={"PYTHONPATH": str(ROOT)}) as server:
            server.wait_http(f"http://127.0.0.1:{port}/healthz")
            url = f"http://127.0.0.1:{port}/voice/webhook"
            spec = {"url": url, "auth_token": auth_token, "account_sid": account_sid, "calls": args.calls,
                    "seconds": args.seconds, "concurrency": args.concurrency}
            spec_path = tmp / "spec.json"
            spec_path.write_text(json.dumps(spec))
            proc = subprocess.Popen(pinned(1, [sys.executable, str(Path(__file__).resolve()), "--role", "client",
                                                "--spec", str(spec_path)]),
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            marks: dict[str, tuple[float, float]] = {}
            result: dict[str, Any] | None = None
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    msg = json.loads(line)
                    if "window" in msg:
                        marks[msg["window"]] = (time.monotonic(), cpu_seconds(server.pid))
                    else:
                        result = msg
                proc.wait(timeout=args.seconds + 120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if result is None:
                raise RuntimeError(f"client failed: {proc.stderr.read() if proc.stderr else ''}\n{server.tail()}")
            (t0, c0), (t1, c1) = marks["start"], marks["end"]
            result["server_cpu_pct"] = (c1 - c0) / (t1 - t0) * 100
            result["errors_in_server_log"] = sum(1 for line in server.tail(10_000).splitlines()
                                                 if " ERROR " in line or "Traceback" in line)
    result.update({"concurrency": args.concurrency, "calls": args.calls, "uvloop": args.uvloop,
                   "maxInFlightPerIp": args.concurrency + 16, "loadavg": loadavg()})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2000, help="calls the callbacks are spread over")
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    add_output_args(parser)
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "client":
        spec = json.loads(Path(args.spec).read_text())
        print(json.dumps(asyncio.run(client(spec))), flush=True)
        return 0
    result = run(args)
    data = {"benchmark": "webhook_throughput", "machine": machine(), "result": result}
    print(table(["verified webhooks/s", "non-200", "p50 ms", "p99 ms", "max ms", "server CPU%", "client CPU%",
                 "concurrency", "load1"],
                [[result["per_s"], sum(result["non_200"].values()), result["p50_ms"], result["p99_ms"],
                  result["max_ms"], result["server_cpu_pct"], result["client_cpu_pct"], result["concurrency"],
                  result["loadavg"][0]]]))
    return finish("webhook_throughput", data, args)


if __name__ == "__main__":
    sys.exit(main())
