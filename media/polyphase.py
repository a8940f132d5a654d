"""Polyphase windowed-sinc FIR resampling for the telephony rate pairs (8k <-> 16k <-> 24k).

Ratio L/M (up L, down M): the prototype low-pass runs at L x the input rate, cut off at the lower
rate's Nyquist, Kaiser window; passband flat to 0.9 x that Nyquist, images/aliases >= 60 dB down
from 1.1 x it (the transition is centred on the Nyquist, so only content between 0.9 and 1 x folds,
and it folds into 0.9-1.1 x: the passband stays clean). The filter is centred on each output
sample: output j is input time j * M / L, so the output is delay-compensated by construction.

Every L outputs (a group) consume M inputs with the same weights. Groups are done B at a time, a
block of P = B x M inputs: a block's outputs depend on that block and the next (P >= the filter's
span), so the input cut in 2P-sample rows with a P stride (a copy of twice the input, not of every
window) times one shared (2P x B*L) matrix does a whole chunk in one BLAS call. P is 2.5-5 ms,
dividing 20 ms, so 20 ms frames come out whole. Weights are built once per pair and shared; a
stream keeps only the input the next block still needs (< 2P samples).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

ATTENUATION_DB = 65.0  # 60 dB asked, 5 dB kept for int16 rounding
PASS_FRACTION = 0.9  # of the lower rate's Nyquist
POLYPHASE_RATES = frozenset({8000, 16000, 24000})

_I16 = np.dtype("<i2")
_F64 = np.dtype(np.float64)
# Weights on a 2^-32 grid: an int16 sample times a weight is then a multiple of 2^-32 below 2^15,
# and a window's sum (sum |w| < 4; 2.6 at most here) below 2^17, i.e. < 2^49 grid steps: exact in
# float64 (53 bits) in any summation order. So the output does not depend on how BLAS splits the
# work, i.e. on the chunk sizes.
_GRID = 2.0**32
# the clip ufunc itself: np.clip's wrapper costs ~3 us per call (numpy 2 moved it from np.core to np._core)
_clip: np.ufunc = (getattr(np, "_core", None) or np.core).umath.clip


def is_polyphase_pair(in_rate: int, out_rate: int) -> bool:
    return in_rate != out_rate and in_rate in POLYPHASE_RATES and out_rate in POLYPHASE_RATES


class Polyphase:
    """The weights for one rate pair: group q (L outputs) = inputs q*M + lo .. q*M + hi, weighted."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        g = math.gcd(in_rate, out_rate)
        self.up, self.down = up, down = out_rate // g, in_rate // g
        f = up * in_rate  # the prototype filter's rate
        nyquist = min(in_rate, out_rate) / 2
        transition = 2 * (1 - PASS_FRACTION) * nyquist / f  # cycles per sample at the filter rate
        n = math.ceil((ATTENUATION_DB - 7.95) / (2.285 * 2 * math.pi * transition)) | 1  # odd: integer centre
        beta = 0.1102 * (ATTENUATION_DB - 8.7)
        centre = (n - 1) // 2
        k = np.arange(n) - centre
        h = up * (2 * nyquist / f) * np.sinc(2 * nyquist / f * k) * np.kaiser(n, beta)
        # output j sits at filter-rate time j*M; y[j] = sum_i x[i] h[j*M + centre - i*L]
        # the newest and oldest input each phase r uses, relative to q*M for output group q
        self.hi = max((r * down + centre) // up for r in range(up))
        self.lo = min(-((n - 1 - r * down - centre) // up) for r in range(up))
        self.width = self.hi - self.lo + 1
        w = np.zeros((self.width, up))
        for r in range(up):
            for col in range(self.width):
                tap = r * down + centre - (self.lo + col) * up
                if 0 <= tap < n:
                    w[col, r] = h[tap]
        w = np.round(w * _GRID) / _GRID
        assert np.abs(w).sum(axis=0).max() < 4.0  # the exactness bound above
        self.taps = n
        # a block: P inputs = B groups; P a multiple of M, at least the span W - M (so two blocks hold
        # every window of the first; more only costs flops) and, if it can, a divisor of 20 ms
        span = down * -(-(self.width - down) // down)
        self.block = next((p for p in range(span, in_rate // 50 + 1, down) if in_rate // 50 % p == 0), span)
        groups = self.block // down
        self.matrix = np.zeros((2 * self.block, groups * up))  # one row of 2P inputs -> B*L outputs
        for b in range(groups):
            self.matrix[b * down:b * down + self.width, b * up:(b + 1) * up] = w


@cache
def polyphase(in_rate: int, out_rate: int) -> Polyphase:
    return Polyphase(in_rate, out_rate)


class PolyphaseStream:
    """One direction's state: the input samples the next output group still needs."""

    __slots__ = ("_f", "_hist")

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self._f = polyphase(in_rate, out_rate)
        self._hist = np.zeros(-self._f.lo, _F64)  # the signal is silent before its first sample

    def process(self, pcm: bytes) -> bytes:
        """PCM16 in (whole samples), every whole block whose inputs are all here out."""
        f = self._f
        buf = np.concatenate((self._hist, np.frombuffer(pcm, _I16)), dtype=_F64)
        rows = len(buf) // f.block - 1
        if rows <= 0:
            self._hist = buf
            return b""
        self._hist = buf[rows * f.block:]
        if rows > 8:  # do not keep a whole TTS chunk alive for the few samples kept
            self._hist = self._hist.copy()
        return _pcm16(self._blocks(buf, rows))

    def flush(self, samples_in: int, samples_out: int) -> bytes:
        """The rest of the output, up to ceil(samples_in x L / M) in all: the input goes on as silence."""
        f = self._f
        missing = -(-samples_in * f.up // f.down) - samples_out
        if missing <= 0:
            return b""
        rows = -(-missing // f.matrix.shape[1])
        buf = np.concatenate((self._hist, np.zeros(max(0, (rows + 1) * f.block - len(self._hist)), _F64)))
        return _pcm16(self._blocks(buf, rows).reshape(-1)[:missing])

    def _blocks(self, buf: np.ndarray, rows: int) -> np.ndarray:
        f = self._f
        # row j = inputs jP .. jP+2P-1 (overlapping rows: BLAS needs them copied, 2x the input)
        view = np.ndarray((rows, 2 * f.block), _F64, buf, 0, (f.block * 8, 8))
        return np.ascontiguousarray(view) @ f.matrix

    def reset(self) -> None:
        self._hist = np.zeros(-self._f.lo, _F64)


def _pcm16(y: np.ndarray) -> bytes:
    np.rint(y, out=y)
    _clip(y, -32768.0, 32767.0, out=y)
    return y.astype(_I16).tobytes()
