"""Voice-to-voice turn timing: milestones of one turn in, its latency parts out (pure, no I/O).

A turn runs from the moment the caller stops speaking to the first audio of the answer leaving
for the caller. Milestones (monotonic seconds), in order:
    speechEnd -> sttFinal -> modelFirstToken -> firstPiece -> ttsFirstByte -> firstAudioOut
Parts are the gaps between consecutive milestones; `total` is speechEnd -> firstAudioOut. A part
whose ends are not both known is left out (e.g. a carrier-side recognizer gives no separate
speechEnd: the turn then starts at sttFinal and the `stt` part is absent).
The bot's playback and the caller's thinking time are outside every turn by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.calls import TurnRecord

MILESTONES = ("speechEnd", "sttFinal", "modelFirstToken", "firstPiece", "ttsFirstByte", "firstAudioOut")
PARTS: dict[str, tuple[str, str]] = {
    "stt": ("speechEnd", "sttFinal"),
    "model": ("sttFinal", "modelFirstToken"),
    "piece": ("modelFirstToken", "firstPiece"),
    "tts": ("firstPiece", "ttsFirstByte"),
    "bridge": ("ttsFirstByte", "firstAudioOut"),
}
MAX_TURNS_KEPT = 50  # per call record, newest last


def turn_parts(marks: dict[str, float]) -> dict[str, float]:
    """Milliseconds per part, plus `total` from the first known milestone to firstAudioOut."""
    parts = {name: round((marks[b] - marks[a]) * 1000, 1)
             for name, (a, b) in PARTS.items() if a in marks and b in marks}
    start = next((marks[m] for m in MILESTONES[:-1] if m in marks), None)
    if start is not None and "firstAudioOut" in marks:
        parts["total"] = round((marks["firstAudioOut"] - start) * 1000, 1)
    return parts


@dataclass(slots=True)
class Turn:
    call_id: str
    number: int
    marks: dict[str, float] = field(default_factory=dict)
    mode: str | None = None  # noted by the turn's driver (streaming | batch | realtime)

    @property
    def parts(self) -> dict[str, float]:
        return turn_parts(self.marks)

    def record(self, started_unix: float | None) -> TurnRecord:
        """What the call record keeps of a turn (`CallRecord.turns`)."""
        parts = self.parts
        return TurnRecord(n=self.number, at=started_unix, mode=self.mode, sttMs=parts.get("stt"),
                          modelMs=parts.get("model"), pieceMs=parts.get("piece"), ttsMs=parts.get("tts"),
                          bridgeMs=parts.get("bridge"), totalMs=parts.get("total"))

    @property
    def start(self) -> float | None:
        return next((self.marks[m] for m in MILESTONES if m in self.marks), None)


class TurnTracker:
    """Per call, the turn in progress. A turn opens at speechEnd or sttFinal and closes at the next
    firstAudioOut; audio out with no open turn (the greeting, keys) is not a turn."""

    def __init__(self) -> None:
        self._open: dict[str, Turn] = {}
        self._count: dict[str, int] = {}
        self._closed_at: dict[str, float] = {}  # firstAudioOut of the call's last completed turn

    def mark(self, call_id: str, milestone: str, at: float) -> Turn | None:
        """Record a milestone; returns the turn it completed, if any."""
        if milestone not in MILESTONES:
            raise ValueError(f"unknown turn milestone {milestone!r}")
        turn = self._open.get(call_id)
        if milestone == "speechEnd" and at <= self._closed_at.get(call_id, float("-inf")):
            return None  # heard after its turn was already answered: nothing to time
        if (milestone == "speechEnd" and turn is not None and "sttFinal" in turn.marks
                and at <= turn.marks["sttFinal"]):
            # A VAD reports the silence only after its hangover, often after a fast recognizer's
            # final: dated back, it still ends this turn's speech (the last pause before the final).
            turn.marks["speechEnd"] = max(at, turn.marks.get("speechEnd", at))
            return None
        if milestone in ("speechEnd", "sttFinal") and (
                turn is None or milestone in turn.marks or "modelFirstToken" in turn.marks
                or (milestone == "speechEnd" and "sttFinal" in turn.marks)):
            # The caller spoke (again): a fresh turn; one abandoned before the model started keeps its number.
            reuse = turn is not None and "modelFirstToken" not in turn.marks
            number = turn.number if reuse and turn is not None else self._count.get(call_id, 0) + 1
            self._count[call_id] = number
            turn = self._open[call_id] = Turn(call_id, number)
        if turn is None:
            return None
        turn.marks.setdefault(milestone, at)
        if milestone == "firstAudioOut":
            del self._open[call_id]
            self._closed_at[call_id] = at
            return turn
        return None

    def current(self, call_id: str) -> Turn | None:
        """The call's turn in progress, if any."""
        return self._open.get(call_id)

    def forget(self, call_id: str) -> None:
        self._open.pop(call_id, None)
        self._count.pop(call_id, None)
        self._closed_at.pop(call_id, None)
