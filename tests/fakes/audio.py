"""Deterministic "speech" for the TTS fakes: each character becomes 20 ms of a tone, so a test
can recompute exactly what the server sent and compare it with what the engine yields."""

from __future__ import annotations

import functools

import numpy as np


def fake_speech(text: str, rate: int) -> bytes:
    """20 ms of tone per character (one of 40 pitches); each tone is made once per rate, so a fake
    serving a hundred calls at once spends no time here."""
    return b"".join(_tone(rate, ord(c) % 40) for c in text)


@functools.cache
def _tone(rate: int, pitch: int) -> bytes:
    t = np.arange(rate // 50) / rate
    return (3000 * np.sin(2 * np.pi * (200 + pitch * 40) * t)).astype("<i2").tobytes()


def odd_chunks(data: bytes, seed: int = 0) -> list[bytes]:
    """Split like a network would: odd sizes, samples cut in half, some tiny pieces."""
    rng = np.random.default_rng(seed)
    out, pos = [], 0
    while pos < len(data):
        n = int(rng.integers(1, 2000))
        out.append(data[pos : pos + n])
        pos += n
    return out
