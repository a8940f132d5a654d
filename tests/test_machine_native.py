"""The carrier's own answering-machine detection as the manager sees it (bridge/machine.py
`NativeMachineDetection`), on the fake clock: the carrier's reports become the same verdict and
message point as the local detector's; silence becomes `unknown` (or `human` where the carrier
calls back only for machines); where the carrier says nothing of the greeting's end, the local
end-of-greeting detector listens to the call's audio through a real MediaPipeline tap."""

from __future__ import annotations

from typing import Any

import numpy as np

from bridge.calls import MachineResult
from bridge.config import AmdSettings
from bridge.machine import NativeMachineDetection
from carriers.base import NativeAmd
from media import g711
from media.amd import AmdVerdict
from media.clock import FakeClock
from media.formats import ULAW_8K
from media.pipeline import MediaPipeline
from tests.fakes.amd_set import silence, tone


class Seen:
    def __init__(self) -> None:
        self.verdicts: list[tuple[float, AmdVerdict]] = []
        self.points: list[tuple[float, str]] = []


def make(clock: FakeClock, native: NativeAmd, *, leave_message: bool = True, **amd: Any) -> tuple[
        NativeMachineDetection, Seen]:
    seen = Seen()
    detection = NativeMachineDetection(
        AmdSettings(**amd), clock, native, wants_message_point=leave_message,
        on_verdict=lambda v: seen.verdicts.append((clock.monotonic(), v)),
        on_message_point=lambda p: seen.points.append((clock.monotonic(), p)))
    return detection, seen


async def test_a_verdict_with_the_greeting_end_gives_both_at_once() -> None:
    clock = FakeClock()
    detection, seen = make(clock, NativeAmd(wait_s=40))
    await clock.advance(2.0)
    detection.report(MachineResult("machine", "twilio:machine_end_beep", "beep", 1870))
    assert [(v.answered_by, v.cause, v.at_ms) for _, v in seen.verdicts] == [("machine", "twilio:machine_end_beep", 1870)]
    assert seen.points == [(clock.monotonic(), "beep")] and detection.done
    assert clock.pending == 0, "no timer left behind"


async def test_a_person_ends_detection_and_a_later_report_changes_nothing() -> None:
    clock = FakeClock()
    detection, seen = make(clock, NativeAmd(wait_s=40))
    await clock.advance(1.2)
    detection.report(MachineResult("human", "telnyx:detection:human"))
    detection.report(MachineResult("machine", "telnyx:detection:machine"))
    detection.report(MachineResult(None, "telnyx:greeting:beep_detected", "beep"))
    assert [(v.answered_by, v.at_ms) for _, v in seen.verdicts] == [("human", 1200)]
    assert seen.points == [] and detection.done


async def test_no_callback_is_unknown_or_human_where_only_machines_are_reported() -> None:
    clock = FakeClock()
    twilio, seen = make(clock, NativeAmd(wait_s=40))
    plivo, seen_plivo = make(clock, NativeAmd(wait_s=7, silent_means="human", reports_greeting_end=False))
    await clock.advance(6.9)
    assert seen_plivo.verdicts == []
    await clock.advance(0.2)
    assert [(v.answered_by, v.cause) for _, v in seen_plivo.verdicts] == [("human", "NOCALLBACK-7000")]
    await clock.advance(33)
    assert [v.answered_by for _, v in seen.verdicts] == ["unknown"] and twilio.done and plivo.done


async def test_greeting_end_before_the_verdict_is_kept_until_it_comes() -> None:
    """Telnyx webhooks may arrive out of order."""
    clock = FakeClock()
    detection, seen = make(clock, NativeAmd(wait_s=40))
    detection.report(MachineResult(None, "telnyx:greeting:beep_detected", "beep"))
    assert seen.points == [] and seen.verdicts == []
    await clock.advance(0.5)
    detection.report(MachineResult("machine", "telnyx:detection:machine"))
    assert [p for _, p in seen.points] == ["beep"]


async def test_a_machine_whose_greeting_end_never_comes_gets_the_message_after_max_wait() -> None:
    clock = FakeClock()
    detection, seen = make(clock, NativeAmd(wait_s=40), maxGreetingWaitMs=20_000)
    detection.report(MachineResult("machine", "telnyx:detection:machine"))
    await clock.advance(19.9)
    assert seen.points == []
    await clock.advance(0.2)
    assert [p for _, p in seen.points] == ["timeout"]


async def test_detect_mode_needs_no_greeting_end() -> None:
    clock = FakeClock()
    detection, seen = make(clock, NativeAmd(wait_s=40), leave_message=False)
    detection.report(MachineResult("machine", "plivo:Machine=true"))
    assert [v.answered_by for _, v in seen.verdicts] == ["machine"] and seen.points == [] and detection.done


class Leg:
    format = ULAW_8K
    supports_marks = False

    async def send_media(self, payload: bytes) -> None:
        return None

    async def send_mark(self, name: str) -> None:
        return None

    async def send_clear(self) -> None:
        return None


class Listener:
    def on_pipeline_audio(self, pcm: bytes) -> None:
        return None

    def on_dtmf(self, digit: str) -> None:
        return None

    def on_speech_started(self) -> None:
        return None


async def test_without_a_carrier_greeting_end_the_local_detector_finds_the_beep_on_the_stream() -> None:
    """Plivo reports the machine only: the beep is found in the call's audio (MediaPipeline tap)."""
    clock = FakeClock()
    pipeline = MediaPipeline(Leg(), Listener(), clock=clock, inband_dtmf=False, vad_barge_in=False)
    detection, seen = make(clock, NativeAmd(wait_s=7, silent_means="human", reports_greeting_end=False))
    detection.attach(pipeline)
    t = np.arange(8000 * 1500 // 1000) / 8000
    voice = 3000 * sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8)) / 2
    audio = np.concatenate([voice, silence(300), tone(1000.0, 400), silence(1000)]).astype("<i2").tobytes()
    start = clock.monotonic()
    for i, offset in enumerate(range(0, len(audio), 320)):
        if i == 10:  # Plivo's callback comes while the greeting plays
            detection.report(MachineResult("machine", "plivo:Machine=true"))
        pipeline.receive(g711.encode(audio[offset:offset + 320].ljust(320, b"\0"), ULAW_8K.encoding))
        await clock.advance(0.02)
        if seen.points:
            break
    ((at, point),) = seen.points
    assert point == "beep" and abs((at - start) * 1000 - 2200) <= 100, "right after the beep ends"
    assert detection.done
    await pipeline.close()
