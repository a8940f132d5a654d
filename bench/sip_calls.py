"""SIP capacity: N concurrent sipp calls with audio both ways through the SIP front and its workers.

sipp (Debian `sip-tester`) places N calls at once, each streaming recorded speech in (RTP, PCMU),
while the bridge plays a tone out on every call. The bridge (this process, the SIP front) and its
pjsua2 worker processes are pinned to CPU 0, sipp to CPU 1. Reported per N: calls set up and torn
down cleanly, CPU of the bridge and its workers as % of one core, RSS, setup time INVITE -> first
audio frame, and whether the caller's audio arrived intact (median per-window correlation).

    python bench/sip_calls.py --calls 20,40,60,80 --hold 10
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, machine, pinned, rss_bytes, write_results  # noqa: E402
from bridge.calls import EventType  # noqa: E402
from carriers.sip.settings import SipSettings  # noqa: E402
from tests.peers.audio import pcm16, read_pcm, speech_wav, ulaw_wav, windowed_alignment  # noqa: E402
from tests.peers.harness import running_carrier, skip_reason  # noqa: E402
from tests.peers.host import RecordingBridge  # noqa: E402
from tests.peers.ports import bridge_rtp, bridge_sip, sipp_media, sipp_uac  # noqa: E402
from tests.peers.sipp import run_sipp  # noqa: E402

CALLS_PER_WORKER = 4  # the pjsua2-python wheel's PJSUA_MAX_CALLS
SERVER_CPU, LOAD_CPU = 0, 1


def _tone(seconds: float) -> bytes:
    import numpy as np

    t = np.arange(int(8000 * seconds)) / 8000
    return (np.sin(2 * np.pi * 400 * t) * 6000).astype("<i2").tobytes()


async def run_once(calls: int, hold_s: float, workdir: Path, caller_pcm: Path) -> dict[str, Any]:
    workers = math.ceil(calls / CALLS_PER_WORKER)
    settings = SipSettings(port=bridge_sip(), rtpPortStart=bridge_rtp(), rtpPortRange=max(100, calls * 4),
                           workers=workers)
    tone = _tone(hold_s + 1)
    async with running_carrier(settings) as (host, carrier):

        def play(bridge: RecordingBridge) -> None:
            host.spawn(bridge.play(tone))

        host.on_attach = play
        pids = [os.getpid(), *carrier.worker_pids()]
        t0, cpu0 = time.monotonic(), sum(cpu_seconds(p) for p in pids)
        result = await run_sipp(
            "uac_audio.xml", f"127.0.0.1:{settings.port}", workdir=workdir, local_port=sipp_uac(),
            media_port=sipp_media(), calls=calls, limit=calls, rate=100, hold_ms=int(hold_s * 1000),
            timeout_s=int(hold_s + 30), prefix=pinned(LOAD_CPU, []) or None,
        )
        wall = time.monotonic() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        rss = sum(rss_bytes(p) for p in pids)
        ended = await host.wait_for(EventType.ENDED, count=calls, timeout=10)
        reference, _ = read_pcm(caller_pcm)
        medians = [windowed_alignment(reference, pcm16(b.pcm))[0] for b in host.bridges.values()]
        stats = [carrier.leg_stats(e.provider_call_id or "") or {} for e in ended]
        setup = sorted(s["setupMs"] for s in stats if s.get("setupMs") is not None)
        peak = carrier.peak_concurrent_calls()
    return {
        "calls": calls, "workers": workers, "ok": result.ok, "peak_concurrent": peak,
        "ended": len(ended), "wall_s": round(wall, 2),
        "cpu_pct_one_core": round(100 * cpu / wall, 1), "cpu_pct_per_call": round(100 * cpu / wall / calls, 2),
        "rss_mb": round(rss / 2**20, 1),
        "setup_ms_p50": round(statistics.median(setup), 1) if setup else None,
        "setup_ms_max": round(setup[-1], 1) if setup else None,
        "audio_r_min": round(min(medians), 3) if medians else None,
        "audio_r_median": round(statistics.median(medians), 3) if medians else None,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="20,40", help="comma-separated concurrent call counts")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each call lasts")
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/sip_calls.json)")
    args = parser.parse_args()
    reason = skip_reason("sipp", "espeak-ng", "sox")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > SERVER_CPU:
        os.sched_setaffinity(0, {SERVER_CPU})  # the bridge and (inherited) its workers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        caller = speech_wav(Path(tmp) / "caller.wav", "one two three four five", pad_s=0.1)
        ulaw = ulaw_wav(caller, Path(tmp) / "audio_ulaw.wav")
        for calls in [int(n) for n in args.calls.split(",")]:
            workdir = Path(tmp) / f"n{calls}"
            workdir.mkdir()
            (workdir / "audio_ulaw.wav").write_bytes(ulaw.read_bytes())
            row = await run_once(calls, args.hold, workdir, caller)
            rows.append(row)
            print(
                f"{row['calls']:>4} calls {row['workers']:>3} workers  ok={row['ok']!s:5} peak={row['peak_concurrent']:>4}"
                f"  CPU {row['cpu_pct_one_core']:>5}% of a core ({row['cpu_pct_per_call']}%/call)"
                f"  RSS {row['rss_mb']} MB  setup p50 {row['setup_ms_p50']} ms max {row['setup_ms_max']} ms"
                f"  audio r min {row['audio_r_min']}",
                flush=True,
            )
    path = write_results("sip_calls", {"machine": machine(), "hold_s": args.hold, "rows": rows}, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
