"""Wires call events to metrics, traces and turn timing (the manager's one observer for monitoring).

Turn timing hook for the turn pipeline: `Monitor.turn_mark(call_id, milestone, at=None)` with a
milestone of bridge/turnmarks.py (`speechEnd`, `sttFinal`, `modelFirstToken`, `firstPiece`,
`ttsFirstByte`, `firstAudioOut`; `at` a clock.monotonic() reading, default now). `speechEnd` comes
from the call's voice: the STT engine's own end of speech, else the MediaPipeline's VAD. Without a
streaming pipeline the events stand in: a final transcript is `sttFinal`, the bot starting to
speak a reply is `modelFirstToken` and `firstPiece`, and the call's voice reports TTS first byte
and first audio out. The earliest report of a milestone wins, so a finer pipeline can mark first.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bridge.logs import current_call_id
from bridge.turnmarks import MAX_TURNS_KEPT, Turn, TurnTracker

if TYPE_CHECKING:
    from bridge.calls import CallRecord
    from bridge.manager import CallManager
    from bridge.metrics import Metrics
    from bridge.tracing import Tracing

log = logging.getLogger(__name__)

ENGINES = ("stt", "tts", "responder", "model", "realtime")


class Monitor:
    def __init__(self, metrics: Metrics, tracing: Tracing) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.turns = TurnTracker()
        self.manager: CallManager | None = None
        # calls whose voice marks the turn's end itself (speech-to-speech: the model's VAD); their
        # transcripts arrive later, whenever the model's transcription is done, and end no turn
        self._voice_finals: set[str] = set()

    def attach(self, manager: CallManager) -> None:
        self.manager = manager
        manager.observers.append(self.on_event)

    # ------------------------------------------------------------ manager events
    def on_event(self, kind: str, call: CallRecord, extra: dict[str, Any]) -> None:
        if kind == "call.created":
            self.metrics.calls_started.labels(carrier=call.provider, direction=str(call.direction)).inc()
            self.tracing.call_started(call.callId, {"voicecall.carrier": call.provider,
                                                    "voicecall.direction": str(call.direction)})
        elif kind == "call.ended":
            self.metrics.calls_ended.labels(carrier=call.provider, state=str(call.state)).inc()
            self.tracing.call_ended(call.callId, str(call.state))
            self.turns.forget(call.callId)
            self._voice_finals.discard(call.callId)
        elif kind == "call.error":
            engine = extra.get("engine") or str(extra.get("error") or "").partition(":")[0]
            if engine in ENGINES:
                self.metrics.engine_errors.labels(engine=engine).inc()
        elif kind == "call.speech" and call.callId not in self._voice_finals:
            self.turn_mark(call.callId, "sttFinal")
        elif kind == "call.speaking":
            self.turn_mark(call.callId, "modelFirstToken")
            self.turn_mark(call.callId, "firstPiece")

    # ------------------------------------------------------------ turn timing
    def turn_mark(self, call_id: str, milestone: str, at: float | None = None) -> None:
        if self.manager is None:
            return
        when = self.manager.clock.monotonic() if at is None else at
        turn = self.turns.mark(call_id, milestone, when)
        if turn is not None:
            self._completed(turn)

    def milestone_hook(self, call_id: str) -> Any:
        """`(milestone, ago=0.0)` for a call's voice (CallVoice `on_milestone`): reached `ago` seconds ago."""
        def hook(milestone: str, ago: float = 0.0) -> None:
            if milestone == "sttFinal":
                self._voice_finals.add(call_id)
            at = self.manager.clock.monotonic() - ago if self.manager is not None and ago else None
            self.turn_mark(call_id, milestone, at)
        return hook

    def turn_note(self, call_id: str, *, mode: str | None = None, interrupted: bool = False) -> None:
        """The turn's driver notes its mode (on the turn in progress) or that the caller cut the
        answer off (on the turn in progress, else on the call's last recorded turn)."""
        turn = self.turns.current(call_id)
        if mode is not None and turn is not None and turn.mode is None:
            turn.mode = mode
        if not interrupted or self.manager is None:
            return
        call = self.manager.get_call(call_id)
        if call is not None and call.turns:  # a turn is recorded at its first audio: the cut one is the last
            call.turns[-1].interrupted = True

    def turn_note_hook(self, call_id: str) -> Any:
        """`(mode=None, interrupted=False)` for a call's voice (CallVoice `on_turn_note`)."""
        def hook(*, mode: str | None = None, interrupted: bool = False) -> None:
            self.turn_note(call_id, mode=mode, interrupted=interrupted)
        return hook

    def _completed(self, turn: Turn) -> None:
        parts = turn.parts
        self.metrics.observe_turn(parts)
        self.tracing.turn(turn)
        call = self.manager.get_call(turn.call_id) if self.manager is not None else None
        if call is None or self.manager is None:
            return
        start = turn.start
        clock = self.manager.clock
        record = turn.record(None if start is None else round(clock.time() - (clock.monotonic() - start), 3))
        call.turns.append(record)
        del call.turns[:-MAX_TURNS_KEPT]
        self.manager.save_soon(call)  # at first audio: written with the turn's end (or within 3 s)
        self.manager.publish("call.turn", call, turn=record.to_json())

    # ------------------------------------------------------------ carrier REST (carriers/http.py observer)
    def on_carrier_request(self, carrier: str, method: str, path: str, status: int | None,
                           start_ns: int, end_ns: int) -> None:
        self.metrics.carrier_requests.labels(carrier=carrier, status=str(status or "error")).inc()
        self.metrics.carrier_request_latency.labels(carrier=carrier).observe(max(0, end_ns - start_ns) / 1e9)
        self.tracing.request(carrier, method, path, status, start_ns, end_ns, current_call_id())
