"""Energy VAD: fires on speech over a learned noise floor, not on steady noise."""

from __future__ import annotations

import numpy as np

from media.vad import EnergyVad

RATE = 16000
FRAME = RATE // 50


def frames(x: np.ndarray) -> list[bytes]:
    d = np.clip(x, -32768, 32767).astype("<i2").tobytes()
    return [d[i : i + FRAME * 2] for i in range(0, len(d) - FRAME * 2 + 1, FRAME * 2)]


def burst(secs: float, amp: float, rng: np.random.Generator) -> np.ndarray:
    """Speech-like: a 150 Hz pulse train with syllable-rate amplitude modulation."""
    t = np.arange(int(RATE * secs)) / RATE
    voiced = np.sign(np.sin(2 * np.pi * 150 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return amp * voiced + rng.normal(0, amp * 0.05, len(t))


def run(v: EnergyVad, x: np.ndarray) -> list[int]:
    return [i for i, f in enumerate(frames(x)) if v.process(f)]


def test_speech_after_noise_starts_within_three_frames() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 300, RATE * 2)  # ~ -40 dBFS steady line noise
    speech = burst(0.8, 6000, rng) + rng.normal(0, 300, int(RATE * 0.8))
    v = EnergyVad()
    starts = run(v, np.concatenate([noise, speech, noise]))
    assert starts == [100 + 2]  # onset frame 100, 3 frames needed
    assert -48 < v.floor_dbfs < -38


def test_steady_noise_steps_never_read_as_endless_speech() -> None:
    rng = np.random.default_rng(1)
    quiet = rng.normal(0, 30, RATE * 2)
    loud = rng.normal(0, 1500, RATE * 20)  # noise jumps by 34 dB and stays
    v = EnergyVad()
    run(v, np.concatenate([quiet, loud]))
    assert not v.speaking  # the floor caught up
    assert run(v, rng.normal(0, 1500, RATE * 3)) == []


def test_silence_and_low_level_ignored() -> None:
    v = EnergyVad()
    assert run(v, np.zeros(RATE * 2)) == []
    assert run(v, np.random.default_rng(2).normal(0, 80, RATE * 2)) == []  # below -45 dBFS


def test_speech_end_is_reported_once_after_the_hangover() -> None:
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 300, RATE)
    speech = burst(0.6, 6000, rng) + rng.normal(0, 300, int(RATE * 0.6))
    v = EnergyVad()
    ended = []
    for i, f in enumerate(frames(np.concatenate([noise, speech, noise]))):
        v.process(f)
        if v.ended:
            ended.append(i)
    # speech frames 50..79; silence from frame 80, reported after 15 quiet frames
    assert ended == [80 + v.hangover_frames - 1] and v.hangover_s == 0.3 and not v.speaking
