"""Per-frame CPU cost of the media paths (µs per 20 ms frame), measured on this machine.

    python bench/media_frame_cost.py [seconds-of-audio]

Every row is the best of 5 runs (of a fifth of the audio each): the figure that repeats on a shared machine.

Inbound:  MediaPipeline.receive (reorder, u-law decode, 8k->16k stream resample, listener call,
          in-band DTMF detector, VAD) with a no-op listener, in its configurations.
Outbound: MediaPipeline.play of 24 kHz PCM (OpenAI TTS rate) -> 8 kHz u-law frames through the whole
          coroutine (resample, encode, frame, pacer, send_media) on a FakeClock moved from timer to timer
          whenever no task is ready, so waiting costs nothing and only CPU is counted; one play, and
          100 at once (phases spread over 20 ms), where one timer can serve many calls.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media import g711  # noqa: E402
from media.clock import FakeClock  # noqa: E402
from media.formats import ULAW_8K  # noqa: E402
from media.frames import Framer  # noqa: E402
from media.pipeline import MediaPipeline  # noqa: E402
from media.resample import StreamResampler  # noqa: E402


class NullListener:
    def on_pipeline_audio(self, pcm: bytes) -> None: ...
    def on_dtmf(self, digit: str) -> None: ...
    def on_speech_started(self) -> None: ...


class WireListener(NullListener):
    """A call whose STT takes the carrier's payloads as they are (OpenAI Realtime/Deepgram with G.711)."""

    wants_pipeline_audio = False

    def on_wire_audio(self, payload: bytes, format: object) -> None: ...


class NullLeg:
    format = ULAW_8K
    supports_marks = False

    async def send_media(self, payload: bytes) -> None: ...
    async def send_mark(self, name: str) -> None: ...
    async def send_clear(self) -> None: ...


class NullStreamLeg(NullLeg):
    """A carrier media stream (Twilio/Telnyx/Plivo): it reports key presses itself."""

    reports_dtmf = True


def speechlike(rate: int, secs: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * secs)) / rate
    x = 4000 * np.sign(np.sin(2 * np.pi * 140 * t)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + rng.normal(0, 300, len(t))
    return np.clip(x, -32768, 32767).astype("<i2")


def inbound(secs: float, leg: type[NullLeg] = NullLeg, listener: type[NullListener] = NullListener,
            **kw: bool) -> float:
    """Best of 5 runs of secs/5 each (a fresh pipeline each): on a shared machine the minimum is the figure that repeats."""
    part = max(1.0, secs / 5)
    frames = [g711.encode(f.tobytes(), ULAW_8K.encoding) for f in np.split(speechlike(8000, part)[: int(part * 50) * 160], int(part * 50))]
    best = float("inf")
    for _ in range(5):
        bridge = MediaPipeline(leg(), listener(), **kw)  # type: ignore[arg-type]
        t = time.process_time()  # CPU time: the figure holds on a busy machine too
        for seq, f in enumerate(frames):
            bridge.receive(f, seq)
        best = min(best, (time.process_time() - t) / len(frames) * 1e6)
    return best


def twilio_messages(secs: float) -> tuple[float, float]:
    """One inbound `media` message parsed (JSON, checks, base64) / one outbound 40 ms message built."""
    import base64
    import json

    from carriers.twilio.protocol import TwilioStreamCodec

    sid = "MZ" + "0" * 32
    codec = TwilioStreamCodec()
    codec.parse(json.dumps({"event": "start", "streamSid": sid,
                            "start": {"callSid": "CA1", "streamSid": sid, "customParameters": {"token": "t"}}}))
    frames = [json.dumps({"event": "media", "sequenceNumber": str(k + 2), "streamSid": sid,
                          "media": {"track": "inbound", "chunk": str(k + 1), "timestamp": str(k * 20),
                                    "payload": base64.b64encode(f).decode()}})
              for k, f in enumerate(g711.encode(speechlike(8000, 1).tobytes(), ULAW_8K.encoding)[i : i + 160]
                                    for i in range(0, 8000, 160))]
    global _FRAMES
    _FRAMES = (codec, frames)
    # the same frames byte for byte as Twilio writes them: read without the JSON parser (wire.MediaLayout)
    own = ['{"event":"media","sequenceNumber":"' + str(k + 2) + '","media":{"track":"inbound","chunk":"' + str(k + 1)
           + '","timestamp":"' + str(k * 20) + '","payload":"' + json.loads(f)["media"]["payload"]
           + '"},"streamSid":"' + sid + '"}' for k, f in enumerate(frames)]
    global _OWN
    _OWN = own
    n = int(secs * 10)  # best of 5 runs of secs/5 each: these are ~us, a shared machine's noise is not
    parse = parse_own = build = float("inf")
    out = bytes(320)
    for _ in range(5):
        t = time.perf_counter()
        for k in range(n):
            codec.parse(frames[k % 50])
        parse = min(parse, (time.perf_counter() - t) / n * 1e6)
        t = time.perf_counter()
        for k in range(n):
            codec.parse(own[k % 50])
        parse_own = min(parse_own, (time.perf_counter() - t) / n * 1e6)
        t = time.perf_counter()
        for _ in range(n):
            codec.encode_media(out)
        build = min(build, (time.perf_counter() - t) / n * 1e6)
    return parse, parse_own, build


_FRAMES: tuple[object, list[str]] | None = None
_OWN: list[str] = []


def outbound_builds(secs: float) -> list[tuple[str, float]]:
    """One outbound 40 ms media message built by the Telnyx and Plivo codecs (best of 5)."""
    from carriers.plivo.protocol import PlivoStreamCodec
    from carriers.telnyx.protocol import TelnyxStreamCodec

    out = bytes(320)
    n = int(secs * 10)
    rows = []
    for name, codec in (("Telnyx", TelnyxStreamCodec()), ("Plivo", PlivoStreamCodec())):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                codec.encode_media(out)
            best = min(best, (time.perf_counter() - t) / n * 1e6)
        rows.append((f"outbound {name} media message (40 ms): build", best))
    return rows


def stream_inbound(secs: float, own_layout: bool = False) -> float:
    """What the stream handler does per inbound Twilio message outside aiohttp: depth gate, parse,
    MediaPipeline.receive on a carrier stream leg (best of 5)."""
    from bridge.streams import _parse
    from carriers.base import StreamMedia

    assert _FRAMES is not None
    codec, frames = _FRAMES
    if own_layout:
        frames = _OWN
    bridge = MediaPipeline(NullStreamLeg(), NullListener(), inband_dtmf=False)  # type: ignore[arg-type]
    n = int(secs * 10)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for k in range(n):
            msg = _parse(codec, frames[k % 50])  # type: ignore[arg-type]
            assert isinstance(msg, StreamMedia)
            bridge.receive(msg.payload)
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def outbound_codec_only(secs: float) -> float:
    pcm = speechlike(24000, max(1.0, secs / 5)).tobytes()
    best = float("inf")
    for _ in range(5):  # best of 5, as above
        r = StreamResampler(24000, 8000)
        fr = Framer(160, 0xFF)
        n = 0
        t = time.perf_counter()
        for i in range(0, len(pcm), 960):
            n += len(fr.push(g711.encode(r.process(pcm[i : i + 960]), ULAW_8K.encoding)))
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def resample_only(secs: float, a: int, b: int, chunk_ms: int) -> float:
    """StreamResampler.process alone, fed `chunk_ms` chunks: µs per 20 ms of audio (best of 5)."""
    pcm = speechlike(a, max(1.0, secs / 5)).tobytes()
    step = a * chunk_ms // 1000 * 2
    best = float("inf")
    for _ in range(5):
        r = StreamResampler(a, b)
        t = time.process_time()
        for i in range(0, len(pcm), step):
            r.process(pcm[i : i + step])
        best = min(best, (time.process_time() - t) / (len(pcm) / 2 / a * 50) * 1e6)
    return best


async def run_clock(clock: FakeClock, until: asyncio.Future[object]) -> None:
    """Move `clock` from timer to timer whenever no task is ready, like an event loop with nothing
    to do but wait for its next timer (only CPU is counted, no time is slept)."""
    loop = asyncio.get_running_loop()
    ready = loop._ready  # type: ignore[attr-defined]  # CPython's asyncio loop: its ready callbacks
    while not until.done():
        await asyncio.sleep(0)
        if not ready:
            due = clock.next_at
            if due is not None:
                clock._fire_until(due)  # noqa: SLF001 - fire the due timers without a loop turn per timer


async def outbound_plays(secs: float, streams: int = 1) -> float:
    """CPU per outbound message of `streams` plays at once on one clock (phases spread over 20 ms)."""
    pcm = speechlike(24000, max(1.0, secs / 5)).tobytes()

    async def chunks(offset: float, clock: FakeClock) -> AsyncIterator[bytes]:
        await clock.sleep(offset)
        for i in range(0, len(pcm), 4800):  # 100 ms TTS chunks
            yield pcm[i : i + 4800]

    best = float("inf")
    rounds = 5 if streams == 1 else 3
    for _ in range(rounds):  # best of 5 (3), as above
        clock = FakeClock()
        bridges = [MediaPipeline(NullLeg(), NullListener(), clock=clock) for _ in range(streams)]  # type: ignore[arg-type]
        t = time.process_time()  # CPU time: the figure holds on a busy machine too
        plays = asyncio.gather(*(b.play(chunks(0.02 * k / streams, clock), 24000) for k, b in enumerate(bridges)))
        await run_clock(clock, plays)
        results = plays.result()
        best = min(best, (time.process_time() - t) / sum(r.frames_sent for r in results) * 1e6)
    return best


def main() -> None:
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    rows = [
        ("inbound  receive: decode+resample only", inbound(secs, inband_dtmf=False, vad_barge_in=False)),
        ("inbound  receive: + VAD", inbound(secs, inband_dtmf=False, vad_barge_in=True)),
        ("inbound  receive: + VAD + in-band DTMF (SIP default)", inbound(secs)),
        ("inbound  receive, carrier stream leg (default: no DTMF)", inbound(secs, NullStreamLeg)),
        ("inbound  the same, STT takes the wire (no pipeline copy)", inbound(secs, NullStreamLeg, WireListener)),
        ("inbound  resample only 8k->16k (20 ms chunks)", resample_only(secs, 8000, 16000, 20)),
        ("outbound resample only 16k->8k (100 ms chunks)", resample_only(secs, 16000, 8000, 100)),
        ("outbound resample only 24k->8k (100 ms chunks)", resample_only(secs, 24000, 8000, 100)),
        ("outbound resample 24k->8k + u-law + framing", outbound_codec_only(secs)),
        ("outbound MediaPipeline.play, whole coroutine", asyncio.run(outbound_plays(secs))),
        ("outbound the same, 100 plays at once on one clock", asyncio.run(outbound_plays(secs, 100))),
    ]
    parse, parse_own, build = twilio_messages(secs)
    rows += [("inbound  Twilio media message: parse (JSON+base64)", parse),
             ("inbound  the same in Twilio's own layout (no JSON parser)", parse_own),
             ("outbound Twilio media message (40 ms): build", build),
             *outbound_builds(secs),
             ("inbound  stream handler: depth gate + parse + receive", stream_inbound(secs)),
             ("inbound  the same, frames in Twilio's own layout", stream_inbound(secs, own_layout=True))]
    print(f"{secs:.0f} s of audio, 20 ms frames, Python {sys.version.split()[0]}")
    for name, us in rows:
        print(f"  {name:<52} {us:7.1f} µs/frame  ({us / 200:.3f}% of a core per call)")


if __name__ == "__main__":
    main()
