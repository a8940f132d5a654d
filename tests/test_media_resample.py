"""Stream resampling: frame-by-frame equals one-piece, with no discontinuity at frame edges."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import soxr

from media.polyphase import is_polyphase_pair
from media.resample import StreamResampler

RATES = (8000, 16000, 22050, 24000, 48000)
PAIRS = [(a, b) for a, b in itertools.permutations(RATES, 2)]


def sweep(rate: int, secs: float = 1.5) -> np.ndarray:
    """Log-free linear chirp 100 Hz -> 3.6 kHz, below every output Nyquist (8 kHz rate included)."""
    t = np.arange(int(rate * secs)) / rate
    f0, f1 = 100.0, 3600.0
    k = (f1 - f0) / secs
    return (12000 * np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t))).astype("<i2")


@dataclass
class Measure:
    snr_db: float
    boundary_err: float  # max |framewise - onepiece| within 2 samples of an output chunk edge
    boundary_jump: float  # max |y[b] - y[b-1]| at chunk edges
    inside_jump: float  # max |y[i] - y[i-1]| anywhere else


def measure(out_chunks: list[np.ndarray], ref: np.ndarray) -> Measure:
    y = np.concatenate(out_chunks).astype(float)
    n = min(len(y), len(ref))
    y, r = y[:n], ref[:n].astype(float)
    e = y - r
    snr = 10 * np.log10(np.sum(r**2) / max(float(np.sum(e**2)), 1e-9))
    edges = np.cumsum([len(c) for c in out_chunks])[:-1]
    edges = edges[(edges > 2) & (edges < n - 2)]
    near = np.unique(np.concatenate([edges + d for d in (-2, -1, 0, 1)]))
    jumps = np.abs(np.diff(y))  # jumps[i] = |y[i+1]-y[i]|
    at_edge = np.zeros(len(jumps), dtype=bool)
    at_edge[edges - 1] = True
    return Measure(
        snr_db=float(snr),
        boundary_err=float(np.max(np.abs(e[near]))) if len(near) else 0.0,
        boundary_jump=float(jumps[at_edge].max()) if at_edge.any() else 0.0,
        inside_jump=float(jumps[~at_edge].max()),
    )


def framewise(x: np.ndarray, a: int, b: int) -> list[np.ndarray]:
    r = StreamResampler(a, b)
    xb = x.tobytes()
    fb = a * 20 // 1000 * 2
    outs = [r.process(xb[i : i + fb]) for i in range(0, len(xb), fb)] + [r.flush()]
    return [np.frombuffer(o, dtype="<i2") for o in outs if o]


def one_piece(x: np.ndarray, a: int, b: int) -> np.ndarray:
    """The whole signal at once: the polyphase pairs' own filter, soxr HQ for the others (its one-shot
    call; the polyphase filter is compared with soxr in tests/test_media_resample_polyphase.py)."""
    if not is_polyphase_pair(a, b):
        return soxr.resample(x, a, b, quality="HQ")
    r = StreamResampler(a, b)
    return np.frombuffer(r.process(x.tobytes()) + r.flush(), dtype="<i2")


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_framewise_matches_one_piece(a: int, b: int) -> None:
    x = sweep(a)
    ref = one_piece(x, a, b)
    m = measure(framewise(x, a, b), ref)
    print(f"{a}->{b}: SNR {m.snr_db:.1f} dB, edge err {m.boundary_err:.0f} LSB, jumps edge/inside {m.boundary_jump:.0f}/{m.inside_jump:.0f}")
    assert m.snr_db >= 40.0
    assert m.boundary_err <= 4.0  # int16 rounding only
    assert m.boundary_jump <= m.inside_jump


def test_total_length_preserved() -> None:
    for a, b in PAIRS:
        x = sweep(a, 1.0)
        out = framewise(x, a, b)
        assert abs(sum(len(o) for o in out) - len(x) * b / a) <= 2, (a, b)


def test_per_chunk_one_shot_resampling_is_caught() -> None:
    """Control: the metric flags the click-prone approach (one-shot soxr per 20 ms chunk)."""
    a, b = 8000, 16000
    x = sweep(a)
    ref = soxr.resample(x, a, b, quality="HQ")
    chunks = [soxr.resample(x[i : i + 160], a, b, quality="HQ") for i in range(0, len(x), 160)]
    m = measure(chunks, ref)
    assert m.snr_db < 40.0
    assert m.boundary_err > 100


def test_odd_byte_chunks_and_empty_chunks() -> None:
    x = sweep(24000, 0.5).tobytes()
    r = StreamResampler(24000, 8000)
    rng = np.random.default_rng(7)
    out, pos = [], 0
    while pos < len(x):
        n = int(rng.integers(0, 333))  # odd sizes and zero-size chunks
        out.append(r.process(x[pos : pos + n]))
        pos += n
    out.append(r.flush())
    y = np.frombuffer(b"".join(out), dtype="<i2")
    ref = soxr.resample(np.frombuffer(x, dtype="<i2"), 24000, 8000, quality="HQ")
    m = measure([y], ref)
    assert m.snr_db >= 40.0


def test_passthrough_equal_rates() -> None:
    r = StreamResampler(16000, 16000)
    assert r.passthrough
    assert r.process(b"\x01\x02\x03") == b"\x01\x02"
    assert r.process(b"\x04") == b"\x03\x04"
    assert r.flush() == b""
