"""A labeled set for answering-machine detection, generated with espeak-ng and fixed seeds.

Machines: greetings of 2-12 s, answered after a short pause, some ending with a beep, then line
silence. People: openers of 0.3-1.5 s ("Hello?", "Yes, who is this?"), then silence while they
wait. Every sample can get white line noise at a given SNR (relative to the speech's RMS).
All audio is PCM16 mono at 8 kHz, what the bridge's taps see on a telephone leg.
"""

from __future__ import annotations

import functools
import io
import subprocess
import wave
from dataclasses import dataclass

import numpy as np
import soxr

RATE = 8000

MACHINE_TEXTS = [
    "Hi, you've reached Anna. Leave a message.",
    "Hello, this is Dave. I can't come to the phone right now. Please leave a message after the tone.",
    ("You have reached the voicemail of extension four two one. Please leave your name, number and a short "
     "message, and I will return your call as soon as possible."),
    ("Thank you for calling Riverside Dental. Our office is currently closed. Our opening hours are Monday "
     "to Friday, eight to five. Please leave a message after the beep and we will call you back."),
    "The person you are calling is not available. Record your message at the tone.",
    "Hey, it's Sam. Text me instead.",
]
HUMAN_TEXTS = ["Hello?", "Hello.", "Yes?", "Hi!", "Yes, who is this?", "Hello, this is Mark.", "Speaking.",
               "Hi, who's calling?"]
VOICES = [("en-us", 165), ("en-gb", 175), ("en-us+f3", 150), ("en-gb-scotland", 185)]
SNRS_DB: list[float | None] = [None, 20.0, 10.0]


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    label: str  # "human" | "machine"
    pcm: bytes
    has_beep: bool
    speech_ms: int  # length of the spoken part
    beep_end_ms: int | None = None  # where the beep ends in the audio
    lead_ms: int = 0  # silence before the speech


@functools.lru_cache(maxsize=256)
def render(text: str, voice: str = "en-us", speed: int = 165) -> np.ndarray:
    """espeak-ng speech at 8 kHz, leading/trailing silence trimmed (cached per process)."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32)
    out = soxr.resample(data, rate, RATE)
    loud = np.flatnonzero(np.abs(out) > 300)
    if loud.size:
        out = out[loud[0]:loud[-1] + 1]
    return out


def tone(hz: float, ms: int, amplitude: float = 8000.0) -> np.ndarray:
    t = np.arange(RATE * ms // 1000) / RATE
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)  # 5 ms edges, no click
    return amplitude * ramp * np.sin(2 * np.pi * hz * t)


def silence(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, dtype=np.float32)


def _finish(parts: list[np.ndarray], speech: np.ndarray, snr_db: float | None, seed: int) -> bytes:
    audio = np.concatenate(parts).astype(np.float64)
    if snr_db is not None:
        speech_rms = float(np.sqrt(np.mean(speech.astype(np.float64) ** 2)))
        noise_rms = speech_rms / (10 ** (snr_db / 20))
        audio += np.random.default_rng(seed).normal(0.0, noise_rms, audio.size)
    return np.clip(audio, -32768, 32767).astype("<i2").tobytes()


def machine(text: str, voice: str, speed: int, *, beep_hz: float | None, snr_db: float | None, seed: int,
            lead_ms: int = 400, tail_ms: int = 3000) -> Sample:
    rng = np.random.default_rng(seed)
    speech = render(text, voice, speed)
    parts = [silence(lead_ms), speech]
    beep_end = None
    if beep_hz is not None:
        pause = int(rng.integers(300, 800))
        beep_ms = int(rng.integers(200, 600))
        parts += [silence(pause), tone(beep_hz, beep_ms)]
        beep_end = lead_ms + len(speech) * 1000 // RATE + pause + beep_ms
    parts.append(silence(tail_ms))
    speech_ms = len(speech) * 1000 // RATE
    name = f"machine/{voice}/{speech_ms}ms/{'beep' if beep_hz else 'nobeep'}/snr{snr_db}"
    return Sample(name, "machine", _finish(parts, speech, snr_db, seed), beep_hz is not None, speech_ms, beep_end,
                  lead_ms)


def human(text: str, voice: str, speed: int, *, snr_db: float | None, seed: int, lead_ms: int = 500,
          tail_ms: int = 4000) -> Sample:
    speech = render(text, voice, speed)
    parts = [silence(lead_ms), speech, silence(tail_ms)]
    speech_ms = len(speech) * 1000 // RATE
    return Sample(f"human/{voice}/{text}/snr{snr_db}", "human", _finish(parts, speech, snr_db, seed), False,
                  speech_ms, None, lead_ms)


def full_set() -> list[Sample]:
    """Every text x voice x SNR; machines alternate beep frequencies and no beep."""
    samples: list[Sample] = []
    beeps: list[float | None] = [1000.0, None, 440.0, 1400.0, None, 850.0]
    seed = 0
    for snr in SNRS_DB:
        for vi, (voice, speed) in enumerate(VOICES):
            for ti, text in enumerate(MACHINE_TEXTS):
                seed += 1
                samples.append(machine(text, voice, speed, beep_hz=beeps[(ti + vi) % len(beeps)], snr_db=snr,
                                       seed=seed, lead_ms=200 + 150 * ((ti + vi) % 4)))
            for ti, text in enumerate(HUMAN_TEXTS):
                seed += 1
                samples.append(human(text, voice, speed, snr_db=snr, seed=seed, lead_ms=300 + 200 * ((ti + vi) % 4)))
    return samples


def quick_set() -> list[Sample]:
    """A dozen samples for the test: both classes, beep and no beep, clean and noisy."""
    return [
        machine(MACHINE_TEXTS[1], "en-us", 165, beep_hz=1000.0, snr_db=None, seed=1),
        machine(MACHINE_TEXTS[0], "en-gb", 175, beep_hz=None, snr_db=20.0, seed=2),
        machine(MACHINE_TEXTS[3], "en-us+f3", 150, beep_hz=440.0, snr_db=10.0, seed=3),
        machine(MACHINE_TEXTS[4], "en-gb-scotland", 185, beep_hz=1400.0, snr_db=20.0, seed=4),
        machine(MACHINE_TEXTS[5], "en-us", 165, beep_hz=None, snr_db=10.0, seed=5),
        machine(MACHINE_TEXTS[2], "en-gb", 175, beep_hz=850.0, snr_db=None, seed=6),
        human("Hello?", "en-us", 165, snr_db=None, seed=7),
        human("Yes, who is this?", "en-gb", 175, snr_db=20.0, seed=8),
        human("Hi!", "en-us+f3", 150, snr_db=10.0, seed=9),
        human("Hello, this is Mark.", "en-gb-scotland", 185, snr_db=None, seed=10),
        human("Speaking.", "en-us", 165, snr_db=10.0, seed=11),
        human("Hi, who's calling?", "en-us+f3", 150, snr_db=20.0, seed=12),
    ]
