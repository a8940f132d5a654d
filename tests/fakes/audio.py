"""Deterministic "speech" for the TTS fakes: each character becomes 20 ms of a tone, so a test
can recompute exactly what the server sent and compare it with what the engine yields."""

from __future__ import annotations

import numpy as np


def fake_speech(text: str, rate: int) -> bytes:
    n = rate // 50
    t = np.arange(n) / rate
    parts = [3000 * np.sin(2 * np.pi * (200 + (ord(c) % 40) * 40) * t) for c in text]
    if not parts:
        return b""
    return np.concatenate(parts).astype("<i2").tobytes()


def odd_chunks(data: bytes, seed: int = 0) -> list[bytes]:
    """Split like a network would: odd sizes, samples cut in half, some tiny pieces."""
    rng = np.random.default_rng(seed)
    out, pos = [], 0
    while pos < len(data):
        n = int(rng.integers(1, 2000))
        out.append(data[pos : pos + n])
        pos += n
    return out
