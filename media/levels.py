"""Audio level tap: RMS per side (caller in, bot out), read a few times a second by whoever watches.

Opt-in: a MediaPipeline feeds its taps only while one is attached, so an unwatched call pays nothing.
"""

from __future__ import annotations

import math

import numpy as np

FULL_SCALE = 32768.0


class LevelTap:
    """Sums of squares of PCM16 samples since the last `take()`, per side."""

    __slots__ = ("_bot", "_caller")

    def __init__(self) -> None:
        self._caller = [0.0, 0]
        self._bot = [0.0, 0]

    def caller(self, pcm: bytes) -> None:
        _add(self._caller, pcm)

    def bot(self, pcm: bytes) -> None:
        _add(self._bot, pcm)

    def take(self) -> dict[str, float]:
        """RMS of each side since the last call, as a fraction of full scale (0 when nothing played)."""
        out = {"caller": _rms(self._caller), "bot": _rms(self._bot)}
        self._caller[:] = [0.0, 0]
        self._bot[:] = [0.0, 0]
        return out


def _add(acc: list[float], pcm: bytes) -> None:
    samples = np.frombuffer(pcm, dtype=np.int16, count=len(pcm) // 2).astype(np.float64)
    acc[0] += float(np.dot(samples, samples))
    acc[1] += samples.size


def _rms(acc: list[float]) -> float:
    return math.sqrt(acc[0] / acc[1]) / FULL_SCALE if acc[1] else 0.0
