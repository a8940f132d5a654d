"""One call's local machine detection: the detectors of media/amd.py on the callee's audio.

It taps the call's MediaPipeline (the decoded wire audio) from answer until it has what it needs:
the verdict, and with leave-message on a machine, the end of the greeting (beep or long silence).
Once audio flows, stretches without it (silence suppression, a leg that sends nothing while quiet)
count as silence, measured on the injectable clock; a leg that never sends a frame ends as unknown
(Asterisk's NOAUDIODATA) after `totalAnalysisTime`, so a failed media stream is not taken for a
silent machine. Every call gets a verdict, and a message point within `maxGreetingWaitMs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from bridge.config import AmdSettings
from media.amd import AmdParams, AmdVerdict, AnsweringMachineDetector, GreetingEnd, GreetingEndParams
from media.clock import Clock, TimerHandle
from media.resample import StreamResampler
from media.transport import CallerAudioTap

log = logging.getLogger(__name__)

TICK_S = 0.1
RATE = 8000  # the detectors run on telephone-rate audio, like Asterisk's (slin 8 kHz)
# Audio may lag the clock by this much (jitter, a busy loop) before the gap counts as silence.
GAP_GRACE_MS = 300


class TapSource(Protocol):
    """What a call's MediaPipeline offers: the caller's decoded audio, frame by frame."""

    def add_tap(self, tap: CallerAudioTap) -> None: ...

    def remove_tap(self, tap: CallerAudioTap) -> None: ...


def amd_params(settings: AmdSettings) -> AmdParams:
    return AmdParams(**{name: getattr(settings, name) for name in AmdParams.__dataclass_fields__})


class MachineDetection:
    def __init__(
        self,
        settings: AmdSettings,
        clock: Clock,
        *,
        wants_message_point: bool,
        on_verdict: Callable[[AmdVerdict], None],
        on_message_point: Callable[[str], object],
    ) -> None:
        self._settings = settings
        self._params = amd_params(settings)
        self._clock = clock
        self._on_verdict = on_verdict
        self._on_message_point = on_message_point
        self._resampler: StreamResampler | None = None
        self._amd = AnsweringMachineDetector(RATE, self._params)
        self._end = GreetingEnd(RATE, GreetingEndParams(settings.greetingEndSilenceMs, settings.maxGreetingWaitMs),
                                self._params) if wants_message_point else None
        self._started = clock.monotonic()
        self._fed_ms = 0.0
        self._heard = False  # a frame arrived: the audio timeline starts there
        self._bridge: TapSource | None = None
        self._timer: TimerHandle | None = clock.call_later(TICK_S, self._tick)
        self.verdict: AmdVerdict | None = None
        self.message_point: str | None = None
        self.done = False

    def attach(self, bridge: TapSource) -> None:
        """Listen to a (new) media bridge of the call."""
        if self.done:
            return
        if self._bridge is not None:
            self._bridge.remove_tap(self._on_audio)
        self._bridge = bridge
        bridge.add_tap(self._on_audio)

    def close(self) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._bridge is not None:
            self._bridge.remove_tap(self._on_audio)
            self._bridge = None

    # ------------------------------------------------------------------ audio and gaps

    def _on_audio(self, pcm: bytes, rate: int) -> None:
        if self.done:
            return
        if not self._heard:
            self._heard = True
            self._started = self._clock.monotonic()  # media set-up time is not the callee's silence
        self._fed_ms += len(pcm) / 2 / rate * 1000
        if rate != RATE:  # wideband legs (L16 16 kHz, ...)
            if self._resampler is None or self._resampler.in_rate != rate:
                self._resampler = StreamResampler(rate, RATE)
            pcm = self._resampler.process(pcm)
        self._feed(pcm)

    def _tick(self) -> None:
        self._timer = None
        if self.done:
            return
        elapsed_ms = (self._clock.monotonic() - self._started) * 1000
        if not self._heard:
            if elapsed_ms >= self._params.totalAnalysisTime:
                ms = int(elapsed_ms)
                self.verdict = AmdVerdict("unknown", f"NOAUDIODATA-{ms}", ms)
                self.close()
                self._on_verdict(self.verdict)
            else:
                self._timer = self._clock.call_later(TICK_S, self._tick)
            return
        behind = elapsed_ms - self._fed_ms
        if behind > GAP_GRACE_MS:
            gap = int(behind - GAP_GRACE_MS / 2) // 20 * 20
            if gap > 0:
                self._fed_ms += gap
                self._feed(bytes(RATE * gap // 1000 * 2))
        if not self.done:
            self._timer = self._clock.call_later(TICK_S, self._tick)

    def _feed(self, pcm: bytes) -> None:
        if not pcm:
            return
        # The greeting's end is tracked from the answer on: a short greeting's beep may be under
        # way, or over, by the time the verdict comes.
        if self._end is not None and self._end.reason is None:
            self._end.feed(pcm)
        if self.verdict is None:
            verdict = self._amd.feed(pcm)
            if verdict is None:
                return
            self.verdict = verdict
            if verdict.answered_by != "machine" or self._end is None:
                self.close()
            self._on_verdict(verdict)
        if self._end is not None and self._end.reason is not None and self.message_point is None:
            self.message_point = self._end.reason
            self.close()
            self._on_message_point(self.message_point)
