"""Media-path capacity and latency: N Twilio media streams against an echo pipeline on ONE core.

    python bench/media_streams.py --streams 50,100,200,400,800 --seconds 20 [--peer pipecat] [--json]

For each N a fresh server is started, pinned to CPU 0 (`taskset -c 0`):
- bridge: `voicecall serve` with `streaming.echo: true` (decode -> resample 8k->16k -> resample back ->
  encode -> 20 ms frames paced in real time -> send), no engines;
- pipecat (`--peer pipecat`): bench/peers/pipecat_echo.py (FastAPIWebsocketTransport +
  TwilioFrameSerializer, echo at 16 kHz), run with the Python of a venv that has pipecat-ai.
`--workers 1,2`: the bridge as `serve.workers: W` processes on one port (SO_REUSEPORT) sharing a
Redis (a fresh `redis-server` per point; W = 1 runs with the same Redis store, so the ratio is only the
process count), worker i pinned to CPU i; each call's webhook and stream share one keep-alive
connection so both reach the same worker. `--split` says where the generator runs
(`generator_cpu_for`): `separate` (default without --workers) gives it CPU 1; `shared` (default with
--workers) puts it on the workers' cores in every run (W = 1: CPU 0 with the worker), so W = 2 vs
W = 1 is the same load on twice the cores.
The load generator is another process (`--generator lean`, default: bench/lean_load.py sets each
stream up on a raw socket and hands it to the C engine bench/lean_media.c, built on demand; the
Python engine without a compiler; `lean-python`, `aiohttp` = the fake Twilio's client, for
comparison): it gets each stream's URL and token the real way (a signed inbound webhook answered
with <Connect><Stream>, then the upgrade on the same connection; pipecat: its /ws URL), opens N
streams at --ramp per second, sends 20 ms u-law frames at real-time cadence from one metronome
(stream i at phase i%4), echoes marks, and records when each echoed byte comes back. Measurement
starts once every stream is up (+ --warmup) and lasts --seconds; `generator_window_cpu_pct` is its
CPU (engine included) over the window and `g` that per stream over one worker's.

Latency method. Frame k's round trip = receive time of the echo byte (k+1)*160 - send time of frame
k (the resamplers are delay-compensated: output sample i is input sample i; checked on stream 0 by
cross-correlation, `alignment`). Most of that round trip is the echo's own buffering: soxr releases
~104 ms blocks, and the pacer then spreads them out - it depends only on k, not on load. So before
the sweep, a calibration run (2 streams, idle server, as long as the longest run) gives, per k, the
idle round trip; "added" latency = round trip - idle round trip of the same k. That is what load
costs; p50/p99/max of it are the headline. A frame is late if added > 20 ms, lost if its echo never
came (within --tail + --drain s after the end). Server CPU% from /proc/<pid>/stat over the window, RSS per stream
= (RSS under load - idle RSS) / N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    CLK_TCK,
    MEDIA_LIBS,
    PEER_LIBS,
    ROOT,
    Server,
    cpu_seconds,
    finish,
    free_port,
    loadavg,
    machine,
    pinned,
    rss_bytes,
    table,
    versions,
)

LATE_MS = 20.0
DEFAULT_PIPECAT_PY = "/work/venvs/pipecat/bin/python"


# ====================================================================== servers


def bridge_config(tmp: Path, port: int, account_sid: str, auth_token: str, *, uvloop: bool = False,
                  outbound_ms: int | None = None, workers: int = 1, redis_url: str | None = None) -> Path:
    import yaml

    config = {
        "provider": "twilio",
        "fromNumber": "+15550001234",
        "inboundPolicy": "open",
        "inboundGreeting": "",  # the echo is all the caller hears
        "maxConcurrentCalls": 100000,
        "maxDurationSeconds": 3600,
        "store": str(tmp / "store"),
        "serve": {"port": port, "bind": "127.0.0.1", "path": "/voice/webhook",
                  "eventLoop": "uvloop" if uvloop else "asyncio"},
        "publicUrl": f"http://127.0.0.1:{port}/voice/webhook",
        # REST is never needed while streams run (hang-ups after the run go nowhere: the server is stopped)
        "twilio": {"accountSid": account_sid, "authToken": auth_token, "apiBaseUrl": "http://127.0.0.1:9"},
        "streaming": {"enabled": True, "echo": True, "provider": "none", "maxConnections": 100000,
                      "maxPendingConnections": 1000, "maxPendingConnectionsPerIp": 64,
                      **({"outboundFrameMs": outbound_ms} if outbound_ms else {})},
        "webhookSecurity": {"maxInFlightPerIp": 64},
        "tts": {"provider": "espeak"},
        "responseModel": "offline",
    }
    if redis_url:
        config["serve"]["workers"] = workers
        config["cluster"] = {"redisUrl": redis_url, "nodeId": f"bench-{secrets.token_hex(3)}", "leaseSeconds": 30}
    path = tmp / "voicecall.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_server(kind: str, tmp: Path, *, uvloop: bool, pipecat_python: str,
                 experiment: str | None = None, outbound_ms: int | None = None, workers: int = 1,
                 redis_url: str | None = None) -> tuple[Server, dict[str, Any]]:
    port = free_port()
    if kind == "bridge":
        account_sid, auth_token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
        config = bridge_config(tmp, port, account_sid, auth_token, uvloop=uvloop, outbound_ms=outbound_ms,
                               workers=workers, redis_url=redis_url)
        if experiment:
            prelude = f"import bench.experiments as x; x.apply({experiment!r}); "
            code = f"import sys; {prelude}from bridge.cli import main; sys.exit(main(sys.argv[1:]))"
            argv = [sys.executable, "-c", code, "serve", "--config", str(config)]
        else:
            argv = [sys.executable, "-m", "bridge.cli", "serve", "--config", str(config)]
        server = Server(pinned(0 if workers == 1 else None, argv), log=tmp / "server.log",
                        env={"PYTHONPATH": str(ROOT)})
        server.wait_http(f"http://127.0.0.1:{port}/healthz")
        if workers > 1:
            pin_workers(server, port, workers)
        target = {"mode": "twilio-webhook", "voice_url": f"http://127.0.0.1:{port}/voice/webhook",
                  "auth_token": auth_token, "account_sid": account_sid}
    else:
        script = ROOT / "bench" / "peers" / "pipecat_echo.py"
        argv = [pipecat_python, str(script), "--port", str(port), *(["--uvloop"] if uvloop else [])]
        server = Server(pinned(0, argv), log=tmp / "server.log")
        server.wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        target = {"mode": "direct", "url": f"ws://127.0.0.1:{port}/ws"}
    return server, target


def generator_cpu_for(split: str, workers: int) -> int | None:
    """Where the generator runs. `separate`: W = 1 -> CPU 1 (the server has CPU 0), W >= 2 -> unpinned.
    `shared`: the generator shares the workers' cores in every run: W = 1 -> CPU 0 with the worker (a
    1-core machine), W >= 2 -> unpinned over the workers' CPUs, so W = 2 vs W = 1 compares the same
    load on twice the cores."""
    if workers >= 2:
        return None
    return 0 if split == "shared" else 1


def pin_workers(server: Server, port: int, workers: int, timeout: float = 30.0) -> None:
    """Wait until all `workers` answer on the shared port, then pin worker i to CPU i."""
    import urllib.request

    nodes: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(nodes) < workers or len(process_tree(server.pid)) < workers + 1:
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise RuntimeError(f"{workers} workers not up after {timeout}s ({nodes}):\n{server.tail()}")
        try:  # a new connection each time: the kernel spreads them over the workers
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:  # noqa: S310
                nodes.add(str(json.loads(resp.read()).get("node", "")))
        except OSError:
            time.sleep(0.05)
    cpus = os.cpu_count() or 1
    for i, pid in enumerate(process_tree(server.pid)[1:]):
        os.sched_setaffinity(pid, {i % cpus})


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the `serve.workers` supervisor and its workers)."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if Path(f"/proc/{pid}").exists() else []:
        out.extend(process_tree(int(child)))
    return out


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_rss_bytes(pid: int) -> int:
    return sum(rss_bytes(p) for p in process_tree(pid))


# ====================================================================== the generator process


async def generate(spec: dict[str, Any]) -> dict[str, Any]:
    from tests.fakes import stream_load as sl

    target = spec["target"]
    window_cpu: dict[str, tuple[float, float, float]] = {}
    me = os.getpid()

    def mark(what: str) -> None:
        user, system = generator_cpu(me)
        window_cpu[what] = (time.monotonic(), user + system, system)
        print(json.dumps({"window": what, "t": time.monotonic()}), flush=True)

    import gc

    gc.collect()
    gc.freeze()
    gc.disable()  # the generator's own pauses would show up as the server's latency; its run is bounded
    cpu0 = sum(generator_cpu(me))
    t0 = time.monotonic()
    run: Any
    timing = {"warmup_s": spec.get("warmup", 1.0), "tail_s": spec.get("tail", 0.5), "drain_s": spec.get("drain", 1.5)}
    kind = spec.get("generator", "lean")
    if kind in ("lean", "lean-python"):
        from bench import lean_load

        frames = sl.caller_frames()
        engine = spec.get("engine") if kind == "lean" else None
        if engine:
            run = await lean_load.run_engine(Path(engine), target, spec["n"], seconds=spec["seconds"],
                                             ramp_per_s=spec["ramp"], frames=frames, keep_audio_first=True,
                                             on_window=mark, **timing)
        else:
            run = await lean_load.run_streams(target, spec["n"], seconds=spec["seconds"], ramp_per_s=spec["ramp"],
                                              frames=frames, keep_audio_first=True, on_window=mark, **timing)
    else:
        import aiohttp

        async def get_target(session: aiohttp.ClientSession) -> sl.StreamTarget:
            if target["mode"] == "direct":
                return sl.StreamTarget(target["url"], {})
            return await sl.inbound_stream(session, target["voice_url"], auth_token=target["auth_token"],
                                           account_sid=target["account_sid"])

        run = await sl.run_streams(get_target, spec["n"], seconds=spec["seconds"], ramp_per_s=spec["ramp"],
                                   keep_audio_first=True, on_window=mark, **timing,
                                   one_connection_per_call=bool(spec.get("one_connection")))
    gen_cpu = (sum(generator_cpu(me)) - cpu0) / max(1e-9, time.monotonic() - t0) * 100
    rtts: list[float] = []
    added: list[float] = []
    steady: list[float] = []
    lost = 0
    frames = 0
    base = spec.get("baseline")
    settle = run.window[0] + 1.0
    for client in run.clients:
        rtt, lost_here = sl.round_trips(client, run.window)
        frames += len(rtt) + lost_here
        lost += lost_here
        rtts.extend(rtt.values())
        if base:
            extra = {k: ms - base[k] for k, ms in rtt.items() if k < len(base) and base[k] != float("inf")}
            added.extend(extra.values())
            # What this stream already carried when the window opened (delay it picked up while the
            # other streams were being set up: a playout gap is never won back at 1x) is not load
            # of the window; what it picks up during the window is.
            first = [v for k, v in extra.items() if client.sent_at[k] < settle]
            offset = max(0.0, min(first)) if first else 0.0  # a stream ahead of the baseline gets no credit
            steady.extend(v - offset for v in extra.values())
    # streams that never opened lose every frame they would have sent
    lost += len(run.failed) * int(spec["seconds"] * 50)
    result: dict[str, Any] = {
        "n": spec["n"], "opened": len(run.clients), "failed": len(run.failed), "errors": run.failed[:5],
        "frames": frames, "lost": lost,
        "rtt_p50_ms": sl.percentile(rtts, 50), "rtt_p99_ms": sl.percentile(rtts, 99),
        "rtt_max_ms": max(rtts) if rtts else float("nan"),
        "generator": spec.get("generator", "lean"), "generator_cpu_pct": gen_cpu,
        "tick_lag_p99_ms": sl.percentile(run.tick_lag_ms, 99), "tick_ms_p50": sl.percentile(run.tick_ms, 50),
        "alignment": next((alignment(c) for c in run.clients if c.keep_audio), None),
        "bad_frames": sum(c.bad_frames for c in run.clients),
    }
    if "start" in window_cpu and "end" in window_cpu:  # the generator's own cost while measuring
        (w0, c0, s0), (w1, c1, s1) = window_cpu["start"], window_cpu["end"]
        result["generator_window_cpu_pct"] = (c1 - c0) / max(1e-9, w1 - w0) * 100
        result["generator_window_sys_pct"] = (s1 - s0) / max(1e-9, w1 - w0) * 100  # the kernel's share (loopback TCP)
    if base:
        result.update({"added_p50_ms": sl.percentile(added, 50), "added_p99_ms": sl.percentile(added, 99),
                       "added_max_ms": max(added) if added else float("nan"),
                       "late_abs": sum(1 for a in added if a > LATE_MS),
                       "window_p50_ms": sl.percentile(steady, 50), "window_p99_ms": sl.percentile(steady, 99),
                       "window_max_ms": max(steady) if steady else float("nan"),
                       "late": sum(1 for a in steady if a > LATE_MS)})
    if spec.get("calibrate"):
        result["baseline"] = sl.baseline(run.clients)
    return result


def generator_cpu(me: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the generator: this process, its reaped children (the C engine once it
    has exited) and its live ones."""
    user = system = 0.0
    for pid in process_tree(me):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11]) + (int(fields[13]) if pid == me else 0)
        system += int(fields[12]) + (int(fields[14]) if pid == me else 0)
    return user / CLK_TCK, system / CLK_TCK


def run_generator(spec: dict[str, Any]) -> dict[str, Any]:
    """The Python lean generator runs on uvloop when it is installed (its loop costs less per socket event);
    with the C engine Python only sets streams up, on asyncio (its selector lets go of a socket at once)."""
    kind = spec.get("generator", "lean")
    if kind == "lean-python" or (kind == "lean" and not spec.get("engine")):
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(generate(spec))
    return asyncio.run(generate(spec))


def alignment(client: Any) -> dict[str, Any] | None:
    """Lag (samples) between what stream 0 sent and what it heard back: 0 means sample-aligned echo."""
    import numpy as np

    from media import g711
    from media.formats import AudioEncoding
    from tests.fakes.stream_load import caller_frames

    heard = client.heard_ulaw() if client.keep_audio else b""
    if len(heard) < 24000:
        return None
    cycle = b"".join(caller_frames())  # every stream plays this cycle from its first frame
    sent = cycle * (len(heard) // len(cycle) + 2)
    a = np.frombuffer(g711.decode(sent, AudioEncoding.PCMU), dtype=np.int16).astype(np.float64)
    b = np.frombuffer(g711.decode(heard[800:16800], AudioEncoding.PCMU), dtype=np.int16).astype(np.float64)
    best, best_lag = -2.0, 0
    for lag in range(-400, 401):
        seg = a[800 + lag: 800 + lag + len(b)]
        c = float(np.dot(seg, b) / (np.linalg.norm(seg) * np.linalg.norm(b) + 1e-9))
        if c > best:
            best, best_lag = c, lag
    return {"lag_samples": best_lag, "correlation": round(best, 3)}


# ====================================================================== one point, one sweep


def run_point(kind: str, n: int, seconds: float, args: argparse.Namespace, baseline: list[float] | None,
              *, calibrate: bool = False, workers: int | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmpdir, \
            redis_for(workers, Path(tmpdir)) as redis_url:
        tmp = Path(tmpdir)
        load_before = loadavg()
        # The generator starts (and imports) while the server boots; it reads its spec from stdin.
        gen_cpu = generator_cpu_for(args.split, workers or 1)
        gen = subprocess.Popen(pinned(gen_cpu, [sys.executable, str(Path(__file__).resolve()), "--role", "generator",
                                                "--spec", "-"]),
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            server, target = start_server(kind, tmp, uvloop=args.uvloop, pipecat_python=args.pipecat_python,
                                          experiment=args.experiment if kind == "bridge" else None,
                                          outbound_ms=args.outbound_ms, workers=workers or 1, redis_url=redis_url)
        except BaseException:
            gen.kill()
            gen.wait()
            raise
        try:
            time.sleep(0.2)
            idle_rss = tree_rss_bytes(server.pid)
            spec = {"target": target, "n": n, "seconds": seconds, "ramp": args.ramp, "baseline": baseline,
                    "calibrate": calibrate, "one_connection": workers is not None, "generator": args.generator,
                    "engine": str(args.engine) if args.engine else None,
                    "warmup": args.warmup, "tail": args.tail, "drain": args.drain}
            assert gen.stdin is not None
            gen.stdin.write(json.dumps(spec) + "\n")
            gen.stdin.close()
            marks: dict[str, tuple[float, float, int]] = {}
            per_pid: dict[str, dict[int, float]] = {}
            load_start: list[float] | None = None
            result: dict[str, Any] | None = None
            profiler: subprocess.Popen[bytes] | None = None
            deadline = time.monotonic() + n / args.ramp + seconds + 90
            try:
                assert gen.stdout is not None
                for line in gen.stdout:
                    msg = json.loads(line)
                    if "window" in msg:
                        marks[msg["window"]] = (time.monotonic(), tree_cpu_seconds(server.pid),
                                                tree_rss_bytes(server.pid))
                        per_pid[msg["window"]] = {p: cpu_seconds(p) for p in process_tree(server.pid)}
                        if msg["window"] == "start":
                            load_start = loadavg()
                        if msg["window"] == "start" and args.profile and not calibrate:
                            profiler = start_profiler(server.pid, Path(args.profile) / f"{kind}-{n}", seconds)
                    else:
                        result = msg
                    if time.monotonic() > deadline:
                        break
                gen.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            finally:
                if gen.poll() is None:
                    gen.kill()
                    gen.wait()
                if profiler is not None:
                    try:
                        profiler.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        profiler.kill()
                        profiler.wait()
            if result is None:
                err = (gen.stderr.read() if gen.stderr else "")[-2000:]
                print(f"[{kind}] {n}: generator failed or timed out:\n{err}\nserver log:\n{server.tail(10)}",
                      file=sys.stderr, flush=True)
                result = {"n": n, "opened": 0, "failed": n, "errors": ["generator failed or timed out"],
                          "frames": 0, "lost": int(n * seconds * 50), "rtt_p50_ms": float("nan"),
                          "rtt_p99_ms": float("nan"), "rtt_max_ms": float("nan"), "generator_cpu_pct": float("nan"),
                          "bad_frames": 0}
            if "start" in marks and "end" in marks:
                (t0, c0, _), (t1, c1, rss) = marks["start"], marks["end"]
                result["server_cpu_pct"] = (c1 - c0) / (t1 - t0) * 100
                if result.get("generator_window_cpu_pct") is not None and result["server_cpu_pct"] > 0:
                    # g: the generator's CPU per stream over the bridge's (a worker's: W workers carry N/W each)
                    result["g"] = result["generator_window_cpu_pct"] / result["server_cpu_pct"]
                result["rss_mb"] = rss / 2**20
                result["rss_per_stream_kb"] = (rss - idle_rss) / max(1, n) / 1024
                if workers and workers > 1:  # how evenly SO_REUSEPORT spread the streams
                    result["worker_cpu_pct"] = [(per_pid["end"][p] - c) / (t1 - t0) * 100
                                                for p, c in per_pid["start"].items() if p != server.pid]
            result["loadavg_before"] = load_before
            result["loadavg_window_start"] = load_start
            result["loadavg"] = loadavg()  # at the window's end
            result["server_alive"] = server.proc.poll() is None
            if workers is not None:
                result["workers"] = workers
        finally:
            # A clean stop hangs every stream's call up at the (absent) carrier, retrying for ~5 s; nothing
            # of the server outlives the point (its store and Redis are in the point's temp dir): cut that short.
            server.stop(timeout=0.5)
    return result


@contextlib.contextmanager
def redis_for(workers: int | None, tmp: Path) -> Iterator[str | None]:
    """A fresh redis-server for one point of a `--workers` sweep (None otherwise)."""
    if workers is None:
        yield None
        return
    from tests.redis_server import RedisServer

    (tmp / "redis").mkdir()
    redis = RedisServer(tmp / "redis")
    redis.start()
    try:
        yield redis.url
    finally:
        redis.stop()


def start_profiler(pid: int, stem: Path, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy on the pinned server for the measurement window: collapsed stacks (+ a flame graph SVG)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    argv = ["py-spy", "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "200", "--nonblocking",
            "-f", "raw", "-o", str(stem) + ".folded"]
    return subprocess.Popen(pinned(1, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def headline(points: list[dict[str, Any]]) -> int:
    ok = [p["n"] for p in points
          if p.get("window_p99_ms", float("inf")) <= LATE_MS and p["lost"] == 0 and p["failed"] == 0]
    return max(ok, default=0)


def sweep(kind: str, args: argparse.Namespace, workers: int | None = None,
          calibrations: dict[Any, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Calibration (once per server kind and W: repeats reuse it from `calibrations`), then each N."""
    counts = [int(x) for x in (args.peer_streams if kind != "bridge" and args.peer_streams else args.streams).split(",")]
    if workers is not None and args.streams_per_worker:
        counts = [n * workers for n in counts]
    label = f"{kind} x{workers}" if workers else kind
    calib = (calibrations or {}).get((kind, workers))
    if args.skip_calibration:  # delivery only (smoke tests): no idle baseline, so no added-latency figures
        calib = {"baseline": None, "lost": 0}
    elif calib is None:
        # as many frames per stream as the longest point sends (its ramp is longer than 2 streams')
        calib_s = (max(counts) - 2) / args.ramp + args.seconds
        print(f"[{label}] calibrating: 2 idle streams for {calib_s:.0f} s", file=sys.stderr, flush=True)
        calib = run_point(kind, 2, calib_s, args, None, calibrate=True, workers=workers)
        if calibrations is not None:
            calibrations[(kind, workers)] = calib
    base = calib["baseline"]
    points = []
    for n in counts:
        print(f"[{label}] {n} streams ...", file=sys.stderr, flush=True)
        point = run_point(kind, n, args.seconds, args, base, workers=workers)
        print(f"[{label}] {n}: p99 {point.get('window_p99_ms', float('nan')):.1f} ms "
              f"(absolute {point.get('added_p99_ms', float('nan')):.1f}), lost {point['lost']}, "
              f"cpu {point.get('server_cpu_pct', float('nan')):.0f}%, load {point['loadavg'][0]:.2f}",
              file=sys.stderr, flush=True)
        points.append(point)
    idle = [b for b in base or [] if b != float("inf")]
    return {"server": kind, "workers": workers, "uvloop": args.uvloop, "loop": "uvloop" if args.uvloop else "asyncio",
            "experiment": args.experiment if kind == "bridge" else None,
            "outbound_ms": args.outbound_ms if kind == "bridge" else None,
            "calibration": {
        "streams": 2, "frames": len(idle), "idle_rtt_p50_ms": sorted(idle)[len(idle) // 2] if idle else None,
        "idle_rtt_max_ms": max(idle) if idle else None, "alignment": calib.get("alignment"), "lost": calib["lost"]},
        "points": points, "headline_streams": headline(points)}


def print_sweep(s: dict[str, Any]) -> None:
    rows = []
    for p in s["points"]:
        rows.append([p["n"], p.get("window_p50_ms", float("nan")), p.get("window_p99_ms", float("nan")),
                     p.get("window_max_ms", float("nan")), p.get("added_p99_ms", float("nan")),
                     p["rtt_p50_ms"], p["rtt_p99_ms"], p["lost"],
                     p.get("late", 0), p["failed"], p.get("server_cpu_pct", float("nan")),
                     p.get("rss_per_stream_kb", float("nan")), p["generator_cpu_pct"],
                     p.get("g") if p.get("g") is not None else float("nan"), p["loadavg"][0]])
    outbound = f"{s['outbound_ms']} ms outbound" if s.get("outbound_ms") else ""
    workers = f"{s['workers']} worker{'s' if s['workers'] > 1 else ''} + Redis" if s.get("workers") else ""
    extras = ", ".join(x for x in (workers, "uvloop" if s["uvloop"] else "", s.get("experiment") or "", outbound) if x)
    idle = s["calibration"]["idle_rtt_p50_ms"]
    print(f"\n{s['server']}{f' ({extras})' if extras else ''}: idle round trip p50 "
          f"{'-' if idle is None else f'{idle:.1f}'} ms, echo alignment {s['calibration']['alignment']}")
    print(table(["N", "p50", "p99", "max", "abs p99", "rtt p50", "rtt p99", "lost", "late", "failed",
                 "server CPU%", "RSS/stream KB", "gen CPU%", "g", "load1"], rows))
    print("(ms; p50/p99/max: latency added by load during the window; abs p99: also counting delay picked up "
          "during ramp-up; rtt: raw round trip incl. the echo's own buffering; g: generator CPU / server CPU "
          "over the window)")
    print(f"headline: {s['headline_streams']} streams with p99 <= {LATE_MS:.0f} ms and zero lost frames")


def _three(values: list[float]) -> list[float] | None:
    """min / median / max (None when no repeat produced the figure)."""
    xs = sorted(v for v in values if v == v)  # NaN: a point whose generator failed
    return [xs[0], xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2, xs[-1]] if xs else None


def spread(sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server and N over the repeats: min/median/max of p99 and server CPU, lost frames, headlines."""
    out: dict[str, Any] = {}
    for kind in dict.fromkeys(s["server"] for s in sweeps):
        mine = [s for s in sweeps if s["server"] == kind]
        points: dict[int, list[dict[str, Any]]] = {}
        for s in mine:
            for p in s["points"]:
                points.setdefault(p["n"], []).append(p)
        out[kind] = {
            "headlines": [s["headline_streams"] for s in mine],
            "points": [{"n": n, "runs": len(ps),
                        "p99_ms": _three([p.get("window_p99_ms", float("nan")) for p in ps]),
                        "server_cpu_pct": _three([p.get("server_cpu_pct", float("nan")) for p in ps]),
                        "rss_per_stream_kb": _three([p.get("rss_per_stream_kb", float("nan")) for p in ps]),
                        "lost": [p["lost"] for p in ps]}
                       for n, ps in sorted(points.items())]}
    return out


def print_spread(data: dict[str, Any]) -> None:
    def mmm(v: list[float] | None) -> str:
        return " / ".join(f"{x:.1f}" for x in v) if v else "-"

    for kind, d in data.items():
        print(f"\n{kind} over {len(d['headlines'])} repeats (min / median / max); headlines {d['headlines']}")
        print(table(["N", "p99 ms", "server CPU%", "RSS/stream KB", "lost"],
                    [[p["n"], mmm(p["p99_ms"]), mmm(p["server_cpu_pct"]), mmm(p["rss_per_stream_kb"]),
                      ",".join(map(str, p["lost"]))] for p in d["points"]]))


def scaling(sweeps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per repeat: each W's headline, its ratio to W = 1, and streams per server core at the headline."""
    out = []
    for rep in sorted({s["repeat"] for s in sweeps}):
        mine = [s for s in sweeps if s["repeat"] == rep and s.get("workers")]
        one = next((s["headline_streams"] for s in mine if s["workers"] == 1), None)
        for s in mine:
            head = s["headline_streams"]
            at = next((p for p in s["points"] if p["n"] == head), None)
            cpu = at.get("server_cpu_pct") if at else None
            # CPU per stream where nothing was lost: what capacity per core follows from, and far less
            # sensitive than latency to other work on the machine (it counts CPU used, not waited for)
            clean = [p for p in s["points"] if p["lost"] == 0 and p["failed"] == 0 and p.get("server_cpu_pct")]
            per_stream = sorted(p["server_cpu_pct"] / p["n"] for p in clean)
            out.append({"repeat": rep, "workers": s["workers"], "headline_streams": head,
                        "ratio_to_one": head / one if one else None,
                        "server_cpu_pct": cpu, "generator_cpu_pct": at.get("generator_cpu_pct") if at else None,
                        "streams_per_core": head / (cpu / 100) if cpu else None,
                        "cpu_pct_per_stream": per_stream[len(per_stream) // 2] if per_stream else None,
                        "loadavg": at.get("loadavg") if at else s["points"][-1].get("loadavg")})
    return out


def print_scaling(rows: list[dict[str, Any]]) -> None:
    def f(v: float | None) -> float | str:
        return "-" if v is None else v

    print("\nscaling (headline = largest N with p99 <= 20 ms and no lost frame)")
    print(table(["repeat", "workers", "headline", "x W=1", "server CPU%", "gen CPU%", "streams/core",
                 "CPU% per stream (0 lost)", "load1"],
                [[r["repeat"] + 1, r["workers"], r["headline_streams"], f(r["ratio_to_one"]), f(r["server_cpu_pct"]),
                  f(r["generator_cpu_pct"]), f(r["streams_per_core"]),
                  "-" if r["cpu_pct_per_stream"] is None else f"{r['cpu_pct_per_stream']:.2f}",
                  (r["loadavg"] or ["-"])[0]] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="50,100,200,400,800")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--ramp", type=float, default=100.0, help="streams opened per second")
    parser.add_argument("--peer", choices=["pipecat"], help="also run the same load against this peer")
    parser.add_argument("--peer-streams", help="stream counts for the peer (default: --streams)")
    parser.add_argument("--only-peer", action="store_true", help="skip the bridge (with --peer)")
    parser.add_argument("--pipecat-python", default=os.environ.get("PIPECAT_PYTHON", DEFAULT_PIPECAT_PY))
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    parser.add_argument("--experiment", help="patch the bridge server with bench/experiments.py changes (comma list)")
    parser.add_argument("--outbound-ms", type=int, choices=[20, 40],
                        help="bridge streaming.outboundFrameMs (default: the server's default, 40)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole sweep (each server in turn) N times and report the spread per point")
    parser.add_argument("--workers", help="sweep the bridge as serve.workers W with Redis, for each W (comma list)")
    parser.add_argument("--streams-per-worker", action="store_true",
                        help="with --workers: --streams counts are per worker (W=2 runs twice as many)")
    parser.add_argument("--generator", choices=["lean", "lean-python", "aiohttp"], default="lean",
                        help="load generator: lean (streams set up in Python, media in C: bench/lean_media.c, built on "
                             "demand; the Python one without a compiler), lean-python (raw asyncio sockets on uvloop), "
                             "aiohttp (the fake Twilio's client)")
    parser.add_argument("--json", action="store_true", help="also print the JSON on stdout")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the server during each window into DIR")
    parser.add_argument("--out", help="results file (default bench/results/media_streams.json)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds between the last stream up and the window")
    parser.add_argument("--tail", type=float, default=0.5,
                        help="seconds of talking after the window (pushes the window's last frames through the resamplers)")
    parser.add_argument("--drain", type=float, default=1.5, help="seconds to wait for echoes after the last frame")
    parser.add_argument("--split", choices=["separate", "shared"],
                        help="cores of the generator (see generator_cpu_for); default: shared with --workers, else separate")
    parser.add_argument("--skip-calibration", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [None]
    args.split = args.split or ("shared" if args.workers else "separate")
    if args.workers and (args.peer or args.only_peer):
        parser.error("--workers sweeps the bridge only; leave out --peer")

    args.engine = None
    if args.role == "main" and args.generator == "lean":
        from bench.lean_load import build_engine

        args.engine = build_engine(lambda line: print(line, file=sys.stderr, flush=True))
        data_generator = "lean (C engine)" if args.engine else "lean-python (no C engine)"
    else:
        data_generator = args.generator
    if args.role == "generator":
        from bench import lean_load  # noqa: F401 - imported while the server boots
        from tests.fakes import stream_load  # noqa: F401

        spec = json.loads(sys.stdin.readline() if args.spec == "-" else Path(args.spec).read_text())
        print(json.dumps(run_generator(spec)), flush=True)
        return 0

    data: dict[str, Any] = {"benchmark": "media_streams", "machine": machine(), "seconds": args.seconds,
                            "ramp_per_s": args.ramp, "late_ms": LATE_MS, "repeat": args.repeat,
                            "argv": sys.argv[1:], "generator": data_generator, "split": args.split, "sweeps": []}
    kinds = ([] if args.only_peer else ["bridge"]) + ([args.peer] if args.peer else [])
    data["versions"] = {"bridge": versions(MEDIA_LIBS)}
    if args.peer == "pipecat":
        data["versions"]["pipecat"] = versions(PEER_LIBS, args.pipecat_python)
    # Repeats alternate the servers, so each repeat's bridge/peer ratio comes from the same conditions.
    calibrations: dict[Any, dict[str, Any]] = {}
    for rep in range(args.repeat):
        for kind in kinds:
            for w in workers if kind == "bridge" else [None]:
                result = sweep(kind, args, w, calibrations)
                result["repeat"] = rep
                data["sweeps"].append(result)
    data["machine"]["loadavg_end"] = loadavg()
    for s in data["sweeps"]:
        print_sweep(s)
    ratios = []
    for rep in range(args.repeat):
        heads = {s["server"]: s["headline_streams"] for s in data["sweeps"] if s["repeat"] == rep}
        if "bridge" in heads and args.peer in heads:
            peer = heads[args.peer]
            ratios.append(heads["bridge"] / peer if peer else None)
            print(f"\nratio bridge/{args.peer}{f' (repeat {rep + 1})' if args.repeat > 1 else ''}: "
                  f"{heads['bridge']} / {peer} = {ratios[-1] if peer else 'n/a (peer headline is 0)'}")
    if ratios:
        data["ratio_bridge_to_peer"] = ratios[0] if args.repeat == 1 else ratios
    if args.workers:
        data["scaling"] = scaling(data["sweeps"])
        print_scaling(data["scaling"])
    if args.repeat > 1:
        data["spread"] = spread(data["sweeps"])
        print_spread(data["spread"])
    return finish("media_streams", data, args)


if __name__ == "__main__":
    sys.exit(main())
