"""The local bridge of a warm transfer (media/relay.py): CPU per relayed 20 ms frame, beside its
peers in the same run, and how long a frame waits in the relay.

    python bench/relay_cost.py [--seconds 20] [--out FILE]

Both legs are u-law 8 kHz MediaPipelines over null carrier legs, on a fake clock advanced 20 ms per
frame, so only CPU is counted (no sleeping). Rows:
- inbound only: caller frames into one pipeline (decode, VAD, resample), nobody listening: the
  cost every call pays anyway;
- play (TTS out): the same seconds of 16 kHz PCM played out through the pipeline (resample, encode,
  pace): what the bridge's own voice costs;
- relay, both ways: frames into both pipelines, each side's audio played to the other (per frame
  relayed, inbound included).
Delay: clock time from a frame's arrival at one leg to its audio leaving on the other.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import loadavg, machine, table, write_results  # noqa: E402
from media import g711  # noqa: E402
from media.clock import FakeClock  # noqa: E402
from media.formats import ULAW_8K  # noqa: E402
from media.pipeline import MediaPipeline  # noqa: E402
from media.relay import AudioRelay  # noqa: E402

FRAME = 160  # samples in 20 ms at 8 kHz


class Quiet:
    def on_pipeline_audio(self, pcm: bytes) -> None: ...
    def on_dtmf(self, digit: str) -> None: ...
    def on_speech_started(self) -> None: ...


class Leg:
    format = ULAW_8K
    supports_marks = False
    reports_dtmf = True

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[float] = []

    async def send_media(self, payload: bytes) -> None:
        self.sent.append(self.clock.monotonic())

    async def send_mark(self, name: str) -> None: ...
    async def send_clear(self) -> None: ...


def speech_like(seconds: float, hz: float) -> bytes:
    t = np.arange(int(8000 * seconds)) / 8000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)  # syllable-rate loudness changes
    return (6000 * envelope * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def pipeline(clock: FakeClock) -> tuple[MediaPipeline, Leg]:
    leg = Leg(clock)
    return MediaPipeline(leg, Quiet(), clock=clock, stall_timeout_s=None), leg


async def inbound_only(seconds: float) -> float:
    clock = FakeClock()
    a, _ = pipeline(clock)
    frames = [g711.encode(chunk, ULAW_8K.encoding) for chunk in _chunks(speech_like(seconds, 300))]
    start = time.process_time()
    for frame in frames:
        a.receive(frame)
        await clock.advance(0.02)
    spent = time.process_time() - start
    await a.close()
    return spent / len(frames) * 1e6


async def play_out(seconds: float) -> float:
    clock = FakeClock()
    a, leg = pipeline(clock)
    pcm16k = np.repeat(np.frombuffer(speech_like(seconds, 300), dtype="<i2"), 2).tobytes()

    async def source() -> AsyncIterator[bytes]:
        for offset in range(0, len(pcm16k), 640 * 5):
            yield pcm16k[offset:offset + 640 * 5]

    start = time.process_time()
    play = asyncio.ensure_future(a.play(source(), 16000))
    while not play.done():
        await clock.advance(0.02)
    spent = time.process_time() - start
    await a.close()
    return spent / max(1, len(leg.sent)) * 1e6


async def relay_both_ways(seconds: float) -> tuple[float, list[float]]:
    clock = FakeClock()
    a, leg_a = pipeline(clock)
    b, leg_b = pipeline(clock)
    relay = AudioRelay(a, b, clock)
    relay.start()
    frames_a = [g711.encode(c, ULAW_8K.encoding) for c in _chunks(speech_like(seconds, 300))]
    frames_b = [g711.encode(c, ULAW_8K.encoding) for c in _chunks(speech_like(seconds, 700))]
    arrivals: list[float] = []
    start = time.process_time()
    for frame_a, frame_b in zip(frames_a, frames_b):
        arrivals.append(clock.monotonic())
        a.receive(frame_a)
        b.receive(frame_b)
        await clock.advance(0.02)
    await clock.advance(0.2)
    spent = time.process_time() - start
    relayed = len(leg_a.sent) + len(leg_b.sent)
    delays = [(sent - arrived) * 1000 for sent, arrived in zip(leg_b.sent, arrivals)]
    await relay.stop()
    await a.close()
    await b.close()
    return spent / max(1, relayed) * 1e6, delays


def _chunks(pcm: bytes) -> list[bytes]:
    return [pcm[i:i + FRAME * 2] for i in range(0, len(pcm) - FRAME * 2 + 1, FRAME * 2)]


async def run(seconds: float) -> dict[str, Any]:
    inbound = await inbound_only(seconds)
    play = await play_out(seconds)
    relay, delays = await relay_both_ways(seconds)
    return {"seconds": seconds, "inbound_us": round(inbound, 1), "play_us": round(play, 1),
            "relay_us": round(relay, 1), "relay_vs_inbound_plus_play": round(relay / (inbound + play), 2),
            "delay_ms_p50": round(float(np.percentile(delays, 50)), 1),
            "delay_ms_p95": round(float(np.percentile(delays, 95)), 1),
            "delay_ms_max": round(float(max(delays)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of audio per row")
    parser.add_argument("--out", help="results JSON (default bench/results/relay_cost.json)")
    args = parser.parse_args()
    result = asyncio.run(run(args.seconds))
    print(table(["path", "µs per 20 ms frame"], [["inbound only", result["inbound_us"]],
                                                  ["play (TTS out)", result["play_us"]],
                                                  ["relay, per relayed frame", result["relay_us"]]]))
    print(f"relay / (inbound + play): {result['relay_vs_inbound_plus_play']}; delay arrival -> sent on the "
          f"other leg: p50 {result['delay_ms_p50']} ms, p95 {result['delay_ms_p95']} ms, "
          f"max {result['delay_ms_max']} ms; load1 {loadavg()[0]}")
    path = write_results("relay_cost", {"benchmark": "relay_cost", "machine": machine(), **result,
                                        "loadavg_end": loadavg()}, args.out)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
