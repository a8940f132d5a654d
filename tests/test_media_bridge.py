"""MediaBridge over a loopback carrier that plays frames in real time, like Twilio/Telnyx do.

The loopback keeps the carrier's playout buffer: each frame starts playing when the previous one
ends (or on arrival if the buffer ran dry), `clear` drops what has not started, and a mark is
echoed when everything queued before it has played. What the "caller" heard is reconstructed from
that timeline and measured against the source audio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import soxr

from media import g711
from media.bridge import MediaBridge, PlaybackResult, heard_text
from media.dtmf import dtmf_tones
from media.formats import ALAW_8K, ULAW_8K, AudioEncoding, AudioFormat
from media.tts.espeak import EspeakTts

pytestmark = pytest.mark.skipif(not EspeakTts.available(), reason="espeak-ng not installed")

DT = 0.02


@dataclass
class Played:
    payload: bytes
    sent: float
    start: float


@dataclass
class LoopbackCarrier:
    format: AudioFormat = ULAW_8K
    supports_marks: bool = True
    bridge: MediaBridge | None = None
    frames: list[Played] = field(default_factory=list)
    cleared: list[tuple[float, int]] = field(default_factory=list)  # (time, frames dropped)
    marks_sent: list[tuple[float, str]] = field(default_factory=list)
    marks_echoed: list[tuple[float, str]] = field(default_factory=list)
    echo_marks: bool = True
    _busy_until: float = 0.0

    async def send_media(self, payload: bytes) -> None:
        assert len(payload) == self.format.frame_bytes, "carrier got a frame that is not 20 ms"
        now = time.monotonic()
        start = max(now, self._busy_until)
        self._busy_until = start + DT
        self.frames.append(Played(payload, now, start))

    async def send_mark(self, name: str) -> None:
        now = time.monotonic()
        self.marks_sent.append((now, name))
        if not self.echo_marks:
            return
        loop = asyncio.get_running_loop()

        def echo() -> None:
            self.marks_echoed.append((time.monotonic(), name))
            assert self.bridge is not None
            self.bridge.on_mark(name)

        loop.call_later(max(0.0, self._busy_until - now), echo)

    async def send_clear(self) -> None:
        now = time.monotonic()
        kept = [f for f in self.frames if f.start <= now]
        self.cleared.append((now, len(self.frames) - len(kept)))
        self.frames = kept
        self._busy_until = min(self._busy_until, now + DT)

    def buffered_at(self, t: float) -> int:
        """Frames queued at the carrier (sent, not yet started) at time t."""
        return sum(1 for f in self.frames if f.sent <= t < f.start)

    def heard_pcm(self) -> np.ndarray:
        """What the caller heard, on the playout timeline (gaps filled with silence)."""
        if not self.frames:
            return np.zeros(0)
        t0 = self.frames[0].start
        n = self.format.frame_bytes // self.format.bytes_per_sample
        end = round((self.frames[-1].start - t0) / DT) + 1
        out = np.zeros(end * n)
        for f in self.frames:
            k = round((f.start - t0) / DT)
            out[k * n : (k + 1) * n] = np.frombuffer(g711.decode(f.payload, self.format.encoding), dtype="<i2")
        return out


class Listener:
    def __init__(self) -> None:
        self.audio = bytearray()
        self.digits: list[str] = []
        self.speech_started: list[float] = []

    def on_pipeline_audio(self, pcm: bytes) -> None:
        self.audio += pcm

    def on_dtmf(self, digit: str) -> None:
        self.digits.append(digit)

    def on_speech_started(self) -> None:
        self.speech_started.append(time.monotonic())


def make(fmt: AudioFormat = ULAW_8K, **kw: object) -> tuple[MediaBridge, LoopbackCarrier, Listener]:
    carrier = LoopbackCarrier(format=fmt)
    listener = Listener()
    bridge = MediaBridge(carrier, listener, **kw)  # type: ignore[arg-type]
    carrier.bridge = bridge
    return bridge, carrier, listener


async def tee(source: AsyncIterator[bytes], into: bytearray) -> AsyncIterator[bytes]:
    async for chunk in source:
        into += chunk
        yield chunk


def aligned_correlation(heard: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    """Pearson correlation of `heard` against `ref` at the best lag (via FFT cross-correlation)."""
    n = len(heard) + len(ref)
    size = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(heard, size) * np.conj(np.fft.rfft(ref, size)), size)
    lag = int(np.argmax(xc))
    if lag > size // 2:
        lag -= size
    a = heard[max(0, lag) :]
    b = ref[max(0, -lag) :]
    m = min(len(a), len(b))
    return float(np.corrcoef(a[:m], b[:m])[0, 1]), lag


async def speak(bridge: MediaBridge, text: str, **kw: object) -> tuple[PlaybackResult, np.ndarray, float]:
    tts = EspeakTts()
    src = bytearray()
    t = time.monotonic()
    result = await bridge.play(tee(tts.synthesize(text), src), tts.sample_rate, **kw)  # type: ignore[arg-type]
    elapsed = time.monotonic() - t
    return result, np.frombuffer(bytes(src), dtype="<i2").astype(float), elapsed


L16_16K = AudioFormat(AudioEncoding.L16, 16000)


@pytest.mark.parametrize("fmt", [ULAW_8K, ALAW_8K, L16_16K], ids=["pcmu", "pcma", "l16-16k"])
async def test_espeak_loopback_correlates_and_keeps_every_frame(fmt: AudioFormat) -> None:
    bridge, carrier, _ = make(fmt)
    result, src, elapsed = await speak(bridge, "Hello, this is the voice bridge calling.")
    heard = carrier.heard_pcm()
    ref = soxr.resample(src.astype(np.int16), 22050, fmt.rate, quality="HQ").astype(float)
    corr, lag = aligned_correlation(heard, ref)
    src_s = len(src) / 22050
    print(f"\n{fmt.encoding}/{fmt.rate}: corr {corr:.4f} lag {lag} samples, {len(carrier.frames)} frames, "
          f"source {src_s * 1000:.0f} ms, heard {len(heard) / fmt.rate * 1000:.0f} ms, underruns {bridge.stats.underruns}")
    assert corr >= 0.95
    assert abs(lag) <= 8  # within 1 ms: the bridge adds no offset
    assert result.completed and not result.interrupted
    # No missing frame: frames tile the timeline without gaps (mark/pacing), and the count matches.
    assert result.frames_sent == len(carrier.frames) == -(-len(ref) // (fmt.rate // 50))
    assert abs(len(heard) / fmt.rate - src_s) <= DT
    # The play returned when the mark came back, i.e. once the caller had heard the end.
    assert carrier.marks_echoed and result.heard_ms == result.frames_sent * 20
    assert elapsed >= src_s - 0.1  # not faster than real time (espeak startup makes it a bit slower)
    starts = np.array([f.start for f in carrier.frames])
    gaps = np.diff(starts) - DT
    assert bridge.stats.underruns == 0 or gaps.max() > 0  # a counted underrun is a real gap
    await bridge.close()


async def bursty(pcm: bytes) -> AsyncIterator[bytes]:
    rng = np.random.default_rng(11)
    for _ in range(30):
        yield b""
    yield pcm[: len(pcm) // 2]  # half the audio at once
    for _ in range(30):
        yield b""
    pos = len(pcm) // 2
    while pos < len(pcm):
        n = int(rng.integers(0, 3000)) | 1  # odd sizes, split samples
        yield pcm[pos : pos + n]
        pos += n
        if rng.random() < 0.2:
            await asyncio.sleep(0)
        for _ in range(int(rng.integers(0, 4))):
            yield b""


async def test_never_faster_than_real_time_with_empty_and_bursty_chunks() -> None:
    bridge, carrier, _ = make()
    secs = 1.2
    t = np.arange(int(24000 * secs)) / 24000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    t_start = time.monotonic()
    result = await bridge.play(bursty(pcm), 24000)
    elapsed = time.monotonic() - t_start
    sent = np.array([f.sent for f in carrier.frames])
    n = np.arange(len(sent))
    # Frame n is never sent before its real-time slot minus the 3-frame lead.
    ahead = (sent[0] + np.maximum(0, n - 2) * DT) - sent
    print(f"\nbursty: {len(sent)} frames in {elapsed * 1000:.0f} ms, max ahead of schedule {ahead.max() * 1000:.2f} ms, "
          f"max buffered at carrier {max(carrier.buffered_at(s) for s in sent)}")
    assert ahead.max() <= 0.002
    assert max(carrier.buffered_at(s + 1e-6) for s in sent) <= 3
    assert result.completed and result.frames_sent == 60
    assert elapsed >= secs - 0.005


class Clip:
    """A long tone the test can play while it injects caller audio."""

    @staticmethod
    async def tone(secs: float, rate: int = 16000) -> AsyncIterator[bytes]:
        t = np.arange(int(rate * secs)) / rate
        pcm = (6000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()
        for i in range(0, len(pcm), 3200):
            yield pcm[i : i + 3200]


async def caller_frames(bridge: MediaBridge, pcm8k: np.ndarray, fmt: AudioFormat = ULAW_8K) -> None:
    """Feed caller audio through `receive`, one 20 ms frame every 20 ms, like a carrier does."""
    t0 = time.monotonic()
    data = pcm8k.astype("<i2").tobytes()
    for k, i in enumerate(range(0, len(data), 320)):
        bridge.receive(g711.encode(data[i : i + 320], fmt.encoding), sequence=k + 1)
        await asyncio.sleep(max(0.0, t0 + (k + 1) * DT - time.monotonic()))


def espeak_pcm(text: str, rate: int) -> np.ndarray:
    import subprocess

    out = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
    import io

    import soundfile as sf

    x, sr = sf.read(io.BytesIO(out), dtype="int16")
    return soxr.resample(x, sr, rate, quality="HQ").astype(float)


async def test_barge_in_by_vad_clears_within_one_frame() -> None:
    bridge, carrier, listener = make()
    speech = espeak_pcm("Stop, stop, I have a question.", 8000)
    lead_silence = np.zeros(int(0.6 * 8000))
    caller = np.concatenate([lead_silence, speech])
    play = asyncio.create_task(bridge.play(Clip.tone(4.0), 16000, label="greeting"))
    feeder = asyncio.create_task(caller_frames(bridge, caller))
    result = await asyncio.wait_for(play, 5)
    feeder.cancel()
    assert result.interrupted and not result.completed
    clear_t, dropped = carrier.cleared[0]
    trigger_t = listener.speech_started[0]
    # Speech onset: the first 20 ms frame above -45 dBFS (the VAD's absolute minimum).
    rms = np.sqrt(np.mean(speech[: len(speech) // 160 * 160].reshape(-1, 160) ** 2, axis=1))
    onset_frame = len(lead_silence) // 160 + int(np.argmax(rms > 32768 * 10 ** (-45 / 20)))
    sent_after = [f for f in carrier.frames if f.sent > trigger_t]
    # VAD decision latency: frames of caller speech needed before the decision.
    detect_frames = bridge.stats.frames_in - onset_frame
    heard_s = max(f.start for f in carrier.frames) + DT - carrier.frames[0].start
    print(f"\nbarge-in (vad): decision after {detect_frames} speech frames, clear {1000 * (clear_t - trigger_t):.2f} ms "
          f"after it, {dropped} queued frames dropped at the carrier, heard {heard_s * 1000:.0f} ms vs "
          f"reported {result.heard_ms:.0f} ms")
    assert clear_t - trigger_t < DT  # clear within one frame of the decision
    assert not sent_after  # and nothing sent after it
    assert dropped <= 3  # at most the 3-frame lead was queued at the carrier
    assert 1 <= detect_frames <= 4
    assert abs(result.heard_ms / 1000 - heard_s) <= DT + 0.005
    assert bridge.stats.interrupts == 1
    await bridge.close()


async def test_barge_in_by_stt_event_and_pending_plays_dropped() -> None:
    bridge, carrier, _ = make(vad_barge_in=False)
    first = asyncio.create_task(bridge.play(Clip.tone(3.0), 16000, label="one"))
    second = asyncio.create_task(bridge.play(Clip.tone(1.0), 16000, label="two"))
    await asyncio.sleep(0.5)
    t = time.monotonic()
    bridge.on_speech_started()
    r1, r2 = await asyncio.wait_for(asyncio.gather(first, second), 2)
    returned = time.monotonic() - t
    await asyncio.sleep(0.05)
    assert r1.interrupted and 0.4 <= r1.heard_ms / 1000 <= 0.6
    assert r2.interrupted and r2.frames_sent == 0
    assert [f for f in carrier.frames if f.sent > t] == []
    assert carrier.cleared and carrier.cleared[0][0] - t < DT
    assert returned < DT
    text = "one two three four five six seven eight nine ten"
    cut = heard_text(text, r1, total_ms=3000)
    assert 1 <= len(cut.split()) <= 3
    # A play queued after the barge-in runs normally.
    r3 = await bridge.play(Clip.tone(0.2), 16000)
    assert r3.completed and r3.frames_sent == 10
    await bridge.close()


async def test_barge_in_disabled_and_dtmf_send_not_interruptible() -> None:
    bridge, carrier, _ = make()
    bridge.barge_in_enabled = False
    task = asyncio.create_task(bridge.play(Clip.tone(0.4), 16000))
    await asyncio.sleep(0.1)
    bridge.on_speech_started()
    assert (await task).completed
    bridge.barge_in_enabled = True
    task = asyncio.create_task(bridge.send_dtmf("12"))
    await asyncio.sleep(0.1)
    bridge.on_speech_started()
    r = await task
    assert r.completed and r.frames_sent == 16
    await bridge.close()


async def test_no_marks_transport_uses_pacing_clock() -> None:
    bridge, carrier, _ = make()
    carrier.supports_marks = False
    t = time.monotonic()
    r = await bridge.play(Clip.tone(0.5), 16000)
    elapsed = time.monotonic() - t
    assert r.completed and r.frames_sent == 25 and r.heard_ms == 500
    assert 0.5 - 0.005 <= elapsed < 0.6
    assert carrier.marks_sent == []


async def test_lost_mark_falls_back_to_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import media.bridge as mb

    monkeypatch.setattr(mb, "MARK_GRACE_S", 0.1)
    bridge, carrier, _ = make()
    carrier.echo_marks = False
    t = time.monotonic()
    r = await bridge.play(Clip.tone(0.3), 16000)
    assert r.completed and 0.4 - 0.01 <= time.monotonic() - t < 0.6


async def test_caller_speech_then_dtmf_reaches_listener_intact() -> None:
    bridge, _, listener = make(pipeline_rate=16000)
    speech = espeak_pcm("Please transfer me to billing.", 8000)
    digits = "159#0*"
    rng = np.random.default_rng(5)
    tones = np.frombuffer(dtmf_tones(digits, 8000, 80, 60, level_dbfs=-16), dtype="<i2").astype(float)
    caller = np.concatenate([np.zeros(800), speech, np.zeros(1600), tones, np.zeros(1600)])
    caller += rng.normal(0, 60, len(caller))  # line noise, ~-55 dBFS
    caller = np.clip(caller, -32768, 32767)
    frames = [g711.encode(caller.astype("<i2")[i : i + 160].tobytes(), ULAW_8K.encoding) for i in range(0, len(caller), 160)]
    # Deliver out of order within the jitter window, as Telnyx may.
    order = list(range(len(frames)))
    for i in range(0, len(order) - 3, 4):
        order[i], order[i + 2] = order[i + 2], order[i]
    for k in order:
        bridge.receive(frames[k], sequence=k + 100)
    await bridge.close()
    got = np.frombuffer(bytes(listener.audio), dtype="<i2").astype(float)
    ref = soxr.resample(caller.astype(np.int16), 8000, 16000, quality="HQ").astype(float)
    corr, lag = aligned_correlation(got, ref)
    print(f"\ninbound: corr {corr:.4f} at lag {lag}, digits {''.join(listener.digits)}, "
          f"reordered {bridge.stats.reordered_frames}, lost {bridge.stats.lost_frames}")
    assert "".join(listener.digits) == digits
    assert corr >= 0.95
    assert abs(len(got) - len(ref)) <= 320
    assert bridge.stats.frames_in == len(frames) and bridge.stats.lost_frames == 0


async def test_out_of_band_dtmf_deduped_against_inband() -> None:
    bridge, _, listener = make()
    tones = dtmf_tones("7", 8000, 100, 60)
    bridge.on_dtmf("7")  # the carrier's event arrives first, then the tone itself
    for i in range(0, len(tones), 320):
        bridge.receive(g711.encode(tones[i : i + 320], ULAW_8K.encoding))
    bridge.on_dtmf("8")
    assert listener.digits == ["7", "8"]
    assert bridge.stats.dtmf_outofband == 2 and bridge.stats.dtmf_inband == 0


async def test_wire_passthrough_listener_gets_raw_payloads_in_order() -> None:
    class WireListener(Listener):
        def __init__(self) -> None:
            super().__init__()
            self.wire: list[bytes] = []

        def on_wire_audio(self, payload: bytes, format: AudioFormat) -> None:
            assert format == ULAW_8K
            self.wire.append(payload)

    carrier = LoopbackCarrier()
    listener = WireListener()
    bridge = MediaBridge(carrier, listener)
    payloads = [bytes([i]) * 160 for i in range(10)]
    for seq in [1, 0, 3, 2, 5, 4, 6, 7, 9, 8]:
        bridge.receive(payloads[seq], sequence=seq)
    await bridge.close()
    assert listener.wire == payloads


async def test_cancelled_play_clears_and_reraises() -> None:
    bridge, carrier, _ = make()
    task = asyncio.create_task(bridge.play(Clip.tone(2.0), 16000))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert carrier.cleared
    assert not bridge.playing


async def test_engine_failure_mid_stream_propagates_and_bridge_stays_usable() -> None:
    bridge, carrier, _ = make()

    class EngineDown(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield bytes(3200)
        raise EngineDown("tts died")

    with pytest.raises(EngineDown):
        await bridge.play(failing(), 16000)
    assert not bridge.playing
    r = await bridge.play(Clip.tone(0.1), 16000)
    assert r.completed and r.frames_sent == 5
    await bridge.close()


async def test_espeak_subprocess_stopped_on_barge_in() -> None:
    bridge, carrier, _ = make()
    tts = EspeakTts()
    gen = tts.synthesize("This sentence is long enough to still be synthesizing when the caller interrupts. " * 5)
    task = asyncio.create_task(bridge.play(gen, tts.sample_rate))
    await asyncio.sleep(0.3)
    bridge.interrupt()
    r = await task
    assert r.interrupted and 0.15 <= r.heard_ms / 1000 <= 0.35
    assert gen.ag_frame is None  # the generator finished (its finally killed espeak-ng)
    await bridge.close()


async def test_stalled_engine_times_out() -> None:
    carrier = LoopbackCarrier()
    bridge = MediaBridge(carrier, Listener(), stall_timeout_s=0.2)  # type: ignore[arg-type]
    carrier.bridge = bridge
    closed = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        try:
            yield bytes(6400)  # 200 ms
            await asyncio.sleep(10)
            yield bytes(6400)
        finally:
            closed.set()

    t = time.monotonic()
    with pytest.raises(TimeoutError, match="no audio"):
        await bridge.play(stalls(), 16000)
    assert time.monotonic() - t < 0.5 and closed.is_set()
    # What soxr had released before the stall was played (it holds back up to ~130 ms).
    assert 4 <= len(carrier.frames) <= 10
    await bridge.close()
