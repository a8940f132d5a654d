"""Many Twilio Media Streams at once: a load generator built on the fake Twilio's
`TwilioMediaStreamClient` (same frames, same cadence, same mark echo), used by turn_overhead and
voice_to_voice and by `media_streams.py --generator aiohttp` (media_streams' default is the much
cheaper bench/lean_load.py, which shares the helpers below), plus what a benchmark needs on top of it:

- `LoadStreamClient`: a cheap mode for hundreds of streams. Instead of keeping every payload it
  heard, it keeps only (receive time, cumulative byte position) per media message, which is enough
  to match each frame it sent with its echo by position in the audio stream (the bridge's resamplers
  are delay-compensated, so output sample i is input sample i; pipecat's soxr streams too).
- `inbound_stream`: the real way a stream gets its token: a SIGNED inbound voice webhook, whose
  TwiML answer carries the `<Stream url>` and its `<Parameter>`s.
- `run_streams`: open N streams gradually (ramp), drive them all from one 20 ms metronome
  (`pace_streams`), then stop them; everything bounded in time.
- `round_trips` / `added_latency`: per-frame round trip, and the part of it a loaded server added
  over an unloaded baseline of the same frame index.
"""

from __future__ import annotations

import asyncio
import bisect
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.fakes.audio import fake_speech
from tests.fakes.twilio_server import (
    FRAME_BYTES,
    FRAME_MS,
    TwilioMediaStreamClient,
    sid,
    twilio_sign,
)


class LoadStreamClient(TwilioMediaStreamClient):
    """A `TwilioMediaStreamClient` paced by a shared metronome that records receive positions, not audio."""

    def __init__(self, url: str, *, keep_audio: bool = False, **kwargs: Any) -> None:
        super().__init__(url, keep_audio=keep_audio, self_paced=False, **kwargs)
        self.recv_times: list[float] = []  # time.monotonic() of each media message heard
        self.recv_ends: list[int] = []  # byte position in the heard stream where that message ends
        self.heard_bytes = 0
        self.opened_at = 0.0

    def _on_media(self, payload: bytes) -> None:
        if self.keep_audio:
            super()._on_media(payload)
        else:
            self.frames_received += 1
        self.heard_bytes += len(payload)
        self.recv_times.append(time.monotonic())  # comparable across processes (and loops)
        self.recv_ends.append(self.heard_bytes)

    def queue_audio(self, frames: Sequence[bytes], count: int) -> None:
        """Queue `count` caller frames, cycling through `frames` (shared objects: cheap for many streams)."""
        reps = -(-count // max(1, len(frames)))
        self._outbox.extend((list(frames) * reps)[:count])
        if self._outbox:
            self._outbox_empty.clear()


def caller_frames(seconds: float = 4.0, seed: int = 7) -> list[bytes]:
    """A few seconds of tone 'speech' as 20 ms u-law frames (varies every 20 ms: easy to align)."""
    import numpy as np

    from media import g711
    from media.formats import AudioEncoding

    rng = np.random.default_rng(seed)
    text = "".join(chr(int(c)) for c in rng.integers(33, 126, int(seconds * 50)))
    ulaw = g711.encode(fake_speech(text, 8000), AudioEncoding.PCMU)
    return [ulaw[i:i + FRAME_BYTES] for i in range(0, len(ulaw) - FRAME_BYTES + 1, FRAME_BYTES)]


# ---------------------------------------------------------------------- how a stream gets its URL


@dataclass(slots=True)
class StreamTarget:
    url: str
    parameters: dict[str, str] = field(default_factory=dict)
    call_sid: str | None = None
    account_sid: str | None = None


def twiml_stream(document: str) -> StreamTarget:
    """The `<Connect><Stream>` of a TwiML answer (ValueError if there is none)."""
    root = ET.fromstring(document)
    stream = root.find("./Connect/Stream")
    if stream is None:
        raise ValueError(f"no <Connect><Stream> in the answer: {document[:200]}")
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return StreamTarget(stream.get("url", ""), params)


async def inbound_stream(session: aiohttp.ClientSession, voice_url: str, *, auth_token: str, account_sid: str,
                         from_: str = "+15550009999", to: str = "+15550001234") -> StreamTarget:
    """What Twilio does when someone dials the number: a signed inbound webhook; returns the stream it was told to open."""
    call_sid = sid("CA")
    params = {"AccountSid": account_sid, "ApiVersion": "2010-04-01", "CallSid": call_sid, "CallStatus": "ringing",
              "Direction": "inbound", "From": from_, "To": to, "Caller": from_, "Called": to}
    headers = {"X-Twilio-Signature": twilio_sign(auth_token, voice_url, params),
               "I-Twilio-Idempotency-Token": secrets.token_hex(8)}
    async with session.post(voice_url, data=params, headers=headers) as resp:
        body = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"inbound webhook answered HTTP {resp.status}: {body[:200]}")
    target = twiml_stream(body)
    target.call_sid, target.account_sid = call_sid, account_sid
    return target


# ---------------------------------------------------------------------- running N streams


@dataclass(slots=True)
class LoadRun:
    clients: list[LoadStreamClient]
    failed: list[str]  # why streams could not be opened
    window: tuple[float, float]  # time.monotonic(): measurement starts once all streams are up
    tick_lag_ms: list[float]  # how late each metronome tick started (generator health)
    tick_ms: list[float]  # how long one tick (over 1/phases of the streams) took



async def open_ramped(n: int, ramp_per_s: float, open_one: Callable[[int], Awaitable[None]]) -> None:
    """Start opening streams 0..n-1 at `ramp_per_s` per second; return when every open has ended."""
    opens = []
    for i in range(n):
        opens.append(asyncio.ensure_future(open_one(i)))
        await asyncio.sleep(1 / ramp_per_s)
    await asyncio.gather(*opens)


async def measure_window(seconds: float, on_window: Callable[[str], None] | None,
                         now: Callable[[], float]) -> tuple[float, float]:
    """The measurement window: `seconds` long, announced to `on_window` ("start", "end"); its (start, end)."""
    w0 = now()
    if on_window:
        on_window("start")
    await asyncio.sleep(seconds)
    w1 = now()
    if on_window:
        on_window("end")
    return w0, w1


async def run_streams(
    target: Callable[[aiohttp.ClientSession], Awaitable[StreamTarget]],
    n: int,
    *,
    seconds: float,
    ramp_per_s: float = 100.0,
    warmup_s: float = 1.0,
    drain_s: float = 1.5,
    tail_s: float = 0.5,
    connect_concurrency: int = 4,
    keep_audio_first: bool = False,
    phases: int = 4,
    frames: Sequence[bytes] | None = None,
    on_window: Callable[[str], None] | None = None,
    one_connection_per_call: bool = False,
) -> LoadRun:
    """Open `n` streams at `ramp_per_s`, all sending real-time frames from one metronome; measure for
    `seconds` once the last one is up (after `warmup_s`); keep sending for `tail_s`, then stop, wait `drain_s` for the
    echoes, and close every stream. `on_window("start"|"end")` marks the measurement window.
    The metronome ticks every 20/`phases` ms, each time for every `phases`-th stream.
    `one_connection_per_call`: each call's webhook and its stream go over one keep-alive connection,
    so with several server processes on one port (SO_REUSEPORT) both reach the same process."""
    frames = list(frames or caller_frames())
    clients: list[LoadStreamClient] = []
    failed: list[str] = []
    lifetime = n / ramp_per_s + warmup_s + seconds + 2.0
    per_stream = int(lifetime * 1000 / FRAME_MS) + 50
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    session = aiohttp.ClientSession(connector=connector)
    call_sessions: list[aiohttp.ClientSession] = []
    sem = asyncio.Semaphore(connect_concurrency)
    tick_lag: list[float] = []
    tick_ms: list[float] = []
    stop_ticks = asyncio.Event()

    async def open_one(i: int) -> None:
        async with sem:
            try:
                async with asyncio.timeout(10):
                    own = session
                    if one_connection_per_call:
                        own = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                        call_sessions.append(own)
                    t = await target(own)
                    client = LoadStreamClient(t.url, parameters=t.parameters, call_sid=t.call_sid,
                                              account_sid=t.account_sid, session=own,
                                              keep_audio=keep_audio_first and i == 0)
                    client.queue_audio(frames, per_stream)
                    await client.connect()
                    client.opened_at = time.monotonic()
                    clients.append(client)  # the metronome picks it up at its next tick
            except Exception as exc:  # noqa: BLE001 - a benchmark counts failures, it does not stop on one
                failed.append(f"{type(exc).__name__}: {exc}"[:200])

    async def metronome() -> None:
        # Real streams are not in phase with each other: stream i sends at phase (i % phases) of
        # the 20 ms cycle, so the server gets N/phases frames every 20/phases ms, not N at once.
        step = FRAME_MS / 1000 / phases
        start = time.monotonic()
        k = 0
        while not stop_ticks.is_set():
            began = time.monotonic()
            tick_lag.append((began - (start + k * step)) * 1000)
            for client in clients[k % phases::phases]:
                await client.tick()
            tick_ms.append((time.monotonic() - began) * 1000)
            k += 1
            delay = start + k * step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.2:  # hopelessly behind: re-base rather than burst
                start, k = time.monotonic(), 0

    ticker = asyncio.ensure_future(metronome())
    try:
        await open_ramped(n, ramp_per_s, open_one)
        await asyncio.sleep(warmup_s)
        lag_mark = len(tick_lag)
        w0, w1 = await measure_window(seconds, on_window, time.monotonic)
        tick_lag[:] = tick_lag[lag_mark:]
        tick_ms[:] = tick_ms[lag_mark:]
        # Keep talking a little: the echo of the window's last frames sits in the resamplers until
        # more audio pushes it through (soxr works in ~100 ms blocks).
        await asyncio.sleep(tail_s)
        stop_ticks.set()
        await ticker
        await asyncio.sleep(drain_s)
    finally:
        stop_ticks.set()
        ticker.cancel()
        await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        await asyncio.gather(*(s.close() for s in call_sessions), return_exceptions=True)
        await session.close()
    return LoadRun(clients, failed, (w0, w1), tick_lag, tick_ms)


# ---------------------------------------------------------------------- matching frames with their echo


def round_trips(client: LoadStreamClient, window: tuple[float, float],
                frame_bytes: int = FRAME_BYTES) -> tuple[dict[int, float], int]:
    """Round trip (ms) of each media frame sent inside `window`, keyed by its index in the stream,
    and how many of those frames never came back. Frame k is back when the echoed stream has
    reached byte (k + 1) * frame_bytes (the echo is sample-aligned with what was sent)."""
    rtt: dict[int, float] = {}
    lost = 0
    w0, w1 = window
    ends, times = client.recv_ends, client.recv_times
    for k, sent in enumerate(client.sent_at):
        if sent < w0 or sent >= w1:
            continue
        i = bisect.bisect_left(ends, (k + 1) * frame_bytes)
        if i >= len(ends):
            lost += 1
        else:
            rtt[k] = (times[i] - sent) * 1000
    return rtt, lost


def baseline(clients: Sequence[LoadStreamClient], frame_bytes: int = FRAME_BYTES) -> list[float]:
    """Per frame index: the smallest round trip any of these (unloaded) streams saw. The echo's own
    buffering (soxr releases ~100 ms blocks, pacing lead) depends only on the frame's position in
    its stream, so this is what an idle server takes for frame k."""
    best: list[float] = []
    for client in clients:
        rtt, _ = round_trips(client, (float("-inf"), float("inf")), frame_bytes)
        for k, ms in rtt.items():
            while len(best) <= k:
                best.append(float("inf"))
            best[k] = min(best[k], ms)
    return best


def added_latency(rtt: dict[int, float], base: Sequence[float]) -> list[float]:
    """Round trip minus the idle server's round trip for the same frame index (frames beyond the
    baseline's length are skipped)."""
    return [ms - base[k] for k, ms in rtt.items() if k < len(base) and base[k] != float("inf")]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def now() -> float:
    return time.monotonic()
