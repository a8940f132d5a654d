"""Voicemail beep detection: one steady tone in the 400-2,000 Hz band lasting at least ~150 ms.

Sans-I/O, per 20 ms frame of PCM16 mono. Each frame is judged on the last 40 ms (a Hann window,
zero-padded FFT): it is a tone frame when one spectral peak in the band holds most of the energy
(`min_tonality`), the level is above `min_level`, and the peak stays within `max_drift_hz` of where
the run started. Speech fails the tonality test (its energy spreads over several harmonics and
formants) and the stability test (its pitch moves); DTMF is two tones, so no single peak holds most
of the energy. The beep is reported when it ends, since the message starts after it.
"""

from __future__ import annotations

import numpy as np

FRAME_MS = 20
WINDOW_MS = 40


class BeepDetector:
    def __init__(
        self,
        rate: int = 8000,
        *,
        low_hz: float = 400.0,
        high_hz: float = 2000.0,
        min_ms: int = 150,
        max_ms: int = 3000,
        min_tonality: float = 0.7,
        max_drift_hz: float = 20.0,
        min_level: float = 100.0,  # mean absolute sample value, of 32767
    ) -> None:
        self.rate = rate
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.min_tonality = min_tonality
        self.max_drift_hz = max_drift_hz
        self.min_level = min_level
        self._frame = rate * FRAME_MS // 1000
        self._window = rate * WINDOW_MS // 1000
        # zero-padded to ~3x the window: 7.8 Hz bins at 8 kHz, refined by parabolic interpolation
        self._nfft = 1 << int(np.ceil(np.log2(self._window * 3)))
        self._hann = np.hanning(self._window)
        freqs = np.fft.rfftfreq(self._nfft, 1 / rate)
        self._hz_per_bin = float(freqs[1])
        band = np.flatnonzero((freqs >= low_hz) & (freqs <= high_hz))
        self._band_lo, self._band_hi = int(band[0]), int(band[-1]) + 1
        self._voice = (freqs >= 100) & (freqs <= min(3800.0, rate / 2 - 100))
        # The Hann main lobe of the unpadded window is 2 x rate / window wide.
        self._lobe_bins = int(np.ceil(rate / self._window / self._hz_per_bin))
        self._history = np.zeros(self._window, dtype=np.float64)
        self._buf = np.zeros(0, dtype=np.int16)
        self._run_ms = 0
        self._run_hz: float | None = None
        self._miss = 0
        self.elapsed_ms = 0
        self.beeps: list[tuple[int, int, float]] = []  # (start ms, end ms, Hz) of each beep found

    def process(self, pcm: bytes) -> bool:
        """Feed audio; True when a beep has just ended in it."""
        data = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")
        buf = np.concatenate((self._buf, data)) if self._buf.size else data
        ended = False
        n = buf.size // self._frame
        for i in range(n):
            ended |= self._step(buf[i * self._frame:(i + 1) * self._frame])
        self._buf = buf[n * self._frame:].copy()
        return ended

    def tone_hz(self, frame: np.ndarray) -> float | None:
        """The frequency of the steady tone in the last window, or None (updates the history)."""
        self._history = np.concatenate((self._history[frame.size:], frame.astype(np.float64)))
        x = self._history
        if np.abs(x[-frame.size:]).mean() < self.min_level:
            return None
        spectrum = np.fft.rfft(x * self._hann, self._nfft)
        power = spectrum.real**2 + spectrum.imag**2
        peak = self._band_lo + int(np.argmax(power[self._band_lo:self._band_hi]))
        total = float(power[self._voice].sum())
        if total <= 0:
            return None
        lo, hi = max(0, peak - self._lobe_bins), peak + self._lobe_bins + 1
        if float(power[lo:hi].sum()) / total < self.min_tonality:
            return None
        # parabolic interpolation of the peak on log power
        a, b, c = np.log(power[peak - 1:peak + 2] + 1e-12)
        denom = a - 2 * b + c
        offset = 0.5 * (a - c) / denom if denom else 0.0
        return (peak + offset) * self._hz_per_bin

    def _step(self, frame: np.ndarray) -> bool:
        self.elapsed_ms += FRAME_MS
        hz = self.tone_hz(frame)
        if hz is not None and (self._run_hz is None or abs(hz - self._run_hz) <= self.max_drift_hz):
            if self._run_hz is None:
                self._run_hz = hz
            self._run_ms += FRAME_MS
            self._miss = 0
            return False
        if self._run_hz is None:
            return False
        # One odd frame (a click, a jitter gap) does not end a beep; two do.
        self._miss += 1
        if self._miss < 2 and hz is None:
            return False
        # A 40 ms window half in the tone fails at the start and passes at the end, so the run
        # misses about half a frame either side of the true length.
        run_ms, run_hz = self._run_ms + FRAME_MS // 2, self._run_hz
        self._run_ms, self._run_hz, self._miss = 0, None, 0
        if hz is not None:  # a different steady tone starts right away
            self._run_hz, self._run_ms = hz, FRAME_MS
        if self.min_ms <= run_ms <= self.max_ms:
            end = self.elapsed_ms - FRAME_MS * 2
            self.beeps.append((end - run_ms, end, run_hz))
            return True
        return False
