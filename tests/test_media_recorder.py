"""Call recordings: two sample-aligned channels, written off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_media_pipeline import Listener, LoopbackCarrier, advance, aligned_correlation, caller_frames, drive

from media import g711
from media.clock import FakeClock
from media.formats import ULAW_8K
from media.pipeline import MediaPipeline
from media.recorder import CallRecorder
from media.resample import StreamResampler


async def noise_clip(secs: float) -> AsyncIterator[bytes]:
    """Broadband, so alignment by cross-correlation is unambiguous (a pure tone is periodic)."""
    x = np.random.default_rng(8).normal(0, 3000, int(16000 * secs)).astype("<i2").tobytes()
    for i in range(0, len(x), 3200):
        yield x[i : i + 3200]


def upsample(pcm8k: np.ndarray) -> np.ndarray:
    """8k -> 16k in one piece with the pipeline's own resampler (the filter is not what is tested here;
    tests/test_media_resample_polyphase.py compares it with soxr)."""
    r = StreamResampler(8000, 16000)
    return np.frombuffer(r.process(pcm8k.astype("<i2").tobytes()) + r.flush(), "<i2").astype(float)


async def test_two_channels_aligned_on_one_timeline(tmp_path: Path) -> None:
    """Caller, pipeline, carrier and recorder on one FakeClock: the channels' offset is exact, however
    busy the machine (on the wall clock it was off by up to 7.5 ms under load)."""
    clock = FakeClock()
    path = tmp_path / "call-1.wav"
    rec = CallRecorder(path, 16000, monotonic=clock.monotonic)
    carrier = LoopbackCarrier(clock=clock)
    bridge = MediaPipeline(carrier, Listener(clock), recorder=rec, vad_barge_in=False, clock=clock)
    carrier.bridge = bridge
    rng = np.random.default_rng(3)
    caller = np.clip(rng.normal(0, 2000, 8000 * 2), -32768, 32767)  # 2 s of caller noise
    t_feed = clock.monotonic()
    feeder = asyncio.create_task(caller_frames(bridge, clock, caller))
    await advance(clock, 0.5)
    await drive(clock, bridge.play(noise_clip(1.0), 16000))
    await drive(clock, feeder)
    await bridge.close()  # closes the recorder too
    assert rec.error is None
    data, sr = sf.read(path, dtype="int16")
    assert sr == 16000 and data.shape[1] == 2
    ch0, ch1 = data[:, 0].astype(float), data[:, 1].astype(float)
    # Caller channel: the caller's audio after G.711 and the 8k->16k path.
    heard_caller = np.frombuffer(g711.decode(g711.encode(caller.astype("<i2").tobytes(), ULAW_8K.encoding), ULAW_8K.encoding), dtype="<i2")
    ref0 = upsample(heard_caller)
    c0, lag0 = aligned_correlation(ch0, ref0)
    # Bridge channel: exactly what the carrier played, placed at its play-out time.
    ref1 = upsample(carrier.heard_pcm().astype(np.int16))
    c1, lag1 = aligned_correlation(ch1, ref1)
    # The caller's first frame, received at t_feed, was spoken during the 20 ms before it.
    expected_offset = (carrier.frames[0].start - (t_feed - 0.02)) * 16000
    print(f"\nrecorder: ch0 corr {c0:.4f} lag {lag0}; ch1 corr {c1:.4f} at {lag1} samples, "
          f"playout started at {expected_offset:.0f}")
    assert c0 >= 0.99 and abs(lag0) <= 2
    assert c1 >= 0.99
    assert abs(lag1 - expected_offset) <= 1  # to the sample on the shared timeline
    assert len(data) >= len(ref0) - 320


async def test_disk_writes_never_block_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = sf.SoundFile.write

    def slow_write(self: sf.SoundFile, data: np.ndarray) -> None:
        time.sleep(0.05)  # a slow disk
        real_write(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", slow_write)
    rec = CallRecorder(tmp_path / "slow.wav", 8000, lag_s=0.0)
    frame = np.full(160, 1000, dtype="<i2").tobytes()
    worst = 0.0
    t = time.monotonic()
    for k in range(100):
        s = time.perf_counter()
        rec.write_caller(frame, at=t + k * 0.02)
        rec.write_bridge(frame, at=t + k * 0.02 + 0.5)
        worst = max(worst, time.perf_counter() - s)
    await rec.close()
    assert worst < 0.01  # the 50 ms writes happened in the writer thread
    data, _ = sf.read(tmp_path / "slow.wav", dtype="int16")
    assert len(data) == 100 * 160 + 4000
    assert np.all(data[:4000, 1] == 0) and np.all(data[4000:, 1] == 1000)
    assert np.all(data[:16000, 0] == 1000)


async def test_gap_becomes_silence_and_jitter_does_not(tmp_path: Path) -> None:
    rec = CallRecorder(tmp_path / "gap.wav", 8000, monotonic=lambda: 10.0)
    one = np.full(160, 500, dtype="<i2").tobytes()
    t = 10.0
    rec.write_caller(one, at=t)
    rec.write_caller(one, at=t + 0.025)  # 5 ms late: jitter, appended seamlessly
    rec.write_caller(one, at=t + 1.0)  # a real gap of ~1 s
    rec.write_bridge(one, at=t + 0.5)
    await rec.close()
    data, _ = sf.read(tmp_path / "gap.wav", dtype="int16")
    ch0 = data[:, 0]
    assert np.all(ch0[:320] == 500) and np.all(ch0[320:8000] == 0) and np.all(ch0[8000:8160] == 500)
    assert np.all(data[4000:4160, 1] == 500) and np.all(data[:4000, 1] == 0)


async def test_a_replaced_stream_appends_to_the_calls_recording(tmp_path: Path) -> None:
    """Twilio keys out, a failed transfer or a re-attach give the call a new recorder for the same file
    while the old one may still be writing: the new part follows the old one, nothing is overwritten."""
    path = tmp_path / "call.wav"
    first = CallRecorder(path, 8000, monotonic=lambda: 10.0)
    second = CallRecorder(path, 8000, monotonic=lambda: 20.0)
    before = np.full(1600, 300, dtype="<i2").tobytes()
    after = np.full(800, -700, dtype="<i2").tobytes()
    first.write_caller(before, at=10.0)
    first.flush()
    second.write_caller(after, at=20.0)
    second.flush()  # the second part is queued while the first recorder still holds the file
    await first.close()
    await second.close()
    data, rate = sf.read(path, dtype="int16")
    assert rate == 8000 and data.shape == (2400, 2)
    assert np.all(data[:1600, 0] == 300) and np.all(data[1600:, 0] == -700) and np.all(data[:, 1] == 0)
    third = CallRecorder(path, 16000, monotonic=lambda: 30.0)  # another format: its own file, nothing lost
    third.write_caller(np.full(320, 1, dtype="<i2").tobytes(), at=30.0)
    await third.close()
    assert sf.info(path).frames == 2400 and third.path != path and sf.info(third.path).samplerate == 16000
