"""The local answering-machine detector (Asterisk AMD() rules) and the beep detector, on synthetic
signals for each rule and on a dozen generated espeak samples for accuracy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from media.amd import AmdParams, AnsweringMachineDetector, GreetingEnd
from media.beep import BeepDetector
from media.dtmf import dtmf_tones
from tests.fakes.amd_set import RATE, human, quick_set, render, silence, tone

FRAME = RATE * 20 // 1000 * 2


def pcm(*parts: np.ndarray) -> bytes:
    return np.concatenate(parts).astype("<i2").tobytes()


def voice(ms: int, amplitude: float = 3000.0) -> np.ndarray:
    """A vowel-like buzz: harmonics of 140 Hz (loud enough for the silence test, not a pure tone)."""
    t = np.arange(RATE * ms // 1000) / RATE
    return amplitude * sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8)) / 2


def run(audio: bytes, params: AmdParams | None = None, chunk: int = FRAME) -> AnsweringMachineDetector:
    detector = AnsweringMachineDetector(RATE, params)
    for offset in range(0, len(audio), chunk):
        if detector.feed(audio[offset:offset + chunk]) is not None:
            break
    return detector


def test_silence_only_is_a_machine_after_initial_silence() -> None:
    verdict = run(pcm(silence(4000))).verdict
    assert verdict is not None and (verdict.answered_by, verdict.cause, verdict.at_ms) == (
        "machine", "INITIALSILENCE-2500-2500", 2500)
    assert verdict.status == "MACHINE"


def test_short_hello_then_silence_is_a_human_after_the_greeting_silence() -> None:
    verdict = run(pcm(silence(400), voice(500), silence(2000))).verdict
    assert verdict is not None and verdict.answered_by == "human"
    assert verdict.cause == "HUMAN-800-800" and verdict.at_ms == 400 + 500 + 800


def test_long_greeting_is_a_machine_once_voice_exceeds_greeting() -> None:
    # words of 400 ms with 200 ms pauses: 1500 ms of voice is reached in the fourth word
    words = [part for _ in range(6) for part in (voice(400), silence(200))]
    params = replace(AmdParams(), maximumNumberOfWords=10)
    verdict = run(pcm(silence(300), *words), params).verdict
    assert verdict is not None and verdict.answered_by == "machine"
    assert verdict.cause == "LONGGREETING-1500-1500"


def test_too_many_words_is_a_machine() -> None:
    words = [part for _ in range(4) for part in (voice(150), silence(100))]
    verdict = run(pcm(silence(300), *words, silence(2000))).verdict
    assert verdict is not None and verdict.cause == "MAXWORDS-3-2"


def test_a_word_longer_than_the_maximum_is_a_machine() -> None:
    params = replace(AmdParams(), greeting=10_000, totalAnalysisTime=20_000, maximumWordLength=3000)
    verdict = run(pcm(silence(200), voice(4000)), params).verdict
    assert verdict is not None and verdict.cause == "MAXWORDLENGTH-3000"


def test_undecided_by_the_total_analysis_time_is_unknown() -> None:
    # voice of 100 ms every 700 ms: never 800 ms of silence, never 1500 ms of voice before 5 s
    params = replace(AmdParams(), maximumNumberOfWords=100)
    pattern = [part for _ in range(10) for part in (voice(100), silence(600))]
    verdict = run(pcm(silence(200), *pattern), params).verdict
    assert verdict is not None and verdict.answered_by == "unknown" and verdict.cause == "TOOLONG-5000"
    assert verdict.status == "NOTSURE"


def test_verdict_does_not_depend_on_chunk_sizes() -> None:
    audio = pcm(silence(400), voice(500), silence(2000))
    verdicts = {run(audio, chunk=size).verdict for size in (FRAME, 2, 333, 4096)}
    assert len(verdicts) == 1


def test_missing_audio_counts_as_silence() -> None:
    detector = AnsweringMachineDetector(RATE)
    detector.feed(pcm(silence(300), voice(400)))
    assert detector.feed_silence(1000) is not None and detector.verdict.answered_by == "human"


def test_noise_floor_keeps_a_noisy_line_from_reading_as_one_long_word() -> None:
    rng = np.random.default_rng(5)
    audio = np.concatenate([silence(600), voice(500, 6000), silence(3000)])
    noisy = (audio + rng.normal(0, 500, audio.size)).clip(-32768, 32767).astype("<i2").tobytes()
    assert run(noisy, AmdParams(noiseAdaptive=False)).verdict.answered_by == "machine"
    assert run(noisy).verdict.answered_by == "human"


@pytest.fixture(scope="module")
def samples() -> list:
    return quick_set()


def test_accuracy_on_generated_greetings_and_openers(samples: list) -> None:
    tuned = replace(AmdParams(), maximumNumberOfWords=4)
    machines = [s for s in samples if s.label == "machine"]
    humans = [s for s in samples if s.label == "human"]
    assert len(machines) == 6 and len(humans) == 6

    def correct(subset: list, params: AmdParams) -> int:
        return sum(1 for s in subset if (run(s.pcm, params).verdict or run(s.pcm + bytes(80000), params).verdict)
                   .answered_by == s.label)

    assert correct(machines, tuned) >= 5 and correct(humans, tuned) >= 5
    # Asterisk's own defaults catch every machine here (their weakness is multi-word openers)
    assert correct(machines, AmdParams()) == 6
    for s in machines:
        assert run(s.pcm, tuned).verdict.at_ms <= 4000, s.name


@pytest.mark.parametrize("hz", [440.0, 1000.0, 1900.0])
def test_beep_in_band_is_found_with_its_end(hz: float) -> None:
    detector = BeepDetector(RATE)
    audio = pcm(silence(300), tone(hz, 300), silence(300))
    ended = [detector.process(audio[o:o + FRAME]) for o in range(0, len(audio), FRAME)]
    assert sum(ended) == 1
    (start, end, found_hz), = detector.beeps
    assert abs(found_hz - hz) < 10 and abs(end - 600) <= 40 and abs((end - start) - 300) <= 40


@pytest.mark.parametrize(("hz", "ms"), [(1000.0, 100), (300.0, 400), (2600.0, 400)])
def test_short_or_out_of_band_tones_are_not_beeps(hz: float, ms: int) -> None:
    detector = BeepDetector(RATE)
    detector.process(pcm(silence(200), tone(hz, ms), silence(300)))
    assert detector.beeps == []


def test_a_150ms_tone_is_the_shortest_beep() -> None:
    detector = BeepDetector(RATE)
    assert detector.process(pcm(silence(200), tone(1000.0, 160), silence(200)))


def test_dtmf_and_speech_are_not_beeps() -> None:
    detector = BeepDetector(RATE)
    keys = np.frombuffer(dtmf_tones("159#", RATE, 300, 100), dtype="<i2").astype(np.float64)
    speech = render("Hello, you have reached the office of doctor Smith, please hold.", "en-us", 165)
    sung = render("Heeeeeelloooooo", "en-us+f3", 80)
    assert not detector.process(pcm(keys, silence(200), speech, silence(200), sung, silence(300)))
    assert detector.beeps == []


def test_greeting_end_is_the_beep_end_or_a_long_silence(samples: list) -> None:
    with_beep = next(s for s in samples if s.has_beep)
    end = GreetingEnd(RATE)
    for offset in range(0, len(with_beep.pcm), FRAME):
        if end.feed(with_beep.pcm[offset:offset + FRAME]):
            break
    assert end.reason == "beep" and abs(end.elapsed_ms - with_beep.beep_end_ms) <= 60
    opener = human("Hello?", "en-us", 165, snr_db=None, seed=1, lead_ms=500)
    end = GreetingEnd(RATE)
    assert end.feed(opener.pcm) == "silence" and abs(end.elapsed_ms - (500 + opener.speech_ms + 2000)) <= 60
