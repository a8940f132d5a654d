"""Call record, call states and their transition rule, and the normalized CallEvent.

Carriers speak many dialects (Twilio CallStatus, Telnyx event_type, SIP responses, ...);
they all translate into `CallEvent`s, and the manager only ever reasons about these.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from media.amd import AnsweredBy


class CallState(StrEnum):
    INITIATED = "initiated"
    RINGING = "ringing"
    ANSWERED = "answered"
    ACTIVE = "active"
    SPEAKING = "speaking"
    LISTENING = "listening"
    TRANSFERRING = "transferring"  # handing the caller to a person; back to the conversation if that fails
    # terminal
    COMPLETED = "completed"
    HANGUP_USER = "hangup-user"
    HANGUP_BOT = "hangup-bot"
    TIMEOUT = "timeout"
    ERROR = "error"
    FAILED = "failed"
    NO_ANSWER = "no-answer"
    BUSY = "busy"
    VOICEMAIL = "voicemail"
    TRANSFERRED = "transferred"  # the caller now talks to the person (`CallRecord.transfer.to`)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        CallState.COMPLETED,
        CallState.HANGUP_USER,
        CallState.HANGUP_BOT,
        CallState.TIMEOUT,
        CallState.ERROR,
        CallState.FAILED,
        CallState.NO_ANSWER,
        CallState.BUSY,
        CallState.VOICEMAIL,
        CallState.TRANSFERRED,
    }
)

# Forward order of the non-terminal states; speaking and listening share a rank so they may cycle.
_RANK = {
    CallState.INITIATED: 0,
    CallState.RINGING: 1,
    CallState.ANSWERED: 2,
    CallState.ACTIVE: 3,
    CallState.SPEAKING: 4,
    CallState.LISTENING: 4,
    CallState.TRANSFERRING: 4,
}

# States of a live conversation that may follow each other in any order.
_CONVERSING = frozenset({CallState.SPEAKING, CallState.LISTENING, CallState.TRANSFERRING})


def can_transition(current: CallState, target: CallState) -> bool:
    """The seed system's rule: terminal is final; any terminal is reachable from a non-terminal;
    speaking, listening and transferring may cycle; otherwise only strictly forward moves."""
    if current.terminal:
        return False
    if target.terminal:
        return True
    if current in _CONVERSING and target in _CONVERSING:
        return current != target
    return _RANK[target] > _RANK[current]


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class CallMode(StrEnum):
    NOTIFY = "notify"
    CONVERSATION = "conversation"


class EventType(StrEnum):
    INITIATED = "call.initiated"
    RINGING = "call.ringing"
    ANSWERED = "call.answered"
    ACTIVE = "call.active"
    SPEAKING = "call.speaking"
    SPEECH = "call.speech"
    SILENCE = "call.silence"
    DTMF = "call.dtmf"
    ENDED = "call.ended"
    ERROR = "call.error"
    TRANSFER = "call.transfer"  # a transfer's outcome (`outcome`), from the carrier or the bridge
    MACHINE = "call.machine"  # the carrier's own answering-machine detection said something (`machine`)


# A warm transfer's call to the person is a linked record: metadata[TRANSFER_PARENT] = the caller's call id.
TRANSFER_PARENT = "transferOf"


class TransferMode(StrEnum):
    COLD = "cold"  # the carrier hands the caller to the person; the bridge leaves at once
    WARM = "warm"  # the bridge calls the person, tells them a summary, then joins the two and leaves


class TransferOutcome(StrEnum):
    COMPLETED = "completed"  # the person took the call
    BUSY = "busy"
    NO_ANSWER = "no-answer"
    REFUSED = "refused"  # declined by the person or the far end (SIP 4xx/6xx to the REFER or the INVITE)
    FAILED = "failed"  # anything else: carrier error, network, timeout


@dataclass(slots=True)
class TransferRecord:
    """A call's latest transfer attempt (`CallRecord.transfer`)."""

    mode: str  # TransferMode
    to: str
    startedAt: float
    outcome: str | None = None  # TransferOutcome; None while it runs
    endedAt: float | None = None
    summary: str | None = None  # what the person was told (warm)
    personCallId: str | None = None  # warm: the bridge's call to the person (a linked CallRecord)
    joined: str | None = None  # warm, completed: "carrier" (the carrier joined the legs) or "relay" (the bridge)
    error: str | None = None  # why it failed, when the carrier said


@dataclass(frozen=True, slots=True)
class MachineResult:
    """What a carrier's own answering-machine detection reported, carrier-neutral.

    `answered_by` is the verdict (human | machine | unknown), None when this report only says the
    greeting ended; `greeting_end` (beep | silence | other) says the machine's greeting is over, so
    a voicemail message may start; `cause` keeps the carrier's own value (e.g. `twilio:machine_end_beep`).
    """

    answered_by: AnsweredBy | None
    cause: str
    greeting_end: str | None = None
    decision_ms: int | None = None  # as the carrier measured it; else the bridge measures from the answer


# End reasons are the terminal states' names.
EndReason = CallState


@dataclass(slots=True)
class CallEvent:
    """A carrier-neutral call event. `call_id` is ours; `provider_call_id` is the carrier's."""

    type: EventType
    call_id: str | None = None
    provider_call_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    dedupe_key: str | None = None
    timestamp: float = field(default_factory=time.time)
    turn_token: str | None = None
    direction: Direction | None = None
    from_number: str | None = None
    to_number: str | None = None
    text: str | None = None  # speaking
    transcript: str | None = None  # speech
    is_final: bool = True
    confidence: float | None = None
    digits: str | None = None
    reason: CallState | None = None  # ended
    error: str | None = None
    retryable: bool = False
    # carrier-specific linkage, e.g. Plivo request_uuid -> CallUUID upgrade
    previous_provider_call_id: str | None = None
    outcome: str | None = None  # transfer: a TransferOutcome value
    machine: MachineResult | None = None  # call.machine: the carrier's answering-machine detection

    @property
    def key(self) -> str:
        return self.dedupe_key or self.id


@dataclass(slots=True)
class TranscriptEntry:
    timestamp: float
    speaker: str  # "bot" | "user"
    text: str
    isFinal: bool = True


@dataclass(slots=True)
class ToolCallEntry:
    """One tool the model called during the call, and what went back to it."""

    at: float
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it
    result: str
    position: int  # len(transcript) when the model's reply ended: where the call sits in the conversation
    withText: bool = False  # the same reply also spoke text (transcript[position - 1])
    endCall: bool = False


TURN_PARTS = ("stt", "model", "piece", "tts", "bridge", "total")


@dataclass(slots=True)
class TurnRecord:
    """One voice-to-voice turn: from the caller's end of speech (or the final transcript when no
    engine reports the end) to the first audio of the answer leaving for the caller, in ms per part
    (bridge/turnmarks.py; None: not measured). The monitor writes it when that first audio goes out;
    the turn's driver notes its mode and a barge-in. `voicecall latency`, the metrics, the console
    and the after-call report all read this one record."""

    n: int
    at: float | None = None  # unix time the turn started
    mode: str | None = None  # streaming | batch | realtime
    interrupted: bool = False  # the caller cut the answer off
    sttMs: float | None = None
    modelMs: float | None = None
    pieceMs: float | None = None
    ttsMs: float | None = None
    bridgeMs: float | None = None
    totalMs: float | None = None

    def parts(self) -> dict[str, float]:
        """Measured parts only: {"stt": ms, ..., "total": ms}."""
        return {p: v for p in TURN_PARTS if (v := getattr(self, f"{p}Ms")) is not None}

    def to_json(self) -> dict[str, Any]:
        values = ((k, getattr(self, k)) for k in self.__slots__)
        return {k: v for k, v in values if v is not None and v is not False}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TurnRecord:
        def ms(key: str) -> float | None:
            value = data.get(key)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        return cls(n=int(data.get("n") or 0), at=ms("at"), mode=data.get("mode") or None,
                   interrupted=bool(data.get("interrupted")), **{f"{p}Ms": ms(f"{p}Ms") for p in TURN_PARTS})

    @classmethod
    def from_timing(cls, n: int, data: dict[str, Any]) -> TurnRecord:
        """An entry of the old `turnTimings` (ms since the final transcript) as parts."""
        steps = [data.get(k) for k in ("modelFirstTokenMs", "firstPieceMs", "ttsFirstByteMs", "firstAudioMs")]
        parts: dict[str, float | None] = {}
        prev: float | None = 0.0
        for name, step in zip(("model", "piece", "tts", "bridge"), steps, strict=True):
            ok = isinstance(step, (int, float)) and prev is not None
            parts[f"{name}Ms"] = round(float(step) - prev, 1) if ok else None  # type: ignore[operator, arg-type]
            prev = float(step) if isinstance(step, (int, float)) else None
        total = steps[3]
        return cls(n=n, at=data.get("at"), mode=data.get("mode"), interrupted=bool(data.get("interrupted")),
                   totalMs=float(total) if isinstance(total, (int, float)) else None, **parts)


def legacy_turns(data: dict[str, Any]) -> list[TurnRecord]:
    """Turns of a call log line written before TurnRecord: the monitor's `metadata.turns`, else the
    conversation engine's `turnTimings` (the same turns, recorded twice then)."""
    meta = data.get("metadata") or {}
    old = meta.get("turns") if isinstance(meta, dict) else None
    if isinstance(old, list) and old:
        return [TurnRecord.from_json(t) for t in old if isinstance(t, dict)]
    timings = data.get("turnTimings")
    if isinstance(timings, list):
        return [TurnRecord.from_timing(i, t) for i, t in enumerate(timings, 1) if isinstance(t, dict)]
    return []


def turns_of(data: dict[str, Any]) -> list[TurnRecord]:
    """A call log line's turns, whichever way it was written."""
    turns = data.get("turns")
    if isinstance(turns, list) and turns:
        return [TurnRecord.from_json(t) for t in turns if isinstance(t, dict)]
    return legacy_turns(data)


@dataclass(slots=True)
class CallRecord:
    callId: str
    provider: str
    direction: Direction
    state: CallState
    from_: str
    to: str
    startedAt: float
    providerCallId: str | None = None
    answeredAt: float | None = None
    endedAt: float | None = None
    endReason: str | None = None
    transcript: list[TranscriptEntry] = field(default_factory=list)
    toolCalls: list[ToolCallEntry] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    processedEventIds: list[str] = field(default_factory=list)
    transfer: TransferRecord | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    # Typed access to the bookkeeping the manager keeps and carriers read. Stored under these
    # metadata keys, so calls.jsonl keeps its shape and old records read back unchanged.

    @property
    def mode(self) -> CallMode:
        return CallMode(self.metadata.get("mode") or CallMode.CONVERSATION)

    @mode.setter
    def mode(self, value: CallMode) -> None:
        self.metadata["mode"] = CallMode(value).value

    @property
    def media_attached(self) -> bool:
        """A media stream or leg is connected to the call's pipeline right now."""
        return bool(self.metadata.get("mediaAttached"))

    @media_attached.setter
    def media_attached(self, value: bool) -> None:
        self.metadata["mediaAttached"] = value

    @property
    def initial_message(self) -> str:
        """What the call says first (notify text, conversation opener, inbound greeting)."""
        return str(self.metadata.get("initialMessage") or "")

    @initial_message.setter
    def initial_message(self, value: str) -> None:
        self.metadata["initialMessage"] = value

    @property
    def initial_message_spoken(self) -> bool:
        return bool(self.metadata.get("initialMessageSpoken"))

    @initial_message_spoken.setter
    def initial_message_spoken(self, value: bool) -> None:
        self.metadata["initialMessageSpoken"] = value

    @property
    def previous_provider_call_ids(self) -> list[str]:
        """Carrier ids this call had before (Plivo's request_uuid before its CallUUID), oldest first."""
        return [str(v) for v in self.metadata.get("previousProviderCallIds") or []]

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data, independent of the live record (deep copies)."""
        data = asdict(self)
        data["from"] = data.pop("from_")
        data["state"] = str(self.state)
        data["direction"] = str(self.direction)
        data["turns"] = [t.to_json() for t in self.turns]
        return data

    def json_text(self) -> str:
        """`to_json()` as JSON text, built without copying: the call log and the cluster store write a
        record on every change, and `asdict`'s deep copies cost ~0.6 ms per save of a call with 8 turns
        (5x this), all of it on the event loop in the middle of everyone's turns."""
        return json.dumps({
            "callId": self.callId, "provider": self.provider, "direction": str(self.direction),
            "state": str(self.state), "to": self.to, "startedAt": self.startedAt,
            "providerCallId": self.providerCallId, "answeredAt": self.answeredAt, "endedAt": self.endedAt,
            "endReason": self.endReason, "transcript": [_fields(t) for t in self.transcript],
            "toolCalls": [_fields(t) for t in self.toolCalls], "turns": [t.to_json() for t in self.turns],
            "processedEventIds": self.processedEventIds,
            "transfer": _fields(self.transfer) if self.transfer is not None else None,
            "metadata": self.metadata, "from": self.from_,
        }, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallRecord:
        return cls(
            callId=str(data["callId"]),
            provider=str(data["provider"]),
            direction=Direction(data["direction"]),
            state=CallState(data["state"]),
            from_=str(data.get("from") or ""),
            to=str(data.get("to") or ""),
            startedAt=float(data["startedAt"]),
            providerCallId=data.get("providerCallId"),
            answeredAt=data.get("answeredAt"),
            endedAt=data.get("endedAt"),
            endReason=data.get("endReason"),
            transcript=[TranscriptEntry(**t) for t in data.get("transcript") or []],
            toolCalls=[ToolCallEntry(**t) for t in data.get("toolCalls") or []],
            turns=turns_of(data),
            processedEventIds=list(data.get("processedEventIds") or []),
            transfer=TransferRecord(**data["transfer"]) if isinstance(data.get("transfer"), dict) else None,
            metadata={k: v for k, v in (data.get("metadata") or {}).items() if k != "turns"},
        )

    def public_view(self) -> dict[str, Any]:
        """What status/RPC callers see (no internal dedupe bookkeeping)."""
        data = self.to_json()
        data.pop("processedEventIds", None)
        data.get("metadata", {}).pop("streamToken", None)
        return data


def _fields(obj: Any) -> dict[str, Any]:
    """A slots dataclass of plain values as a dict (no copying)."""
    return {name: getattr(obj, name) for name in obj.__slots__}
