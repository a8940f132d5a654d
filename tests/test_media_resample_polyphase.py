"""The polyphase resampler of the telephony pairs: frequency response, images/aliases, agreement with
soxr HQ, delay compensation, chunking invariance, output with every frame, memory per stream."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from media.polyphase import is_polyphase_pair
from media.resample import StreamResampler
from tests.fakes.audio import fake_speech

PAIRS = [(8000, 16000), (16000, 8000), (8000, 24000), (24000, 8000), (16000, 24000), (24000, 16000)]
IDS = [f"{a}-{b}" for a, b in PAIRS]


def run(x: np.ndarray, a: int, b: int, frame_ms: int = 20) -> np.ndarray:
    r = StreamResampler(a, b)
    xb = x.astype("<i2").tobytes()
    step = a * frame_ms // 1000 * 2
    out = [r.process(xb[i:i + step]) for i in range(0, len(xb), step)] + [r.flush()]
    return np.frombuffer(b"".join(out), "<i2").astype(float)


def tone(f: float, rate: int, secs: float = 0.5, amp: float = 16000.0) -> np.ndarray:
    return amp * np.sin(2 * np.pi * f * np.arange(int(rate * secs)) / rate)


def amplitude(y: np.ndarray, f: float, rate: int) -> float:
    """Amplitude of the component at f, by least squares over the middle (Hann-weighted: no leakage
    from a tone 60 dB stronger a few hundred Hz away)."""
    y = y[len(y) // 5: -len(y) // 5]
    t = np.arange(len(y)) / rate
    w = np.hanning(len(y))
    c, s = np.cos(2 * np.pi * f * t) * w, np.sin(2 * np.pi * f * t) * w
    return float(2 * np.hypot(y @ c, y @ s) / w.sum())


def fold(f: float, rate: int) -> float:
    f = abs(f) % rate
    return min(f, rate - f)


def lower_nyquist(a: int, b: int) -> float:
    return min(a, b) / 2


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=IDS)
def test_passband_flat_within_half_a_db(a: int, b: int) -> None:
    assert is_polyphase_pair(a, b)
    top = 0.9 * lower_nyquist(a, b)
    worst = 0.0
    for f in np.linspace(100, top, 12):
        gain = amplitude(run(tone(f, a), a, b), f, b) / 16000
        worst = max(worst, abs(20 * np.log10(gain)))
    print(f"{a}->{b}: passband to {top:.0f} Hz within {worst:.3f} dB")
    assert worst <= 0.5


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=IDS)
def test_images_and_aliases_60_db_down(a: int, b: int) -> None:
    nyq = lower_nyquist(a, b)
    # passband tones (their images, when upsampling) and tones above 1.1 x the output's Nyquist
    # (their aliases, when downsampling); candidates: f + k * a folded into the output band
    tones = list(np.linspace(150, 0.9 * nyq, 7)) + ([] if a < b else list(np.linspace(1.1 * nyq + 50, a / 2 - 100, 5)))
    worst = -200.0
    for f in tones:
        y = run(tone(f, a), a, b)
        for k in range(-4, 5):
            g = fold(f + k * a, b)
            if k == 0 and f < nyq:
                continue  # the tone itself
            if abs(g - f) < 60 and f < nyq or g < 50 or g > b / 2 - 50:
                continue  # indistinguishable from the tone / at DC or Nyquist
            worst = max(worst, 20 * np.log10(max(amplitude(y, g, b), 1e-3) / 16000))
    print(f"{a}->{b}: worst image/alias {worst:.1f} dB")
    assert worst <= -60


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=IDS)
def test_matches_soxr_hq_delay_aligned(a: int, b: int) -> None:
    nyq = lower_nyquist(a, b)
    t = np.arange(int(a * 2.0)) / a
    sweep = 12000 * np.sin(2 * np.pi * (100 * t + 0.5 * (0.9 * nyq - 100) / 2.0 * t * t))
    speech = np.frombuffer(fake_speech("the quick brown fox jumps over the lazy dog", a), "<i2").astype(float)
    for name, x, floor in (("sweep", sweep, 45.0), ("speech", speech, 40.0)):
        ours = run(x, a, b)
        ref = soxr.resample(x.astype("<i2"), a, b, quality="HQ").astype(float)
        assert abs(len(ours) - len(ref)) <= 1
        n = min(len(ours), len(ref))
        ours, ref = ours[:n], ref[:n]
        lags = np.arange(-8, 9)
        corr = [np.dot(ours[200 + k: n - 200 + k], ref[200: n - 200]) for k in lags]
        assert lags[int(np.argmax(corr))] == 0  # same alignment as soxr: output i is input i
        snr = 10 * np.log10(np.sum(ref**2) / np.sum((ours - ref) ** 2))
        print(f"{a}->{b} {name}: SNR vs soxr HQ {snr:.1f} dB")
        assert snr >= floor


def one_piece(pcm: bytes, a: int, b: int) -> bytes:
    r = StreamResampler(a, b)
    return r.process(pcm) + r.flush()


@settings(max_examples=60, deadline=None)
@given(pair=st.sampled_from(PAIRS), seed=st.integers(0, 2**16),
       sizes=st.lists(st.integers(0, 700), min_size=1, max_size=12))
def test_output_does_not_depend_on_chunk_sizes(pair: tuple[int, int], seed: int, sizes: list[int]) -> None:
    a, b = pair
    rng = np.random.default_rng(seed)
    pcm = rng.normal(0, 9000, a // 5).clip(-32768, 32767).astype("<i2").tobytes()
    r = StreamResampler(a, b)
    out, i, k = [], 0, 0
    while i < len(pcm):
        n = sizes[k % len(sizes)]
        out.append(r.process(pcm[i:i + n]))
        i, k = i + n, k + 1
        if k > 10 * len(pcm):  # all-zero sizes: finish in one piece
            out.append(r.process(pcm[i:]))
            break
    out.append(r.flush())
    assert b"".join(out) == one_piece(pcm, a, b)


@settings(max_examples=40, deadline=None)
@given(pair=st.sampled_from(PAIRS), seed=st.integers(0, 2**16), hold_ms=st.sampled_from([20, 40, 100]),
       frames=st.integers(1, 40))
def test_held_input_gives_the_same_samples_in_pieces(pair: tuple[int, int], seed: int, hold_ms: int,
                                                      frames: int) -> None:
    a, b = pair
    rng = np.random.default_rng(seed)
    pcm = rng.normal(0, 9000, a // 50 * frames).clip(-32768, 32767).astype("<i2").tobytes()
    r = StreamResampler(a, b, hold_ms=hold_ms)
    step = a // 50 * 2
    out = [r.process(pcm[i:i + step]) for i in range(0, len(pcm), step)]
    per_piece = hold_ms // 20
    assert [i for i, o in enumerate(out) if o] == list(range(per_piece - 1, frames, per_piece))
    held = r.pending_s
    assert held <= hold_ms / 1000 + 0.011
    out.append(r.flush())  # the held rest comes out at the end
    assert b"".join(out) == one_piece(pcm, a, b)


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=IDS)
def test_output_with_every_frame_and_exact_length(a: int, b: int) -> None:
    r = StreamResampler(a, b)
    frame = bytes(np.full(a // 50, 1000, "<i2").tobytes())
    sizes = [len(r.process(frame)) // 2 for _ in range(50)]
    assert all(s == b // 50 for s in sizes[1:])  # no blocks: one output frame per input frame
    assert 0 < r.pending_s <= 0.011  # one block (2.5-5 ms) and the filter's half span (2.5 ms)
    assert len(r.flush()) // 2 + sum(sizes) == 50 * b // 50
    assert r.samples_in == 0  # flush resets


def test_full_scale_clips_instead_of_wrapping() -> None:
    square = np.tile(np.r_[np.full(20, 32767), np.full(20, -32768)], 40)
    y = run(square, 8000, 16000)
    assert y.max() == 32767 and y.min() == -32768
    d = np.abs(np.diff(y))
    assert d.max() < 40000  # a wrapped sample would jump ~65535


def test_memory_per_stream_pair_is_small() -> None:
    frame8 = np.random.default_rng(1).normal(0, 3000, 160).astype("<i2").tobytes()
    StreamResampler(8000, 16000).process(frame8)  # the shared weights, built once per pair
    StreamResampler(16000, 8000).process(bytes(640))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        pairs = [(StreamResampler(8000, 16000), StreamResampler(16000, 8000)) for _ in range(200)]
        for _ in range(50):  # 1 s of 20 ms frames each
            for up, down in pairs:
                down.process(up.process(frame8))
        per_pair = (tracemalloc.get_traced_memory()[0] - base) / len(pairs)
    finally:
        tracemalloc.stop()
    print(f"traced memory per resampler pair: {per_pair:.0f} B")
    assert per_pair < 8192  # the last input chunk stays alive as a view until the next (soxr: ~180 KB a pair)


def test_other_pairs_stay_on_soxr() -> None:
    assert not is_polyphase_pair(8000, 48000) and not is_polyphase_pair(22050, 16000)
    assert not is_polyphase_pair(16000, 16000)
    assert StreamResampler(8000, 48000)._stream is not None  # noqa: SLF001
