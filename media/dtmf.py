"""In-band DTMF: a Goertzel detector (ITU-T Q.23/Q.24 style checks) and a tone generator.

The detector runs on PCM16 mono at any rate (the pipeline rate in the bridge). Blocks of ~25.6 ms
advance by half a block; each block's power at the 8 DTMF frequencies and at their second
harmonics is the Goertzel single-bin DFT, computed for all 16 bins at once as one matrix product
(the same numbers as the Goertzel recurrence, without a Python loop per sample).

A block holds a digit only if all of these hold, which is what rejects speech and noise:
  - level: block RMS above `min_dbfs`;
  - purity: the two tones carry most of the block's energy (speech spreads over many harmonics);
  - relative peak: the best row/column beats the runner-up by `peak_ratio_db`;
  - twist: row/column power difference within `max_twist_db` / `max_reverse_twist_db`;
  - harmonics: the second harmonics of the tones are weak (voiced speech has strong harmonics).
A digit is reported once it holds for `min_blocks` consecutive blocks (>= ~38 ms of tone) and is
not reported again until `release_blocks` blocks without it (debounce).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NewType

import numpy as np

ROWS = (697.0, 770.0, 852.0, 941.0)
COLS = (1209.0, 1336.0, 1477.0, 1633.0)
KEYS = ("123A", "456B", "789C", "*0#D")
DIGITS = "".join(KEYS)

# One key of the 16: 0-9, *, #, A-D (upper case). Every source (carrier stream frames, webhooks,
# SIP INFO/RFC 2833, the in-band detector) hands digits on as this type.
DtmfDigit = NewType("DtmfDigit", str)


def dtmf_digit(value: object) -> DtmfDigit:
    """`value` as a DtmfDigit: exactly one character of 0-9 * # A-D (a-d accepted); else ValueError."""
    if isinstance(value, str) and len(value) == 1 and value.upper() in DIGITS:
        return DtmfDigit(value.upper())
    raise ValueError(f"not a DTMF digit: {value!r}")


def _digit_freqs(digit: str) -> tuple[float, float]:
    for r, row in enumerate(KEYS):
        c = row.find(digit.upper())
        if c >= 0:
            return ROWS[r], COLS[c]
    raise ValueError(f"not a DTMF digit: {digit!r}")


def dtmf_tones(
    digits: str, rate: int, tone_ms: int = 100, gap_ms: int = 60, *, level_dbfs: float = -10.0
) -> bytes:
    """PCM16 mono of `digits` as DTMF tones, each tone followed by `gap_ms` of silence.

    `level_dbfs` is the peak level of each of the two tones; 5 ms raised-cosine edges avoid clicks.
    """
    amp = 32767.0 * 10 ** (level_dbfs / 20.0)
    n_tone = rate * tone_ms // 1000
    n_gap = rate * gap_ms // 1000
    t = np.arange(n_tone) / rate
    ramp = min(n_tone // 2, rate * 5 // 1000)
    env = np.ones(n_tone)
    if ramp:
        edge = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[:ramp] = edge
        env[-ramp:] = edge[::-1]
    parts: list[np.ndarray] = []
    for d in digits:
        lo, hi = _digit_freqs(d)
        tone = amp * env * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t))
        parts.append(tone)
        parts.append(np.zeros(n_gap))
    if not parts:
        return b""
    return np.clip(np.round(np.concatenate(parts)), -32768, 32767).astype("<i2").tobytes()


class DtmfDetector:
    def __init__(
        self,
        rate: int,
        *,
        min_dbfs: float = -42.0,
        min_purity: float = 0.6,
        peak_ratio_db: float = 8.0,
        max_twist_db: float = 8.0,
        max_reverse_twist_db: float = 8.0,
        max_harmonic_db: float = -12.0,
        min_blocks: int = 2,
        release_blocks: int = 2,
    ) -> None:
        self.rate = rate
        self.block = max(64, round(rate * 0.0256))
        self.hop = self.block // 2
        freqs = np.array(ROWS + COLS + tuple(2 * f for f in ROWS + COLS))
        n = np.arange(self.block)
        w = 2 * np.pi * freqs / rate
        phase = np.outer(n, w)
        self._basis = np.ascontiguousarray(np.concatenate([np.cos(phase), np.sin(phase)], axis=1))  # (block, 32)
        self._min_energy = self.block * (32768.0 * 10 ** (min_dbfs / 20.0)) ** 2
        self._min_purity = min_purity
        self._peak_ratio = 10 ** (peak_ratio_db / 10.0)
        self._twist = 10 ** (max_twist_db / 10.0)
        self._rtwist = 10 ** (max_reverse_twist_db / 10.0)
        self._harm = 10 ** (max_harmonic_db / 10.0)
        self._min_blocks = min_blocks
        self._release = release_blocks
        self._buf = np.zeros(0, dtype=np.float64)
        self._candidate: str | None = None
        self._count = 0
        self._misses = 0
        self._active: str | None = None  # digit already reported and still held

    def reset(self) -> None:
        self._buf = np.zeros(0, dtype=np.float64)
        self._candidate, self._count, self._misses, self._active = None, 0, 0, None

    def classify(self, x: np.ndarray) -> str | None:
        """The digit in one block of `self.block` float samples, or None."""
        energy = float(np.dot(x, x))
        if energy < self._min_energy:
            return None
        y = x @ self._basis
        p = (y[:16] ** 2 + y[16:] ** 2) * (2.0 / self.block)  # ~ energy of each sinusoid
        rows, cols, h_rows, h_cols = p[0:4], p[4:8], p[8:12], p[12:16]
        r = int(np.argmax(rows))
        c = int(np.argmax(cols))
        pr, pc = rows[r], cols[c]
        if (pr + pc) < self._min_purity * energy:
            return None
        others_r = np.delete(rows, r)
        others_c = np.delete(cols, c)
        if pr < self._peak_ratio * others_r.max() or pc < self._peak_ratio * others_c.max():
            return None
        if pr > pc * self._twist or pc > pr * self._rtwist:
            return None
        # Relative to both tones: the row's 2nd harmonic bins (1394-1882 Hz) sit near the column
        # tones and pick up their leakage, which must not count as a harmonic.
        if h_rows[r] > (pr + pc) * self._harm or h_cols[c] > (pr + pc) * self._harm:
            return None
        return KEYS[r][c]

    def _blocks(self, pcm: bytes) -> Iterator[np.ndarray]:
        if pcm:
            self._buf = np.concatenate([self._buf, np.frombuffer(pcm, dtype="<i2").astype(np.float64)])
        while len(self._buf) >= self.block:
            yield self._buf[: self.block]
            self._buf = self._buf[self.hop :]

    def process(self, pcm: bytes) -> list[str]:
        """Feed PCM16; returns digits whose tone was confirmed in this chunk."""
        found: list[str] = []
        for blk in self._blocks(pcm):
            d = self.classify(blk)
            if d is not None and d == self._candidate:
                self._count += 1
            else:
                self._candidate, self._count = d, (1 if d else 0)
            if d is None or d != self._active:
                self._misses += 1
                if self._misses >= self._release:
                    self._active = None
            else:
                self._misses = 0
            if d is not None and self._count >= self._min_blocks and d != self._active:
                self._active = d
                self._misses = 0
                found.append(d)
        return found


def tone_level_dbfs(pcm: bytes) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if not len(x):
        return -math.inf
    rms = math.sqrt(float(np.mean(x * x)))
    return 20 * math.log10(max(rms, 1e-9) / 32768.0)
