"""MediaPipeline over a loopback carrier that plays frames in real time, like Twilio/Telnyx do.

The loopback keeps the carrier's playout buffer: each frame starts playing when the previous one
ends (or on arrival if the buffer ran dry), `clear` drops what has not started, and a mark is
echoed when everything queued before it has played. What the "caller" heard is reconstructed from
that timeline and measured against the source audio.

Pipeline, carrier, caller and recorder share one FakeClock that only `drive` moves (a millisecond
at a time, once every task that can run has run), so the timings below are exact, not wall-clock
estimates that a busy machine stretches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pytest
import soxr

from media import g711
from media.clock import Clock, FakeClock
from media.dtmf import dtmf_tones
from media.formats import ALAW_8K, ULAW_8K, AudioEncoding, AudioFormat
from media.pipeline import MediaPipeline, PlaybackResult, heard_text
from media.tts.espeak import EspeakTts
from tests.harness import wait_for

pytestmark = pytest.mark.skipif(not EspeakTts.available(), reason="espeak-ng not installed")

DT = 0.02
T = TypeVar("T")


async def settle() -> None:
    """Let every task that can run without time passing run: until the loop has nothing ready.
    (asyncio has no public "idle" test; CPython's loop keeps its ready callbacks in `_ready`.)"""
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)
    for _ in range(10_000 if ready is not None else 200):
        await asyncio.sleep(0)
        if ready is not None and not ready:
            return


async def drive(clock: FakeClock, awaitable: Awaitable[T], *, limit: float = 30.0) -> T:
    """Await `awaitable`, moving `clock` from one timer to the next whenever every task that can run
    has run (`limit`: seconds on the clock at most). With nothing due on the clock, something real
    (a subprocess) is being waited for: real time passes, the clock stands still."""
    task = asyncio.ensure_future(awaitable)
    deadline = clock.monotonic() + limit
    await settle()
    while not task.done():
        due = clock.next_at
        if due is None:
            await asyncio.wait({task}, timeout=0.005)
            continue
        assert due <= deadline, "still running after the limit"
        await clock.advance(max(0.0, due - clock.monotonic()))
        await settle()
    return task.result()


async def advance(clock: FakeClock, seconds: float) -> None:
    """Let `seconds` pass, a step at a time, with every task running in between."""
    await drive(clock, clock.sleep(seconds))


async def timed(clock: FakeClock, awaitable: Awaitable[T]) -> tuple[T, float]:
    """The result and the clock's time the moment it was ready."""
    result = await awaitable
    return result, clock.monotonic()


@dataclass
class Played:
    payload: bytes
    sent: float
    start: float
    dur: float = DT


@dataclass
class LoopbackCarrier:
    clock: Clock = field(default_factory=FakeClock)
    format: AudioFormat = ULAW_8K
    supports_marks: bool = True
    bridge: MediaPipeline | None = None
    frames: list[Played] = field(default_factory=list)
    cleared: list[tuple[float, int]] = field(default_factory=list)  # (time, frames dropped)
    marks_sent: list[tuple[float, str]] = field(default_factory=list)
    marks_echoed: list[tuple[float, str]] = field(default_factory=list)
    echo_marks: bool = True
    send_ms: int = 20  # the transport's outbound message duration (MediaTransport.send_ms)
    _busy_until: float = 0.0

    async def send_media(self, payload: bytes) -> None:
        full = self.format.bytes_for_ms(self.send_ms)
        if self.frames and len(self.frames[-1].payload) != full:
            assert self.frames[-1].sent < self._play_started, "a short message before the end of a play"
        assert len(payload) == full or (0 < len(payload) < full and len(payload) % self.format.frame_bytes == 0), (
            f"carrier got {len(payload)} bytes: not one {self.send_ms} ms message (nor a tail of whole 20 ms frames)")
        now = self.clock.monotonic()
        start = max(now, self._busy_until)
        dur = self.format.ms_of(payload) / 1000
        self._busy_until = start + dur
        self.frames.append(Played(payload, now, start, dur))

    _play_started: float = 0.0  # set by mark/clear: the next media message belongs to a new play

    async def send_mark(self, name: str) -> None:
        now = self.clock.monotonic()
        self._play_started = now
        self.marks_sent.append((now, name))
        if not self.echo_marks:
            return

        def echo() -> None:
            self.marks_echoed.append((self.clock.monotonic(), name))
            assert self.bridge is not None
            self.bridge.on_mark(name)

        self.clock.call_later(max(0.0, self._busy_until - now), echo)

    async def send_clear(self) -> None:
        now = self.clock.monotonic()
        self._play_started = now
        kept = [f for f in self.frames if f.start <= now]
        self.cleared.append((now, len(self.frames) - len(kept)))
        self.frames = kept
        self._busy_until = min(self._busy_until, now + DT)

    def buffered_at(self, t: float) -> int:
        """Messages queued at the carrier (sent, not yet started) at time t."""
        return sum(1 for f in self.frames if f.sent <= t < f.start)

    def buffered_s_at(self, t: float) -> float:
        """Audio queued at the carrier at time t, including the rest of the message playing then."""
        return sum(min(f.dur, f.start + f.dur - t) for f in self.frames if f.sent <= t < f.start + f.dur)

    def heard_pcm(self) -> np.ndarray:
        """What the caller heard, on the playout timeline (gaps filled with silence)."""
        if not self.frames:
            return np.zeros(0)
        t0 = self.frames[0].start
        rate = self.format.rate
        pieces = [(round((f.start - t0) / DT) * (rate // 50), np.frombuffer(g711.decode(f.payload, self.format.encoding), dtype="<i2"))
                  for f in self.frames]
        out = np.zeros(max(k + len(x) for k, x in pieces))
        for k, x in pieces:
            out[k : k + len(x)] = x
        return out


class Listener:
    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or FakeClock()
        self.audio = bytearray()
        self.digits: list[str] = []
        self.speech_started: list[float] = []
        self.speech_ended: list[float] = []

    def on_pipeline_audio(self, pcm: bytes) -> None:
        self.audio += pcm

    def on_dtmf(self, digit: str) -> None:
        self.digits.append(digit)

    def on_speech_started(self) -> None:
        self.speech_started.append(self.clock.monotonic())

    def on_speech_ended(self, ago: float) -> None:
        self.speech_ended.append(ago)


def make(fmt: AudioFormat = ULAW_8K, send_ms: int = 20, *, clock: Clock | None = None,
         **kw: object) -> tuple[MediaPipeline, LoopbackCarrier, Listener]:
    """A pipeline, its loopback carrier and its listener, all on one clock (`carrier.clock`): a FakeClock
    that `drive` moves, unless told otherwise (a RealClock where the audio comes from a real-time source)."""
    clock = clock or FakeClock()
    carrier = LoopbackCarrier(clock=clock, format=fmt, send_ms=send_ms)
    listener = Listener(clock)
    bridge = MediaPipeline(carrier, listener, clock=clock, **kw)  # type: ignore[arg-type]
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


async def espeak_chunks(text: str) -> tuple[list[bytes], int]:
    """espeak-ng's output for `text`, chunk by chunk as it streamed it (synthesized before the play, so
    the play runs on the fake clock alone)."""
    tts = EspeakTts()
    return [chunk async for chunk in tts.synthesize(text)], tts.sample_rate


async def replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def speak(bridge: MediaPipeline, clock: FakeClock, text: str, **kw: object) -> tuple[PlaybackResult, np.ndarray, float]:
    chunks, rate = await espeak_chunks(text)
    t = clock.monotonic()
    result, done = await drive(clock, timed(clock, bridge.play(replay(chunks), rate, **kw)))  # type: ignore[arg-type]
    return result, np.frombuffer(b"".join(chunks), dtype="<i2").astype(float), done - t


L16_16K = AudioFormat(AudioEncoding.L16, 16000)


@pytest.mark.parametrize("fmt", [ULAW_8K, ALAW_8K, L16_16K], ids=["pcmu", "pcma", "l16-16k"])
async def test_espeak_loopback_correlates_and_keeps_every_frame(fmt: AudioFormat) -> None:
    bridge, carrier, _ = make(fmt)
    result, src, elapsed = await speak(bridge, carrier.clock, "Hello, this is the voice bridge calling.")
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
    starts = np.array([f.start for f in carrier.frames])
    assert bridge.stats.underruns == 0 and np.abs(np.diff(starts) - DT).max() < 1e-9
    # The play returned when the mark came back, i.e. the moment the caller had heard the end.
    assert carrier.marks_echoed and result.heard_ms == result.frames_sent * 20
    assert elapsed == pytest.approx(result.sent_ms / 1000, abs=1e-9)
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


@pytest.mark.parametrize(("send_ms", "lead", "messages"), [(20, 3, 60), (40, 2, 30)])
async def test_never_faster_than_real_time_with_empty_and_bursty_chunks(send_ms: int, lead: int, messages: int) -> None:
    """20 ms frames with a 3-frame lead, or 40 ms messages with a 2-message lead (80 ms queued)."""
    bridge, carrier, _ = make(send_ms=send_ms)
    clock = carrier.clock
    secs = 1.2
    t = np.arange(int(24000 * secs)) / 24000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    result, done = await drive(clock, timed(clock, bridge.play(bursty(pcm), 24000)))
    sent = np.array([f.sent for f in carrier.frames])
    elapsed = done - sent[0]
    n = np.arange(len(sent))
    # Message n is never sent before its real-time slot minus the lead.
    ahead = (sent[0] + np.maximum(0, n - (lead - 1)) * send_ms / 1000) - sent
    queued = max(carrier.buffered_s_at(s + 1e-6) for s in sent)
    print(f"\nbursty {send_ms} ms: {len(sent)} messages in {elapsed * 1000:.0f} ms, max ahead of schedule "
          f"{ahead.max() * 1000:.2f} ms, max queued at carrier {queued * 1000:.1f} ms")
    assert ahead.max() <= 1e-9
    assert max(carrier.buffered_at(s + 1e-6) for s in sent) <= lead
    assert queued <= lead * send_ms / 1000 + 1e-6
    assert result.completed and result.frames_sent == messages and result.heard_ms == 1200
    assert elapsed == pytest.approx(secs, abs=1e-9)  # not faster than real time; returned as the caller heard the end


class Clip:
    """A long tone the test can play while it injects caller audio."""

    @staticmethod
    async def tone(secs: float, rate: int = 16000) -> AsyncIterator[bytes]:
        t = np.arange(int(rate * secs)) / rate
        pcm = (6000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()
        for i in range(0, len(pcm), 3200):
            yield pcm[i : i + 3200]


async def caller_frames(bridge: MediaPipeline, clock: FakeClock, pcm8k: np.ndarray, fmt: AudioFormat = ULAW_8K) -> None:
    """Feed caller audio through `receive`, one 20 ms frame every 20 ms on `clock`, like a carrier does."""
    t0 = clock.monotonic()
    data = pcm8k.astype("<i2").tobytes()
    for k, i in enumerate(range(0, len(data), 320)):
        bridge.receive(g711.encode(data[i : i + 320], fmt.encoding), sequence=k + 1)
        await clock.sleep(max(0.0, t0 + (k + 1) * DT - clock.monotonic()))


def espeak_pcm(text: str, rate: int) -> np.ndarray:
    import subprocess

    out = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
    import io

    import soundfile as sf

    x, sr = sf.read(io.BytesIO(out), dtype="int16")
    return soxr.resample(x, sr, rate, quality="HQ").astype(float)


@pytest.mark.parametrize("send_ms", [20, 40])
async def test_barge_in_by_vad_clears_within_one_frame(send_ms: int) -> None:
    bridge, carrier, listener = make(send_ms=send_ms)
    clock = carrier.clock
    speech = espeak_pcm("Stop, stop, I have a question.", 8000)
    lead_silence = np.zeros(int(0.6 * 8000))
    caller = np.concatenate([lead_silence, speech])
    play = asyncio.create_task(bridge.play(Clip.tone(4.0), 16000, label="greeting"))
    feeder = asyncio.create_task(caller_frames(bridge, clock, caller))
    result = await drive(clock, play, limit=5)
    feeder.cancel()
    assert result.interrupted and not result.completed
    clear_t, dropped = carrier.cleared[0]
    trigger_t = listener.speech_started[0]
    # Speech onset: the first 20 ms frame above -45 dBFS (the VAD's absolute minimum).
    rms = np.sqrt(np.mean(speech[: len(speech) // 160 * 160].reshape(-1, 160) ** 2, axis=1))
    onset_frame = len(lead_silence) // 160 + int(np.argmax(rms > 32768 * 10 ** (-45 / 20)))
    sent_after = [f for f in carrier.frames if f.sent > trigger_t]
    # VAD decision latency: frames of caller speech needed before the decision (frame k arrives at k x 20 ms).
    detect_frames = round(trigger_t / DT) + 1 - onset_frame
    heard_s = max(f.start + f.dur for f in carrier.frames) - carrier.frames[0].start
    print(f"\nbarge-in (vad, {send_ms} ms messages): decision after {detect_frames} speech frames, clear {1000 * (clear_t - trigger_t):.2f} ms "
          f"after it, {dropped} queued frames dropped at the carrier, heard {heard_s * 1000:.0f} ms vs "
          f"reported {result.heard_ms:.0f} ms")
    assert clear_t == trigger_t  # the carrier is told to clear at the decision, no time in between
    assert not sent_after  # and nothing sent after it
    assert dropped <= 60 // send_ms + (send_ms == 40)  # at most the lead was queued: 3 x 20 ms or 2 x 40 ms
    assert 1 <= detect_frames <= 4
    # What the caller heard ends at the decision: the bridge reports exactly that
    assert result.heard_ms == pytest.approx((trigger_t - carrier.frames[0].start) * 1000, abs=1e-6)
    # heard_s counts the message playing at the clear in full; what the bridge reports is cut inside it
    assert -send_ms / 1000 - 1e-9 <= result.heard_ms / 1000 - heard_s <= 1e-9
    assert bridge.stats.interrupts == 1
    await bridge.close()


async def test_the_vad_reports_when_the_caller_fell_silent() -> None:
    bridge, _, listener = make()
    speech = espeak_pcm("Book a table.", 8000)
    silence = np.zeros(8000)
    pcm = np.clip(np.concatenate([silence, speech, silence]), -32768, 32767).astype("<i2").tobytes()
    frame = 8000 * 20 // 1000 * 2
    for seq, offset in enumerate(range(0, len(pcm) - frame + 1, frame), start=1):
        bridge.receive(g711.encode(pcm[offset:offset + frame], ULAW_8K.encoding), seq)
    # once, after the speech, dated back by the VAD's hangover (turn timing's caller speech end)
    assert listener.speech_ended == [0.3]
    await bridge.close()


async def test_barge_in_by_stt_event_and_pending_plays_dropped() -> None:
    bridge, carrier, _ = make(vad_barge_in=False)
    clock = carrier.clock
    first = asyncio.create_task(bridge.play(Clip.tone(3.0), 16000, label="one"))
    second = asyncio.create_task(bridge.play(Clip.tone(1.0), 16000, label="two"))
    await advance(clock, 0.5)
    t = clock.monotonic()
    frames_before = len(carrier.frames)
    bridge.on_speech_started()
    await settle()  # no time passes: both plays return at once
    assert first.done() and second.done()
    r1, r2 = first.result(), second.result()
    assert r1.interrupted and r1.heard_ms == pytest.approx(500, abs=1e-6)
    assert r2.interrupted and r2.frames_sent == 0
    assert len(carrier.frames) <= frames_before and [f for f in carrier.frames if f.sent > t] == []
    assert carrier.cleared and carrier.cleared[0][0] == t
    text = "one two three four five six seven eight nine ten"
    cut = heard_text(text, r1, total_ms=3000)
    assert cut == "one"  # 500 of 3000 ms: the first of ten words
    # A play queued after the barge-in runs normally.
    r3 = await drive(clock, bridge.play(Clip.tone(0.2), 16000))
    assert r3.completed and r3.frames_sent == 10
    await bridge.close()


async def test_barge_in_disabled_and_dtmf_send_not_interruptible() -> None:
    bridge, carrier, _ = make()
    clock = carrier.clock
    bridge.barge_in_enabled = False
    task = asyncio.create_task(bridge.play(Clip.tone(0.4), 16000))
    await advance(clock, 0.1)
    bridge.on_speech_started()
    r = await drive(clock, task)
    assert r.completed and bridge.stats.interrupts == 0
    bridge.barge_in_enabled = True
    task = asyncio.create_task(bridge.send_dtmf("12"))
    await advance(clock, 0.1)
    bridge.on_speech_started()
    r = await drive(clock, task)
    assert r.completed and r.frames_sent == 16 and bridge.stats.interrupts == 0
    await bridge.close()


async def test_no_marks_transport_uses_pacing_clock() -> None:
    bridge, carrier, _ = make()
    carrier.supports_marks = False
    clock = carrier.clock
    t = clock.monotonic()
    r, done = await drive(clock, timed(clock, bridge.play(Clip.tone(0.5), 16000)))
    assert r.completed and r.frames_sent == 25 and r.heard_ms == 500
    assert done - t == pytest.approx(0.5, abs=1e-9)  # returns when the last frame has played out
    assert carrier.marks_sent == []


async def test_lost_mark_falls_back_to_clock() -> None:
    from media.pipeline import MARK_GRACE_S

    bridge, carrier, _ = make()
    carrier.echo_marks = False
    clock = carrier.clock
    t = clock.monotonic()
    r, done = await drive(clock, timed(clock, bridge.play(Clip.tone(0.3), 16000)))
    assert r.completed and done - t == pytest.approx(0.3 + MARK_GRACE_S, abs=1e-9)


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
    bridge = MediaPipeline(carrier, listener)
    payloads = [bytes([i]) * 160 for i in range(10)]
    for seq in [1, 0, 3, 2, 5, 4, 6, 7, 9, 8]:
        bridge.receive(payloads[seq], sequence=seq)
    await bridge.close()
    assert listener.wire == payloads


async def test_cancelled_play_clears_and_reraises() -> None:
    bridge, carrier, _ = make()
    clock = carrier.clock
    task = asyncio.create_task(bridge.play(Clip.tone(2.0), 16000))
    await advance(clock, 0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
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
        await drive(carrier.clock, bridge.play(failing(), 16000))
    assert not bridge.playing
    r = await drive(carrier.clock, bridge.play(Clip.tone(0.1), 16000))
    assert r.completed and r.frames_sent == 5
    await bridge.close()


async def test_espeak_subprocess_stopped_on_barge_in() -> None:
    bridge, carrier, _ = make()
    clock = carrier.clock
    tts = EspeakTts()
    gen = tts.synthesize("This sentence is long enough to still be synthesizing when the caller interrupts. " * 5)
    task = asyncio.create_task(bridge.play(gen, tts.sample_rate))
    await wait_for(lambda: len(carrier.frames) > 0, timeout=20)  # espeak-ng runs in real time: its first audio
    await advance(clock, 0.3)
    bridge.interrupt()
    r = await asyncio.wait_for(task, 20)  # no time passes on the clock while espeak-ng is stopped
    # the 300 ms that passed were heard (less if espeak-ng fell behind on a busy machine)
    assert r.interrupted and 20 <= r.heard_ms <= 300 + 1e-6
    assert gen.ag_frame is None  # the generator finished (its finally killed espeak-ng)
    await bridge.close()


async def test_stalled_engine_times_out() -> None:
    clock = FakeClock()
    carrier = LoopbackCarrier(clock=clock)
    bridge = MediaPipeline(carrier, Listener(clock), stall_timeout_s=0.2, clock=clock)  # type: ignore[arg-type]
    carrier.bridge = bridge
    closed = asyncio.Event()
    stalled_at: list[float] = []

    async def stalls() -> AsyncIterator[bytes]:
        try:
            yield bytes(6400)  # 200 ms
            stalled_at.append(clock.monotonic())
            await asyncio.Event().wait()  # never produces again
            yield bytes(6400)
        finally:
            closed.set()

    with pytest.raises(TimeoutError, match="no audio"):
        await drive(clock, bridge.play(stalls(), 16000))
    assert clock.monotonic() - stalled_at[0] == pytest.approx(0.2, abs=1e-9) and closed.is_set()
    # What soxr had released before the stall was played (it holds back up to ~130 ms).
    assert 4 <= len(carrier.frames) <= 10
    await bridge.close()


async def test_a_slow_engine_that_keeps_producing_does_not_time_out() -> None:
    """The stall timeout is per chunk: chunks 150 ms apart for a second (timeout 200 ms) all play."""
    clock = FakeClock()
    carrier = LoopbackCarrier(clock=clock)
    bridge = MediaPipeline(carrier, Listener(clock), stall_timeout_s=0.2, clock=clock)  # type: ignore[arg-type]
    carrier.bridge = bridge

    async def slow() -> AsyncIterator[bytes]:
        for _ in range(7):
            yield bytes(3200)  # 100 ms
            await clock.sleep(0.15)

    result = await drive(clock, bridge.play(slow(), 16000))
    assert result.completed and result.heard_ms == pytest.approx(700, abs=20)
    await bridge.close()


# ------------------------------------------------------------------ 40 ms outbound messages


async def test_40ms_messages_carry_the_same_audio_and_exact_heard_ms() -> None:
    """The same play through 20 ms and 40 ms messages: the same audio reaches the caller, sent/heard
    are counted in ms (the tail is padded to whole 20 ms frames only), half as many messages."""
    results = {}
    for send_ms in (20, 40):
        bridge, carrier, _ = make(send_ms=send_ms)
        clock = carrier.clock
        t = clock.monotonic()
        # 530 ms: a 40 ms framing leaves a 20 ms tail
        result, done = await drive(clock, timed(clock, bridge.play(Clip.tone(0.53), 16000)))
        elapsed = done - t
        played_s = carrier.frames[-1].start + carrier.frames[-1].dur - carrier.frames[0].start
        print(f"\n{send_ms} ms: {result.frames_sent} messages, sent {result.sent_ms} ms, heard {result.heard_ms} ms, "
              f"carrier played {played_s * 1000:.1f} ms, play took {elapsed * 1000:.0f} ms")
        assert result.completed and result.frames_sent == len(carrier.frames)
        assert result.heard_ms == result.sent_ms == sum(len(f.payload) for f in carrier.frames) / 8
        assert played_s * 1000 == pytest.approx(result.heard_ms, abs=1e-6)  # no gaps: the messages tile the timeline
        assert elapsed == pytest.approx(result.sent_ms / 1000, abs=1e-9)  # returned once it was all heard (the mark)
        assert carrier.marks_echoed and carrier.marks_sent[0][0] >= carrier.frames[-1].sent
        results[send_ms] = (result, b"".join(f.payload for f in carrier.frames))
        await bridge.close()
    (r20, audio20), (r40, audio40) = results[20], results[40]
    assert r40.sent_ms == r20.sent_ms == 540  # 530 ms of audio + the 20 ms framer's padding, either way
    assert r40.frames_sent == 14 and r20.frames_sent == 27
    # The same audio (soxr's int16 output dither differs from one resampler instance to the next,
    # by a u-law step here and there, so compare the signal rather than the bytes).
    x20, x40 = (np.frombuffer(g711.decode(a, ULAW_8K.encoding), dtype="<i2").astype(float) for a in (audio20, audio40))
    assert len(x40) == len(x20) and np.corrcoef(x20, x40)[0, 1] > 0.9999


async def test_40ms_barge_in_clears_within_one_message_and_reports_what_was_heard() -> None:
    bridge, carrier, _ = make(send_ms=40, vad_barge_in=False)
    clock = carrier.clock
    first = asyncio.create_task(bridge.play(Clip.tone(3.0), 16000, label="one"))
    second = asyncio.create_task(bridge.play(Clip.tone(1.0), 16000, label="two"))
    await advance(clock, 0.51)  # inside a message: 0.48-0.52 s
    t = clock.monotonic()
    bridge.on_speech_started()
    r1, r2 = await drive(clock, asyncio.gather(first, second))
    assert clock.monotonic() == t  # both returned without time passing
    clear_t, dropped = carrier.cleared[0]
    heard_by_carrier = clear_t - carrier.frames[0].start  # no gaps: played continuously until the clear
    print(f"\n40 ms barge-in: clear after {1000 * (clear_t - t):.2f} ms, {dropped} queued messages dropped, "
          f"heard {heard_by_carrier * 1000:.1f} ms, reported {r1.heard_ms:.1f} of {r1.sent_ms:.0f} ms sent")
    assert clear_t == t  # at the decision
    assert [f for f in carrier.frames if f.sent > t] == []  # nothing after the decision
    assert dropped <= 2
    assert r1.interrupted and r1.heard_ms == pytest.approx(510, abs=1e-6) == heard_by_carrier * 1000
    assert r1.sent_ms - r1.heard_ms <= 80 + 1  # what was queued and dropped: at most the lead
    assert r2.interrupted and r2.frames_sent == 0 and r2.sent_ms == 0
    r3 = await drive(clock, bridge.play(Clip.tone(0.2), 16000))
    assert r3.completed and r3.frames_sent == 5 and r3.heard_ms == 200
    await bridge.close()


async def test_40ms_without_marks_trusts_the_pacing_clock() -> None:
    bridge, carrier, _ = make(send_ms=40)
    carrier.supports_marks = False
    clock = carrier.clock
    t = clock.monotonic()
    r, done = await drive(clock, timed(clock, bridge.play(Clip.tone(0.5), 16000)))
    assert r.completed and r.frames_sent == 13 and r.heard_ms == 500 == r.sent_ms
    assert done - t == pytest.approx(0.5, abs=1e-9)
    assert carrier.marks_sent == []


def test_transport_send_ms_must_be_whole_20ms_frames() -> None:
    with pytest.raises(ValueError, match="multiple of 20"):
        MediaPipeline(LoopbackCarrier(send_ms=30), Listener())  # type: ignore[arg-type]


@pytest.mark.parametrize(("leg_reports", "inband", "expected"), [
    (False, None, ["7"]),  # SIP/RTP, mock: only the tones tell
    (True, None, []),  # Twilio/Telnyx/Plivo streams: the carrier's `dtmf` event tells, no detector
    (True, True, ["7"]),  # streaming.inbandDtmf: on
    (False, False, []),  # streaming.inbandDtmf: off
])
async def test_inband_detector_follows_the_leg_unless_told(leg_reports: bool, inband: bool | None,
                                                         expected: list[str]) -> None:
    carrier = LoopbackCarrier()
    carrier.reports_dtmf = leg_reports  # type: ignore[attr-defined]
    listener = Listener()
    bridge = MediaPipeline(carrier, listener, inband_dtmf=inband)  # type: ignore[arg-type]
    tones = dtmf_tones("7", 8000, 100, 60)
    for i in range(0, len(tones), 320):
        bridge.receive(g711.encode(tones[i : i + 320], ULAW_8K.encoding))
    await bridge.close()
    assert listener.digits == expected
    assert bridge.stats.dtmf_inband == len(expected)
