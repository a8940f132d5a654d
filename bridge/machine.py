"""One call's machine detection: the local detectors of media/amd.py on the callee's audio
(`MachineDetection`), or the carrier's own (`NativeMachineDetection`), with one outcome either way:
a verdict, and with leave-message on a machine, the point where the message may start.

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

from bridge.calls import MachineResult
from bridge.config import AmdSettings
from carriers.base import NativeAmd
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
        verdict: AmdVerdict | None = None,
    ) -> None:
        """With `verdict` (a carrier's own detector already found a machine) only the end of the
        greeting is looked for."""
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
        self.verdict: AmdVerdict | None = verdict
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
        if not self._heard and self.verdict is not None:  # a known machine, and no audio to listen to
            if elapsed_ms >= self._settings.maxGreetingWaitMs:
                self.message_point = "timeout"
                self.close()
                self._on_message_point(self.message_point)
            else:
                self._timer = self._clock.call_later(TICK_S, self._tick)
            return
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


class NativeMachineDetection:
    """One call's detection by the carrier (Twilio AsyncAmd, Telnyx, Plivo). The manager hands it the
    carrier's `call.machine` reports; it makes the same verdict and message point as the local
    detector. No verdict within `NativeAmd.wait_s` of the answer is `silent_means` (unknown; human
    on Plivo, which calls back only for machines). With leave-message on a machine the message
    point is the carrier's end of greeting (beep, silence), else the local end-of-greeting detector
    on the media stream where the carrier reports none, and at most `amd.maxGreetingWaitMs` after
    the verdict either way. Reports may come out of order (Telnyx): an end of greeting before the
    verdict is kept until the verdict comes."""

    def __init__(
        self,
        settings: AmdSettings,
        clock: Clock,
        native: NativeAmd,
        *,
        wants_message_point: bool,
        on_verdict: Callable[[AmdVerdict], None],
        on_message_point: Callable[[str], object],
        since_answer_s: float = 0.0,
    ) -> None:
        """`since_answer_s`: the call was answered that long ago (restart recovery: the rest of the wait)."""
        self._settings = settings
        self._clock = clock
        self._native = native
        self._wants_message_point = wants_message_point
        self._on_verdict = on_verdict
        self._on_message_point = on_message_point
        self._started = clock.monotonic() - since_answer_s  # the answer, on the clock
        self._bridge: TapSource | None = None
        self._local: MachineDetection | None = None
        self._early_end: str | None = None  # an end of greeting reported before the verdict
        self._timer: TimerHandle | None = clock.call_later(max(0.0, native.wait_s - since_answer_s),
                                                           self._no_verdict)
        self.verdict: AmdVerdict | None = None
        self.message_point: str | None = None
        self.done = False

    def attach(self, bridge: TapSource) -> None:
        self._bridge = bridge
        if self._local is not None:
            self._local.attach(bridge)

    def close(self) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._local is not None:
            self._local.close()
            self._local = None
        self._bridge = None

    def report(self, result: MachineResult) -> None:
        if self.done:
            return
        if result.answered_by is not None and self.verdict is None:
            elapsed = int((self._clock.monotonic() - self._started) * 1000)
            self._decide(AmdVerdict(result.answered_by, result.cause,
                                    elapsed if result.decision_ms is None else result.decision_ms),
                         result.greeting_end)
        elif result.greeting_end is not None:
            if self.verdict is None:
                self._early_end = result.greeting_end
            elif self.verdict.answered_by == "machine":
                self._message_point(result.greeting_end)

    def _no_verdict(self) -> None:
        self._timer = None
        if self.done or self.verdict is not None:
            return
        ms = int((self._clock.monotonic() - self._started) * 1000)
        self._decide(AmdVerdict(self._native.silent_means, f"NOCALLBACK-{ms}", ms), None)

    def _decide(self, verdict: AmdVerdict, greeting_end: str | None) -> None:
        self.verdict = verdict
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        leave_message = self._wants_message_point and verdict.answered_by == "machine"
        if not leave_message:
            self.close()
            self._on_verdict(verdict)
            return
        self._on_verdict(verdict)
        end = greeting_end or self._early_end
        if end is not None:
            self._message_point(end)
        elif self._native.reports_greeting_end:
            self._timer = self._clock.call_later(self._settings.maxGreetingWaitMs / 1000,
                                                 lambda: self._message_point("timeout"))
        else:
            self._local = MachineDetection(self._settings, self._clock, wants_message_point=True,
                                           on_verdict=lambda _: None, on_message_point=self._message_point,
                                           verdict=verdict)
            if self._bridge is not None:
                self._local.attach(self._bridge)

    def _message_point(self, reason: str) -> None:
        if self.done or self.message_point is not None:
            return
        self.message_point = reason
        self.close()
        self._on_message_point(reason)
