"""Call record, call states and their transition rule, and the normalized CallEvent.

Carriers speak many dialects (Twilio CallStatus, Telnyx event_type, SIP responses, ...);
they all translate into `CallEvent`s, and the manager only ever reasons about these.
"""

from __future__ import annotations

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


@dataclass(slots=True)
class TurnTiming:
    """One reply turn's latency, in ms from the caller's final transcript (None: that step never happened)."""

    at: float  # unix time of the final transcript
    mode: str  # streaming | batch
    modelFirstTokenMs: float | None = None
    firstPieceMs: float | None = None
    ttsFirstByteMs: float | None = None
    firstAudioMs: float | None = None
    interrupted: bool = False


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
    turnTimings: list[TurnTiming] = field(default_factory=list)
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
        data = asdict(self)
        data["from"] = data.pop("from_")
        data["state"] = str(self.state)
        data["direction"] = str(self.direction)
        return data

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
            turnTimings=[TurnTiming(**t) for t in data.get("turnTimings") or []],
            processedEventIds=list(data.get("processedEventIds") or []),
            transfer=TransferRecord(**data["transfer"]) if isinstance(data.get("transfer"), dict) else None,
            metadata=dict(data.get("metadata") or {}),
        )

    def public_view(self) -> dict[str, Any]:
        """What status/RPC callers see (no internal dedupe bookkeeping)."""
        data = self.to_json()
        data.pop("processedEventIds", None)
        data.get("metadata", {}).pop("streamToken", None)
        return data
