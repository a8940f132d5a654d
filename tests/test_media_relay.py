"""AudioRelay on the fake clock: two real MediaPipelines (u-law and A-law legs); what one leg's
caller sends in 20 ms frames is what the other leg's carrier receives, transcoded and paced; the
bridge's own voice stops when the relay starts; nothing is relayed after `stop`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from media import g711
from media.clock import FakeClock
from media.formats import ALAW_8K, ULAW_8K, AudioFormat
from media.pipeline import MediaPipeline
from media.relay import AudioRelay

RATE = 8000
FRAME = RATE // 50  # samples in 20 ms


class Leg:
    """The carrier side of one call: records what the bridge sends (decoded) and when."""

    supports_marks = False

    def __init__(self, format: AudioFormat, clock: FakeClock) -> None:
        self.format = format
        self.clock = clock
        self.frames: list[tuple[float, bytes]] = []

    async def send_media(self, payload: bytes) -> None:
        self.frames.append((self.clock.monotonic(), g711.decode(payload, self.format.encoding)))

    async def send_mark(self, name: str) -> None:
        return None

    async def send_clear(self) -> None:
        return None

    def audio(self, since: float = -1.0) -> np.ndarray:
        pcm = b"".join(p for t, p in self.frames if t >= since)
        return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


class Quiet:
    def on_pipeline_audio(self, pcm: bytes) -> None:
        return None

    def on_dtmf(self, digit: str) -> None:
        return None

    def on_speech_started(self) -> None:
        return None


def tone(hz: float, seconds: float) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    return (8000 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def peak_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / RATE)[int(np.argmax(spectrum))])


async def caller_says(clock: FakeClock, pipeline: MediaPipeline, pcm: bytes) -> None:
    """Frames into the pipeline as a carrier sends them: 20 ms of audio per 20 ms of clock."""
    for offset in range(0, len(pcm), FRAME * 2):
        pipeline.receive(g711.encode(pcm[offset:offset + FRAME * 2], pipeline.wire.encoding))
        await clock.advance(0.02)


def make() -> tuple[FakeClock, MediaPipeline, MediaPipeline, Leg, Leg]:
    clock = FakeClock()
    leg_a, leg_b = Leg(ULAW_8K, clock), Leg(ALAW_8K, clock)
    a = MediaPipeline(leg_a, Quiet(), clock=clock, inband_dtmf=False, vad_barge_in=False, stall_timeout_s=None)
    b = MediaPipeline(leg_b, Quiet(), clock=clock, inband_dtmf=False, vad_barge_in=False, stall_timeout_s=None)
    return clock, a, b, leg_a, leg_b


async def test_each_side_hears_the_other_transcoded_and_in_real_time() -> None:
    clock, a, b, leg_a, leg_b = make()
    relay = AudioRelay(a, b, clock)
    relay.start()
    await caller_says(clock, a, tone(600, 1.0))  # the caller on leg a (u-law)
    await caller_says(clock, b, tone(1500, 1.0))  # the person on leg b (A-law)
    await clock.advance(0.2)
    heard_b, heard_a = leg_b.audio(), leg_a.audio()
    assert abs(peak_hz(heard_b) - 600) < 15 and abs(peak_hz(heard_a) - 1500) < 15
    assert 0.9 < len(heard_b) / RATE < 1.1 and 0.9 < len(heard_a) / RATE < 1.1
    # paced: a second of audio went out over a second of clock, not in a burst
    times = [t for t, _ in leg_b.frames]
    assert times[-1] - times[0] > 0.9
    assert relay.relayed_bytes[0] >= RATE * 2 * 0.95
    await relay.stop()
    await a.close()
    await b.close()


async def test_silence_on_the_line_adds_no_delay_and_keeps_the_relay_up() -> None:
    clock, a, b, _, leg_b = make()
    relay = AudioRelay(a, b, clock)
    relay.start()
    await caller_says(clock, a, tone(600, 0.4))
    await clock.advance(12.0)  # nobody speaks for longer than any stall guard
    resumed = clock.monotonic()
    await caller_says(clock, a, tone(900, 0.4))
    later = [t for t, _ in leg_b.frames if t >= resumed]
    assert later and later[0] - resumed <= 0.04, "relayed within two frames of arriving, not queued behind silence"
    assert abs(peak_hz(leg_b.audio(since=resumed)) - 900) < 15
    await relay.stop()
    await a.close()
    await b.close()


async def _long(seconds: float) -> AsyncIterator[bytes]:
    yield tone(300, seconds)


async def test_the_bridge_voice_stops_and_nothing_is_relayed_after_stop() -> None:
    clock, a, b, _, leg_b = make()
    speaking = asyncio.ensure_future(b.play(_long(5.0), RATE))
    await clock.advance(0.2)
    relay = AudioRelay(a, b, clock)
    relay.start()
    await clock.advance(0.02)
    result = await speaking
    assert result.interrupted and result.heard_ms < 400
    await caller_says(clock, a, tone(600, 0.2))
    await relay.stop()
    sent = len(leg_b.frames)
    await caller_says(clock, a, tone(600, 0.5))
    await clock.advance(0.5)
    assert len(leg_b.frames) == sent
    await a.close()
    await b.close()
