"""No inbound resampler (a soxr stream holds 50-90 KB) for a listener that takes only wire audio; the
direct call into soxr's C process gives what its public method gives."""

from __future__ import annotations

import numpy as np

from media import g711
from media.formats import ULAW_8K
from media.pipeline import MediaPipeline
from media.resample import SKIP_IDLE_PAIRS, StreamResampler


class Leg:
    format = ULAW_8K
    supports_marks = False
    reports_dtmf = True

    async def send_media(self, payload: bytes) -> None: ...
    async def send_mark(self, name: str) -> None: ...
    async def send_clear(self) -> None: ...


class Listener:
    def __init__(self, wants_pipeline_audio: bool = True) -> None:
        self.wants_pipeline_audio = wants_pipeline_audio
        self.pcm = bytearray()

    def on_pipeline_audio(self, pcm: bytes) -> None:
        self.pcm += pcm

    def on_dtmf(self, digit: str) -> None: ...
    def on_speech_started(self) -> None: ...


def speech_frames(seconds: float = 2.0) -> list[bytes]:
    rng = np.random.default_rng(3)
    t = np.arange(int(8000 * seconds)) / 8000
    x = sum(3000 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (180, 440, 1250, 2600, 3350))
    x = x + rng.normal(0, 200, len(t))
    ulaw = g711.encode(np.clip(x, -32768, 32767).astype("<i2").tobytes(), ULAW_8K.encoding)
    return [ulaw[i:i + 160] for i in range(0, len(ulaw), 160)]


async def test_wire_only_listener_gets_no_resampler() -> None:
    listener = Listener(wants_pipeline_audio=False)
    pipeline = MediaPipeline(Leg(), listener, pipeline_rate=16000)  # type: ignore[arg-type]
    assert pipeline._in_resampler is None  # noqa: SLF001
    for f in speech_frames(0.2):
        pipeline.receive(f)
    await pipeline.close()
    assert not listener.pcm and pipeline.stats.frames_in == 10


def test_direct_soxr_call_gives_the_public_methods_output() -> None:
    rng = np.random.default_rng(5)
    pcm = rng.normal(0, 4000, 8000 * 2).astype("<i2").tobytes()
    for rates in ((8000, 16000), (16000, 8000), (24000, 8000), (8000, 24000)):
        fast = StreamResampler(*rates)
        assert fast._process is not None  # noqa: SLF001 - else this test would compare the fallback with itself
        public = StreamResampler(*rates)
        public._process = None  # noqa: SLF001
        # odd chunk sizes too (a dangling byte waits for the next chunk)
        sizes = [320, 1, 319, 0, 4000, 77, 3]
        chunks, i, k = [], 0, 0
        while i < len(pcm):
            chunks.append(pcm[i:i + sizes[k % len(sizes)]])
            i += sizes[k % len(sizes)]
            k += 1
        got = [fast.process(c) for c in chunks] + [fast.flush()]
        want = [public.process(c) for c in chunks] + [public.flush()]
        assert [len(g) for g in got] == [len(w) for w in want]
        # soxr dithers its int16 output per instance: two public instances differ by up to 2 LSB too
        diff = np.frombuffer(b"".join(got), "<i2").astype(int) - np.frombuffer(b"".join(want), "<i2").astype(int)
        assert np.abs(diff).max() <= 2


def _chunked(pcm: bytes, sizes: list[int]) -> list[bytes]:
    chunks, i, k = [], 0, 0
    while i < len(pcm):
        chunks.append(pcm[i:i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return chunks


def test_skipping_idle_soxr_calls_releases_on_the_same_chunks() -> None:
    rng = np.random.default_rng(7)
    for in_rate, out_rate in sorted(SKIP_IDLE_PAIRS):
        pcm = rng.normal(0, 4000, in_rate * 6).astype("<i2").tobytes()
        frame = in_rate // 50 * 2
        for sizes in ([frame], [frame // 2], [frame, 1, frame - 1, 0, 3 * frame, 77], [2 * frame + 2, 6]):
            chunks = _chunked(pcm, sizes)
            plain = StreamResampler(in_rate, out_rate)
            skipping = StreamResampler(in_rate, out_rate, skip_idle_calls=True)
            want = [plain.process(c) for c in chunks]
            got = [skipping.process(c) for c in chunks]
            assert [len(g) for g in got] == [len(w) for w in want], (in_rate, out_rate, sizes)
            assert skipping.pending_s == plain.pending_s
            want.append(plain.flush())
            got.append(skipping.flush())
            diff = (np.frombuffer(b"".join(got), "<i2").astype(int)
                    - np.frombuffer(b"".join(want), "<i2").astype(int))
            assert len(diff) and np.abs(diff).max() <= 2


def test_skipping_only_where_checked() -> None:
    assert not StreamResampler(8000, 48000, skip_idle_calls=True)._skip  # noqa: SLF001 - two blocks at once there
    assert not StreamResampler(8000, 16000, quality="VHQ", skip_idle_calls=True)._skip  # noqa: SLF001


def test_skipping_idle_soxr_calls_makes_fewer_calls() -> None:
    calls = 0
    r = StreamResampler(8000, 16000, skip_idle_calls=True)
    process = r._process  # noqa: SLF001
    assert process is not None

    def counting(x: np.ndarray, last: bool) -> np.ndarray:
        nonlocal calls
        calls += 1
        return process(x, last)

    r._process = counting  # noqa: SLF001
    for _ in range(500):  # 10 s of 20 ms frames: ~100 blocks
        r.process(bytes(320))
    assert calls < 250  # 500 without skipping
