"""Once an outbound call is answered: the keys sent out (dtmfSequence), answering-machine detection and
its verdicts (hang up, leave a message after the beep, or speak the first message).

Detection is the carrier's own where it has one and `amd.detector` is auto (the carrier's `call.machine`
reports go to a `NativeMachineDetection`), else the local detector on the call's audio; both end in the
same `_machine_verdict` and `_leave_message`."""

from __future__ import annotations

import logging
from dataclasses import asdict

from bridge.calls import CallRecord, CallState, Direction, MachineResult
from bridge.config import MachineDetectionMode
from bridge.machine import MachineDetection, NativeMachineDetection
from bridge.manager_core import CallError
from bridge.turns import Turns
from carriers.base import NativeAmd
from media.amd import AmdVerdict

log = logging.getLogger(__name__)


class Answering(Turns):
    async def _after_answer(self, call: CallRecord) -> None:
        """dtmfSequence first (an extension, an IVR menu), then machine detection or the first message."""
        sequence = call.metadata.get("dtmfSequence")
        if sequence and not call.metadata.get("dtmfSequenceSent"):
            try:
                await self._send_sequence(call, str(sequence))
            except CallError as exc:
                log.warning("call %s: dtmfSequence not sent: %s", call.callId, exc)
            call.metadata["dtmfSequenceSent"] = True
            self._save(call)
        if call.terminal:
            return
        mode = call.metadata.get("machineDetection")
        if mode and call.direction == Direction.OUTBOUND and "answeredBy" not in call.metadata:
            self._start_machine_detection(call, mode)
            return
        await self._speak_initial(call)

    async def _send_sequence(self, call: CallRecord, sequence: str) -> None:
        """Digits through send_dtmf; `w` pauses 0.5 s and `W` 1 s, on the manager's clock (or the
        carrier's own, in one request, where it takes pauses)."""
        if self.carrier.sends_dtmf and self.carrier.dtmf_pauses:
            await self.send_dtmf(call.callId, sequence)
            return
        digits = ""
        for ch in sequence:
            if ch in "wW":
                if digits:
                    await self.send_dtmf(call.callId, digits)
                    digits = ""
                await self.clock.sleep(0.5 if ch == "w" else 1.0)
            else:
                digits += ch
        if digits:
            await self.send_dtmf(call.callId, digits)

    def _machine_pending(self, call: CallRecord) -> bool:
        """Detection still listening, a machine's greeting still playing, or a voicemail being left."""
        return call.callId in self._machine or "voicemailAfter" in call.metadata

    def _native_amd(self, call: CallRecord, mode: str) -> NativeAmd | None:
        """The carrier's own detector, if the call was placed with it (`amdNative`)."""
        return self.carrier.native_amd(mode) if call.metadata.get("amdNative") else None

    def _start_machine_detection(self, call: CallRecord, mode: MachineDetectionMode, *,
                                 since_answer_s: float = 0.0) -> None:
        native = self._native_amd(call, mode)
        if native is None and not self._expects_media(call):
            # no audio reaches us, and this call has no carrier detector
            self._machine_verdict(call, mode, AmdVerdict("unknown", "NOMEDIA", 0))
            return
        def on_verdict(verdict: AmdVerdict) -> None:
            self._machine_verdict(call, mode, verdict)

        def on_message_point(reason: str) -> None:
            self._spawn(self._leave_message(call, reason), f"voicemail-{call.callId}")

        detection: MachineDetection | NativeMachineDetection
        if native is not None:
            detection = NativeMachineDetection(self.settings.amd, self.clock, native,
                                               wants_message_point=mode == "leave-message", on_verdict=on_verdict,
                                               on_message_point=on_message_point, since_answer_s=since_answer_s)
        else:
            detection = MachineDetection(self.settings.amd, self.clock, wants_message_point=mode == "leave-message",
                                         on_verdict=on_verdict, on_message_point=on_message_point)
        self._machine[call.callId] = detection
        voice = self._voices.get(call.callId)
        if voice is not None:
            detection.attach(voice.bridge)
        if isinstance(detection, NativeMachineDetection):  # reports that came before the answer was applied
            for early in call.metadata.pop("amdEarly", None) or []:
                detection.report(MachineResult(**early))

    def _machine_report(self, call: CallRecord, result: MachineResult) -> None:
        """A `call.machine` event: the carrier's own detector said something about this call."""
        detection = self._machine.get(call.callId)
        if isinstance(detection, NativeMachineDetection):
            detection.report(result)
        elif call.metadata.get("amdNative") and "answeredBy" not in call.metadata:
            # before the answer was applied (Plivo may call back first): kept for the detection to come
            call.metadata.setdefault("amdEarly", []).append(asdict(result))
        else:
            log.info("call %s: carrier machine report %s ignored (no detection waiting)", call.callId, result.cause)

    def _resume_machine_detection(self, call: CallRecord, elapsed_s: float) -> None:
        """Restart recovery of a call still being classified when the process stopped. The carrier's own
        detector still calls back (its verdict arrives as usual, up to the rest of its wait); the local
        detector's audio is gone with the old process, so that call is `unknown` (cause RESTART)."""
        mode = call.metadata.get("machineDetection")
        if not mode or call.direction != Direction.OUTBOUND or "answeredBy" in call.metadata:
            return
        native = self._native_amd(call, mode)
        if native is not None:
            self._start_machine_detection(call, mode, since_answer_s=elapsed_s)
        else:
            self._machine_verdict(call, mode, AmdVerdict("unknown", "RESTART", round(elapsed_s * 1000)))

    def _machine_verdict(self, call: CallRecord, mode: MachineDetectionMode, verdict: AmdVerdict) -> None:
        if call.terminal:
            return
        meta = call.metadata
        meta["answeredBy"] = verdict.answered_by
        meta["amdCause"] = verdict.cause
        meta["amdDecisionMs"] = verdict.at_ms
        self._save(call)
        log.info("call %s answered by %s (%s)", call.callId, verdict.answered_by, verdict.cause)
        self._publish("call.answered_by", call, answeredBy=verdict.answered_by, cause=verdict.cause,
                      decisionMs=verdict.at_ms)
        if verdict.answered_by == "machine" and mode == "hangup":
            self._spawn(self._hangup(call, CallState.HANGUP_BOT), f"amd-hangup-{call.callId}")
            return
        if verdict.answered_by == "machine" and mode == "leave-message":
            return  # the detector goes on listening for the end of the greeting
        self._machine.pop(call.callId, None)
        self._spawn(self._speak_initial(call), f"initial-{call.callId}")

    async def _leave_message(self, call: CallRecord, after: str) -> None:
        """The greeting is over (its beep ended, or a long silence): speak the message, hang up."""
        self._machine.pop(call.callId, None)
        if call.terminal:
            return
        call.metadata["voicemailAfter"] = after
        call.initial_message_spoken = True
        text = call.metadata.get("voicemailMessage") or self.settings.amd.voicemailMessage or call.initial_message
        voice = self._voices.get(call.callId)
        if voice is not None:
            voice.bridge.barge_in_enabled = False  # the machine's own sounds must not cut the message
        try:
            await self._say(call, text)
        except CallError as exc:
            log.warning("call %s: voicemail message failed: %s", call.callId, exc)
            return
        if not call.terminal:
            await self._hangup(call, CallState.VOICEMAIL)
