"""Audio fixtures (espeak-ng speech, tones) and signal measurements for real-peer tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

ESPEAK = shutil.which("espeak-ng") or "espeak-ng"
SOX = shutil.which("sox") or "sox"


def speech_wav(path: Path, text: str, rate: int = 8000, pad_s: float = 0.0, lead_s: float = 0.0) -> Path:
    """espeak-ng speech converted by sox to `rate` Hz mono S16 (what baresip's aufile wants),
    with `lead_s` seconds of silence before and `pad_s` after."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run([ESPEAK, "-w", str(raw), text], check=True, timeout=20, capture_output=True)
    args = [SOX, str(raw), "-r", str(rate), "-c", "1", "-b", "16", "-e", "signed-integer", str(path)]
    if pad_s or lead_s:
        args += ["pad", str(lead_s), str(pad_s)]
    subprocess.run(args, check=True, timeout=20, capture_output=True)
    return path


def ulaw_wav(source: Path, path: Path) -> Path:
    """The same audio as a G.711 u-law WAV (what sipp's rtp_stream sends as payload type 0)."""
    args = [SOX, str(source), "-e", "u-law", "-t", "wav", str(path)]
    subprocess.run(args, check=True, timeout=20, capture_output=True)
    return path


def tone_wav(path: Path, seconds: float, freqs: tuple[float, ...] = (440.0,), rate: int = 8000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sig = np.zeros_like(t)
    for f in freqs:
        sig += np.sin(2 * np.pi * f * t) / len(freqs)
    sf.write(path, (sig * 8000).astype(np.int16), rate, subtype="PCM_16")
    return path


def silence_wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    sf.write(path, np.zeros(int(seconds * rate), dtype=np.int16), rate, subtype="PCM_16")
    return path


def read_pcm(path: Path) -> tuple[np.ndarray, int]:
    data, rate = sf.read(path, dtype="int16", always_2d=True)
    return data[:, 0].astype(np.float64), rate


def pcm16(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i2").astype(np.float64)


def best_alignment(reference: np.ndarray, received: np.ndarray) -> tuple[float, int]:
    """Normalized cross-correlation peak of `reference` inside `received`: (coefficient, lag).
    1.0 means the received signal contains the reference exactly (up to gain)."""
    ref = reference - reference.mean()
    rx = received - received.mean()
    n = len(ref) + len(rx)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(rx, size) * np.conj(np.fft.rfft(ref, size)), size)[: len(rx)]
    lag = int(np.argmax(corr))
    seg = rx[lag : lag + len(ref)]
    ref_part = ref[: len(seg)]
    denom = float(np.linalg.norm(ref_part) * np.linalg.norm(seg))
    return (float(np.dot(ref_part, seg)) / denom if denom else 0.0), lag


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def window_alignments(reference: np.ndarray, received: np.ndarray, rate: int = 8000,
                      window_s: float = 0.25) -> list[tuple[float, int]]:
    """(best correlation, delay in samples) of each voiced window of `reference` found anywhere in
    `received`; the delay is where the window starts in `received` minus where it starts in
    `reference`."""
    size = int(rate * window_s)
    level = rms(reference) * 0.3
    found = []
    for i in range(0, len(reference) - size + 1, size):
        if rms(reference[i:i + size]) > level:
            score, lag = best_alignment(reference[i:i + size], received)
            found.append((score, lag - i))
    return found


def windowed_alignment(reference: np.ndarray, received: np.ndarray, rate: int = 8000,
                       window_s: float = 0.25) -> tuple[float, float]:
    """(median, 10th percentile) of the best correlation of each voiced window of `reference`
    found anywhere in `received`. Unlike one whole-signal alignment, a single frame lost to RTP
    jitter on a loaded machine shifts only its own window, so this measures that the speech arrived
    intact without depending on perfectly gapless transport."""
    scores = [score for score, _ in window_alignments(reference, received, rate, window_s)]
    if not scores:
        return 0.0, 0.0
    return float(np.median(scores)), float(np.percentile(scores, 10))
