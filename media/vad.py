"""A small energy VAD with an adaptive noise floor, for barge-in when the STT engine has no
speech-started event. Works per 20 ms frame of PCM16 mono at any rate (sans-I/O)."""

from __future__ import annotations

import math
import warnings
from collections import deque

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # the C RMS (stdlib up to 3.12, `audioop-lts` from 3.13), as media/g711.py uses


class EnergyVad:
    """Speech = frame level `threshold_db` above the noise floor (and above `min_dbfs`) for
    `start_frames` consecutive frames; it ends after `hangover_frames` quiet frames.

    The floor is the minimum frame level over the last `window_s` (minimum statistics): speech has
    pauses between syllables, steady noise does not, so a fan or line hiss that starts, or steps
    up, is learned within `window_s` and never reads as endless speech.
    """

    def __init__(
        self,
        *,
        threshold_db: float = 12.0,
        min_dbfs: float = -45.0,
        start_frames: int = 3,
        hangover_frames: int = 15,
        window_s: float = 1.5,
        initial_floor_dbfs: float = -60.0,
        frame_ms: int = 20,
    ) -> None:
        self.threshold_db = threshold_db
        self.min_dbfs = min_dbfs
        self.start_frames = start_frames
        self.hangover_frames = hangover_frames
        self._initial = initial_floor_dbfs
        self._window = max(1, round(window_s * 1000 / frame_ms))
        # the floor: a sliding-window minimum kept as a monotonic deque of (frame number, level),
        # O(1) per frame instead of a min() over the whole window
        self._mins: deque[tuple[int, float]] = deque()
        self._frames = 0
        self._above = 0
        self._below = 0
        self.speaking = False
        self.ended = False  # True for the one frame on which speech turned to silence
        self.frame_ms = frame_ms

    @property
    def floor_dbfs(self) -> float:
        return self._mins[0][1] if self._mins else self._initial

    @staticmethod
    def level_dbfs(pcm: bytes) -> float:
        if len(pcm) < 2:
            return -120.0
        rms = audioop.rms(pcm[: len(pcm) & ~1], 2)
        return 10 * math.log10(rms * rms / (32768.0 * 32768.0) + 1e-12)

    def _remember(self, level: float) -> None:
        n = self._frames = self._frames + 1
        mins = self._mins
        while mins and mins[-1][1] >= level:
            mins.pop()
        mins.append((n, level))
        if mins[0][0] <= n - self._window:
            mins.popleft()

    def process(self, pcm: bytes) -> bool:
        """Feed one frame; True exactly when speech starts (`ended` tells when it stopped)."""
        self.ended = False
        if len(pcm) < 2:
            return False
        level = self.level_dbfs(pcm)
        loud = level > max(self.floor_dbfs + self.threshold_db, self.min_dbfs)
        self._remember(level)
        if loud:
            self._above += 1
            self._below = 0
        else:
            self._below += 1
            self._above = 0
        if not self.speaking and self._above >= self.start_frames:
            self.speaking = True
            return True
        if self.speaking and self._below >= self.hangover_frames:
            self.speaking = False
            self.ended = True
        return False

    @property
    def hangover_s(self) -> float:
        """How long before `ended` is seen the caller actually fell silent."""
        return self.hangover_frames * self.frame_ms / 1000
