"""No inbound resampler for a listener that takes only wire audio; the caller's pipeline-rate audio
comes with every frame (the polyphase pairs hold no ~100 ms blocks); the direct call into soxr's C
process (the other pairs) gives what its public method gives."""

from __future__ import annotations

import numpy as np

from media import g711
from media.formats import ULAW_8K
from media.pipeline import CALLER_RESAMPLE_HOLD_MS, MediaPipeline
from media.resample import StreamResampler


class Leg:
    format = ULAW_8K
    supports_marks = False
    reports_dtmf = True

    async def send_media(self, payload: bytes) -> None: ...
    async def send_mark(self, name: str) -> None: ...
    async def send_clear(self) -> None: ...


class Listener:
    def __init__(self, wants_pipeline_audio: bool = True, hold_ms: int | None = None) -> None:
        self.wants_pipeline_audio = wants_pipeline_audio
        self.pipeline_audio_hold_ms = hold_ms
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


async def bytes_out_per_frame(listener: Listener, seconds: float) -> list[int]:
    """Feed `seconds` of caller frames; how many pipeline-rate bytes the listener got after each."""
    pipeline = MediaPipeline(Leg(), listener, pipeline_rate=16000)  # type: ignore[arg-type]
    sizes = []
    for f in speech_frames(seconds):
        before = len(listener.pcm)
        pipeline.receive(f)
        sizes.append(len(listener.pcm) - before)
    await pipeline.close()
    return sizes


async def test_pipeline_audio_comes_in_pieces_of_the_caller_hold() -> None:
    listener = Listener()
    sizes = await bytes_out_per_frame(listener, 1.0)
    per_piece = CALLER_RESAMPLE_HOLD_MS // 20  # frames per piece
    pieces = [n for n in sizes if n]
    assert [i for i, n in enumerate(sizes) if n] == list(range(per_piece - 1, len(sizes), per_piece))
    assert pieces[0] > 0 and set(pieces[1:]) == {CALLER_RESAMPLE_HOLD_MS * 32}  # 16 kHz, 2 bytes a sample
    # output sample 2i is input sample i's time (delay-compensated); the half-band filter passes the
    # even phase through untouched
    heard = np.frombuffer(bytes(listener.pcm), "<i2")
    wire = np.frombuffer(g711.decode(b"".join(speech_frames(1.0)), ULAW_8K.encoding), "<i2")
    assert np.array_equal(heard[::2], wire[:len(heard[::2])])


async def test_a_listener_that_acts_on_the_audio_gets_every_frame_as_it_comes() -> None:
    """An STT on pipeline-rate audio (or a realtime model) asks for hold 0: the caller's last word
    reaches it with its own frame, not up to 100 ms later."""
    sizes = await bytes_out_per_frame(Listener(hold_ms=0), 0.5)
    assert all(sizes) and set(sizes[1:]) == {640}  # 20 ms at 16 kHz with every frame


async def test_a_new_listener_changes_the_hold_and_loses_no_sample() -> None:
    frames = speech_frames(1.0)
    whole = Listener()
    reference = MediaPipeline(Leg(), whole, pipeline_rate=16000)  # type: ignore[arg-type]
    for f in frames:
        reference.receive(f)
    held, live = Listener(), Listener(hold_ms=0)
    pipeline = MediaPipeline(Leg(), held, pipeline_rate=16000)  # type: ignore[arg-type]
    for f in frames[:12]:  # 2 pieces out, 2 frames held
        pipeline.receive(f)
    pipeline.set_listener(live)  # type: ignore[arg-type]
    for f in frames[12:]:
        before = len(live.pcm)
        pipeline.receive(f)
        assert len(live.pcm) > before  # from now on with every frame
    await reference.close()
    await pipeline.close()
    assert 0 < len(held.pcm) < 2 * CALLER_RESAMPLE_HOLD_MS * 32  # the first piece is short by the filter delay
    assert bytes(held.pcm + live.pcm) == bytes(whole.pcm)


def test_direct_soxr_call_gives_the_public_methods_output() -> None:
    rng = np.random.default_rng(5)
    pcm = rng.normal(0, 4000, 8000 * 2).astype("<i2").tobytes()
    for rates in ((8000, 48000), (48000, 8000), (22050, 8000), (8000, 44100)):
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


