"""Answering-machine detection on the callee's first seconds of audio, after Asterisk's AMD().

A streaming, sans-I/O port of `isAnsweringMachine()` (apps/app_amd.c): feed PCM16 mono frames as
they arrive, get one `AmdVerdict` (human | machine | unknown, the Asterisk-style cause, and the
audio time of the decision). The intuition: a person says a short "Hello?" and waits; a machine
talks longer, or in more words, or plays nothing for a long time.

One addition to Asterisk: with `noiseAdaptive` a frame is silent when its mean absolute level is
under max(silenceThreshold, noiseFactor x the noise floor), the floor being the quietest frame of
the last second. Asterisk's fixed threshold reads a noisy line as one endless word (a machine).

`GreetingEnd` is what a voicemail drop needs after a machine verdict: the moment the greeting is
over (the end of the beep, or a long silence after speech) to start the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from media.beep import BeepDetector

AnsweredBy = Literal["human", "machine", "unknown"]
FRAME_MS = 20


@dataclass(frozen=True, slots=True)
class AmdParams:
    """Asterisk amd.conf names and defaults (ms, and the silence threshold of 32767)."""

    initialSilence: int = 2500
    greeting: int = 1500
    afterGreetingSilence: int = 800
    totalAnalysisTime: int = 5000
    minimumWordLength: int = 100
    betweenWordsSilence: int = 50
    maximumNumberOfWords: int = 2
    silenceThreshold: int = 256
    maximumWordLength: int = 5000
    noiseAdaptive: bool = True
    noiseFactor: float = 2.0


@dataclass(frozen=True, slots=True)
class AmdVerdict:
    answered_by: AnsweredBy
    cause: str  # Asterisk's AMDCAUSE, e.g. "LONGGREETING-1500-1500"
    at_ms: int  # audio time of the decision, from the first frame

    @property
    def status(self) -> str:
        """Asterisk's AMDSTATUS spelling."""
        return {"human": "HUMAN", "machine": "MACHINE", "unknown": "NOTSURE"}[self.answered_by]


def mean_abs(frame: np.ndarray) -> float:
    return float(np.abs(frame.astype(np.int32)).mean()) if frame.size else 0.0


class SilenceGate:
    """Silent or voiced per frame: Asterisk's mean-absolute test, optionally above the noise floor.

    The floor follows a quieter frame at once and creeps up at most ~6 dB a second, so line noise
    present from the answer (or stepping up later) is learned, while a steady voice, tone or music
    stays voiced for many seconds.
    """

    RISE_PER_FRAME = 1.007  # ~3 dB a second at 20 ms frames

    def __init__(self, threshold: int, *, adaptive: bool, factor: float) -> None:
        self.threshold = threshold
        self.adaptive = adaptive
        self.factor = factor
        self.floor: float | None = None

    def silent(self, frame: np.ndarray) -> bool:
        level = mean_abs(frame)
        limit = float(self.threshold)
        if self.adaptive:
            if self.floor is None or level < self.floor:
                self.floor = level
            else:
                self.floor = min(level, self.floor * self.RISE_PER_FRAME + 0.5)
            limit = max(limit, self.factor * self.floor)
        return level < limit


class _Framer:
    """Cuts any chunk sizes into whole frames of `FRAME_MS`."""

    def __init__(self, rate: int) -> None:
        self.samples = rate * FRAME_MS // 1000
        self._buf = np.zeros(0, dtype=np.int16)

    def push(self, pcm: bytes) -> list[np.ndarray]:
        data = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")
        buf = np.concatenate((self._buf, data)) if self._buf.size else data
        n = buf.size // self.samples
        frames = [buf[i * self.samples:(i + 1) * self.samples] for i in range(n)]
        self._buf = buf[n * self.samples:].copy()
        return frames


class AnsweringMachineDetector:
    """Feed the callee's audio from the moment of answer; `verdict` is set once, then stays."""

    def __init__(self, rate: int = 8000, params: AmdParams | None = None) -> None:
        self.params = p = params or AmdParams()
        self.rate = rate
        self._framer = _Framer(rate)
        self._gate = SilenceGate(p.silenceThreshold, adaptive=p.noiseAdaptive, factor=p.noiseFactor)
        self.verdict: AmdVerdict | None = None
        self.total_ms = 0
        self._silence_ms = 0  # the DSP's consecutive silence
        self._in_initial_silence = True
        self._in_greeting = False
        self._voice_ms = 0
        self._run_ms = 0  # consecutive voice
        self._words = 0
        self._in_word = True  # Asterisk starts IN_WORD: a word counts only after a gap

    def feed(self, pcm: bytes) -> AmdVerdict | None:
        """Any amount of PCM16 mono; returns the verdict once decided (also on later calls)."""
        for frame in self._framer.push(pcm):
            if self.verdict is not None:
                break
            self._frame(frame)
        return self.verdict

    def feed_silence(self, ms: int) -> AmdVerdict | None:
        """No audio arrived for `ms` (silence suppression, a quiet RTP stream): count it as silence."""
        return self.feed(bytes(self.rate * ms // 1000 * 2))

    def _decide(self, answered_by: AnsweredBy, cause: str) -> None:
        self.verdict = AmdVerdict(answered_by, cause, self.total_ms)

    def _frame(self, frame: np.ndarray) -> None:
        p = self.params
        ms = FRAME_MS
        self.total_ms += ms
        if self.total_ms >= p.totalAnalysisTime:
            self._decide("unknown", f"TOOLONG-{self.total_ms}")
            return
        if self._gate.silent(frame):
            self._silence_ms += ms
            if self._silence_ms >= p.betweenWordsSilence:
                self._in_word = False
                self._run_ms = 0
            if self._in_initial_silence and self._silence_ms >= p.initialSilence:
                self._decide("machine", f"INITIALSILENCE-{self._silence_ms}-{p.initialSilence}")
            elif self._in_greeting and self._silence_ms >= p.afterGreetingSilence:
                self._decide("human", f"HUMAN-{self._silence_ms}-{p.afterGreetingSilence}")
            return
        self._run_ms += ms
        self._voice_ms += ms
        if self._run_ms >= p.minimumWordLength and not self._in_word:
            self._words += 1
            self._in_word = True
        if self._run_ms >= p.maximumWordLength:
            self._decide("machine", f"MAXWORDLENGTH-{self._run_ms}")
        elif self._words > p.maximumNumberOfWords:
            self._decide("machine", f"MAXWORDS-{self._words}-{p.maximumNumberOfWords}")
        elif self._in_greeting and self._voice_ms >= p.greeting:
            self._decide("machine", f"LONGGREETING-{self._voice_ms}-{p.greeting}")
        if self.verdict is not None:
            return
        if self._voice_ms >= p.minimumWordLength:
            self._silence_ms = 0
        if self._run_ms >= p.minimumWordLength and not self._in_greeting:
            self._in_initial_silence = False
            self._in_greeting = True


@dataclass(frozen=True, slots=True)
class GreetingEndParams:
    silenceMs: int = 2000  # silence after speech that ends a greeting without a beep
    maxWaitMs: int = 30_000  # leave the message anyway after this much greeting


class GreetingEnd:
    """After a machine verdict: when to start the message. Feed the same audio; `done` gives the
    reason once: "beep" (the tone just ended), "silence" (a long pause after speech) or "timeout"."""

    def __init__(self, rate: int = 8000, params: GreetingEndParams | None = None,
                 amd: AmdParams | None = None) -> None:
        self.params = params or GreetingEndParams()
        a = amd or AmdParams()
        self._framer = _Framer(rate)
        self._gate = SilenceGate(a.silenceThreshold, adaptive=a.noiseAdaptive, factor=a.noiseFactor)
        self._beep = BeepDetector(rate)
        self.elapsed_ms = 0
        self._silence_ms = 0
        self.reason: str | None = None

    def feed(self, pcm: bytes) -> str | None:
        for frame in self._framer.push(pcm):
            if self.reason is not None:
                break
            self.elapsed_ms += FRAME_MS
            raw = frame.astype("<i2").tobytes()
            if self._beep.process(raw):
                self.reason = "beep"
            elif self._gate.silent(frame):
                self._silence_ms += FRAME_MS
                if self._silence_ms >= self.params.silenceMs:
                    self.reason = "silence"
            else:
                self._silence_ms = 0
            if self.reason is None and self.elapsed_ms >= self.params.maxWaitMs:
                self.reason = "timeout"
        return self.reason

    def feed_silence(self, ms: int) -> str | None:
        return self.feed(bytes(self._framer.samples * 2 * max(1, ms // FRAME_MS)))
