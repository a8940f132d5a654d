"""In-band DTMF: exact digits under noise, level and twist variation; no digits from speech."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from media import g711
from media.dtmf import DIGITS, DtmfDetector, _digit_freqs, dtmf_tones
from media.formats import AudioEncoding

HAVE_ESPEAK = subprocess.run(["which", "espeak-ng"], capture_output=True).returncode == 0


def detect(pcm: np.ndarray, rate: int, chunk_ms: int = 20) -> str:
    d = DtmfDetector(rate)
    data = np.clip(np.round(pcm), -32768, 32767).astype("<i2").tobytes()
    step = rate * chunk_ms // 1000 * 2
    out: list[str] = []
    for i in range(0, len(data), step):
        out += d.process(data[i : i + step])
    return "".join(out)


def tones(digits: str, rate: int, tone_ms: int, gap_ms: int, level: float) -> np.ndarray:
    x = np.frombuffer(dtmf_tones(digits, rate, tone_ms, gap_ms, level_dbfs=level), dtype="<i2").astype(float)
    pad = np.zeros(rate // 10)
    return np.concatenate([pad, x, pad])


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    p = np.mean(x[x != 0] ** 2)
    return x + rng.normal(0, np.sqrt(p / 10 ** (snr_db / 10)), len(x))


SEQ = "1234567890*#ABCD" + "11" + "99" + "#0#"


def test_generator_frequencies_and_timing() -> None:
    rate = 8000
    pcm = np.frombuffer(dtmf_tones("5", rate, 100, 60), dtype="<i2").astype(float)
    assert len(pcm) == 160 * 8
    spec = np.abs(np.fft.rfft(pcm[:800], 8000))
    peaks = sorted(np.argsort(spec)[-2:])
    lo, hi = _digit_freqs("5")
    assert abs(peaks[0] - lo) <= 2 and abs(peaks[1] - hi) <= 2
    assert np.all(pcm[800:] == 0)


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
@pytest.mark.parametrize("level", [-3.0, -12.0, -24.0, -32.0])
def test_exact_digits_at_levels_with_noise(rate: int, level: float) -> None:
    rng = np.random.default_rng(int(rate + level * 10))
    for snr in (30.0, 15.0):
        x = add_noise(tones(SEQ, rate, 100, 60, level), snr, rng)
        assert detect(x, rate) == SEQ, (rate, level, snr)


def test_short_tones_and_gaps() -> None:
    rng = np.random.default_rng(1)
    x = add_noise(tones(SEQ, 8000, 50, 50, -10), 20, rng)
    assert detect(x, 8000) == SEQ


def test_twist_within_limits_accepted_beyond_rejected() -> None:
    rate = 16000
    t = np.arange(int(0.12 * rate)) / rate
    lo, hi = _digit_freqs("6")
    def pair(twist_db: float) -> np.ndarray:
        a = 6000.0
        return a * np.sin(2 * np.pi * lo * t) + a * 10 ** (-twist_db / 20) * np.sin(2 * np.pi * hi * t)
    pad = np.zeros(1600)
    for tw in (-4.0, 0.0, 4.0, 6.0):
        assert detect(np.concatenate([pad, pair(tw), pad]), rate) == "6", tw
    for tw in (-14.0, 14.0):
        assert detect(np.concatenate([pad, pair(tw), pad]), rate) == "", tw


def test_single_tones_and_noise_alone_give_nothing() -> None:
    rate = 8000
    t = np.arange(rate) / rate
    rng = np.random.default_rng(2)
    for f in (697, 941, 1209, 1633, 440, 1000):
        assert detect(8000 * np.sin(2 * np.pi * f * t), rate) == ""
    assert detect(rng.normal(0, 3000, rate * 2), rate) == ""
    # A tone too weak (-50 dBFS) is ignored.
    assert detect(tones("1", rate, 200, 60, -52), rate) == ""


def test_through_g711_and_resampler_at_pipeline_rate() -> None:
    rng = np.random.default_rng(4)
    x = add_noise(tones(SEQ, 8000, 80, 60, -15), 20, rng)
    for enc in (AudioEncoding.PCMU, AudioEncoding.PCMA):
        wire = g711.encode(np.clip(x, -32768, 32767).astype("<i2").tobytes(), enc)
        pcm8 = np.frombuffer(g711.decode(wire, enc), dtype="<i2")
        pcm16 = soxr.resample(pcm8, 8000, 16000, quality="HQ").astype(float)
        assert detect(pcm16, 16000) == SEQ, enc


def espeak(text: str, voice: str, pitch: int) -> tuple[np.ndarray, int]:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "--stdout", text], capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="int16")
    return x, sr


SPEECH = [
    "Hello, this is a test call from the voice bridge. Please press one to confirm.",
    "one two three four five six seven eight nine zero star pound hash",
    "Aaaaah eeeee ooooo mmmmm nnnnn, la la la la, beep boop beep.",
    "The quick brown fox jumps over the lazy dog while whistling a tune.",
]


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed")
@pytest.mark.parametrize("voice", ["en", "en-us+f3", "en+m7", "de"])
def test_no_false_digits_on_espeak_speech(voice: str) -> None:
    for text in SPEECH:
        for pitch in (10, 50, 99):
            x, sr = espeak(text, voice, pitch)
            for rate in (8000, 16000):
                y = soxr.resample(x, sr, rate, quality="HQ").astype(float)
                # Also after G.711, as on a phone line.
                ulaw = g711.decode(g711.encode(np.clip(y, -32768, 32767).astype("<i2").tobytes(), AudioEncoding.PCMU), AudioEncoding.PCMU)
                assert detect(y, rate) == "", (voice, pitch, rate, text)
                assert detect(np.frombuffer(ulaw, dtype="<i2").astype(float), rate) == "", (voice, pitch, rate)


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed")
def test_digits_right_after_speech() -> None:
    x, sr = espeak("Enter your account number now", "en", 50)
    y = soxr.resample(x, sr, 16000, quality="HQ").astype(float)
    mixed = np.concatenate([y, tones("4821#", 16000, 90, 70, -18)])
    assert detect(add_noise(mixed, 25, np.random.default_rng(9)), 16000) == "4821#"


def test_all_sixteen_digits_known() -> None:
    assert sorted(DIGITS) == sorted("123A456B789C*0#D")
