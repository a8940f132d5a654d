"""Polyphase windowed-sinc FIR resampling for the telephony rate pairs (8k <-> 16k <-> 24k).

Ratio L/M (up L, down M): the prototype low-pass runs at L x the input rate, cut off at the lower
rate's Nyquist, Kaiser window; passband flat to 0.9 x that Nyquist, images/aliases >= 60 dB down
from 1.1 x it (the transition is centred on the Nyquist, so only content between 0.9 and 1 x folds,
and it folds into 0.9-1.1 x: the passband stays clean). The filter is centred on each output
sample: output j is input time j * M / L, so the output is delay-compensated by construction.

Every L outputs consume M inputs with the same weights, so one BLAS matmul of a strided view of
the input (one row per group of L outputs) by a (taps x L) matrix does a whole chunk. Coefficients
are built once per pair and shared; a stream keeps only the last few dozen input samples.
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
# Weights on a 2^-32 grid: an int16 sample times a weight is then a multiple of 2^-32 below 2^15, and
# a window's sum (sum |w| < 4; 2.6 at most here) below 2^17, i.e. < 2^49 grid steps: exact in float64 (53 bits) in any
# summation order. So the output does not depend on how BLAS splits the work, i.e. on the chunk sizes.
_GRID = 2.0**32
# the clip ufunc itself: np.clip's wrapper costs ~3 us per call (numpy 2 moved it from np.core to np._core)
_clip: np.ufunc = (getattr(np, "_core", None) or np.core).umath.clip


def is_polyphase_pair(in_rate: int, out_rate: int) -> bool:
    return in_rate != out_rate and in_rate in POLYPHASE_RATES and out_rate in POLYPHASE_RATES


class Polyphase:
    """The weights for one rate pair: output group q (L samples) = window q (W inputs) @ weights."""

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
        self.weights = np.round(w * _GRID) / _GRID
        assert np.abs(self.weights).sum(axis=0).max() < 4.0  # the exactness bound above
        self.taps = n


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
        """PCM16 in (whole samples), every output group whose inputs are all here out."""
        f = self._f
        buf = np.concatenate((self._hist, np.frombuffer(pcm, _I16)), dtype=_F64)
        groups = (len(buf) - f.width) // f.down + 1
        if groups <= 0:
            self._hist = buf
            return b""
        self._hist = buf[groups * f.down:]
        if len(buf) > 1024:  # do not keep a whole TTS chunk alive for the few samples kept
            self._hist = self._hist.copy()
        # BLAS cannot take overlapping rows: numpy's own loop on the strided view is ~2x slower than a copy
        return _pcm16(np.ascontiguousarray(np.ndarray((groups, f.width), _F64, buf, 0, (f.down * 8, 8))) @ f.weights)

    def flush(self, samples_in: int, samples_out: int) -> bytes:
        """The rest of the output, up to ceil(samples_in x L / M) in all: the input goes on as silence."""
        f = self._f
        missing = -(-samples_in * f.up // f.down) - samples_out
        if missing <= 0:
            return b""
        groups = -(-missing // f.up)
        need = (groups - 1) * f.down + f.width
        buf = np.concatenate((self._hist, np.zeros(max(0, need - len(self._hist)), _F64)))
        out = np.ascontiguousarray(np.ndarray((groups, f.width), _F64, buf, 0, (f.down * 8, 8))) @ f.weights
        return _pcm16(out.reshape(-1)[:missing])

    def reset(self) -> None:
        self._hist = np.zeros(-self._f.lo, _F64)


def _pcm16(y: np.ndarray) -> bytes:
    np.rint(y, out=y)
    _clip(y, -32768.0, 32767.0, out=y)
    return y.astype(_I16).tobytes()
