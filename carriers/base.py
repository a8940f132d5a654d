"""The Carrier interface every carrier implements, and the sans-I/O types it exchanges.

A carrier turns our intents (dial, hang up, speak, listen) into its REST/SIP/ARI calls, and turns
what it receives (webhooks, media-stream frames, SIP events) into normalized `CallEvent`s.
It knows nothing of the manager's internals: it sees only `CarrierHost`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from bridge.calls import CallEvent, CallRecord, CallState
from media.amd import AnsweredBy
from media.dtmf import DtmfDigit
from media.formats import AudioFormat

if TYPE_CHECKING:
    from bridge.config import Settings
    from media.clock import Clock
    from media.pipeline import MediaPipeline
    from media.transport import MediaTransport


class CarrierError(Exception):
    """A carrier request failed; the message is safe to show (no secrets)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


# Told of every finished carrier REST request (monitoring: metrics, trace spans), by carriers/http.py:
# (carrier, method, path, last HTTP status or None, start as time.time_ns(), end as time.time_ns()).
RequestObserver = Callable[[str, str, str, "int | None", int, int], None]
request_observers: list[RequestObserver] = []


# ---------------------------------------------------------------- webhooks (sans-I/O)


@dataclass(slots=True)
class WebhookRequest:
    """An HTTP request as the carrier needs it to verify and parse a webhook.

    `public_url` is the URL the carrier requested, reconstructed by bridge.security (publicUrl,
    trusted forwarded headers, Host); `url_variants` are the port variants worth trying too.
    `query` and `form` keep repeated keys.
    """

    method: str
    path: str
    public_url: str
    headers: Mapping[str, str]
    body: bytes
    query: list[tuple[str, str]] = field(default_factory=list)
    form: list[tuple[str, str]] = field(default_factory=list)
    remote: str = ""
    url_variants: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Header names are case-insensitive: lower-cased once here (the first of repeated ones
        # kept), and read with header() whatever the case the carrier's docs spell them in.
        normalized: dict[str, str] = {}
        for name, value in self.headers.items():
            normalized.setdefault(name.lower(), value)
        self.headers = normalized

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def query_value(self, key: str) -> str | None:
        for k, v in self.query:
            if k == key:
                return v
        return None

    def param(self, key: str) -> str | None:
        """Form value first, then query value."""
        for k, v in self.form:
            if k == key:
                return v
        return self.query_value(key)


@dataclass(slots=True)
class WebhookVerdict:
    ok: bool
    reason: str = ""
    # A stable key of this exact delivery; the same key again is a replay (acknowledged, no effect).
    replay_key: str | None = None


@dataclass(slots=True)
class WebhookReply:
    status: int = 200
    body: str = "OK"
    content_type: str = "text/plain"


@dataclass(slots=True)
class WebhookResult:
    """What `parse_webhook` read from one delivery: events to process, the reply, and follow-ups.

    Where the reply depends on what the manager decided (e.g. TwiML for an inbound call the policy
    accepted or rejected), `respond` builds it from the call record after processing (None when
    the call was rejected or is unknown). `effects` are the carrier's own follow-ups (a REST
    hang-up, waking a waiter), run by `Carrier.apply_effects` after the manager applied the
    events, and only for a delivery with something new: never for a replay, never for a
    redelivery whose events were all processed before.
    """

    events: list[CallEvent] = field(default_factory=list)
    reply: WebhookReply = field(default_factory=WebhookReply)
    respond: Callable[[CallRecord | None], WebhookReply] | None = None
    effects: list[object] = field(default_factory=list)


# The follow-ups carriers ask for in `WebhookResult.effects` (a carrier may add its own). A call is
# named by our call id or, where the carrier keys its bookkeeping by its own id, by that.


@dataclass(frozen=True, slots=True)
class SpeechHeard:
    """The carrier reports the end of one of its own speeches (<Say>, speak, <Speak>): the
    speak_native waiting for it returns (with `status`)."""

    key: str | None  # how the carrier named that speech (say id, speech id, command tag)
    call_id: str | None = None
    provider_call_id: str | None = None
    status: str = "completed"


@dataclass(frozen=True, slots=True)
class CallGone:
    """The carrier reports the call over: its waiters return, its bookkeeping goes."""

    call_id: str | None = None
    provider_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class HangUp:
    """End the call at the carrier (answering-machine detection found a machine, ...)."""

    provider_call_id: str


class CallLookup(Protocol):
    """A read-only view of the calls the manager knows, for parsing a webhook."""

    def find_call(self, call_id: str | None = None, provider_call_id: str | None = None) -> CallRecord | None: ...


# ---------------------------------------------------------------- media streams (sans-I/O)


class StreamProtocolError(ValueError):
    """A frame that does not follow the carrier's media-stream protocol: the stream is closed."""


@dataclass(slots=True)
class StreamStart:
    provider_call_id: str
    stream_id: str
    format: AudioFormat
    token: str | None = None
    call_id: str | None = None
    custom: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class StreamMedia:
    payload: bytes
    sequence: int | None = None
    timestamp_ms: int | None = None


@dataclass(slots=True)
class StreamDtmf:
    digit: DtmfDigit


@dataclass(slots=True)
class StreamMark:
    name: str


@dataclass(slots=True)
class StreamCleared:
    pass


@dataclass(slots=True)
class StreamStop:
    pass


@dataclass(slots=True)
class StreamIgnored:
    """A valid frame with nothing to do (connected, inbound mark echo we do not track, ...)."""

    event: str = ""


StreamMessage = StreamStart | StreamMedia | StreamDtmf | StreamMark | StreamCleared | StreamStop | StreamIgnored


class MediaStreamCodec(ABC):
    """One carrier's media-stream WebSocket dialect, for one connection (like pipecat's serializers).

    `parse` turns a text frame into a StreamMessage or raises StreamProtocolError; the encode_*
    methods build the text frames we send. After `parse` returns a StreamStart the codec knows
    the stream id and the wire format.
    """

    reorders: ClassVar[bool] = False  # True where the carrier does not guarantee frame order

    @abstractmethod
    def parse(self, text: str) -> StreamMessage: ...

    @abstractmethod
    def encode_media(self, payload: bytes) -> str: ...

    @abstractmethod
    def encode_mark(self, name: str) -> str: ...

    @abstractmethod
    def encode_clear(self) -> str: ...


# ---------------------------------------------------------------- carrier <-> manager


@dataclass(slots=True)
class ProviderStatus:
    """What the carrier says about a call on restart recovery."""

    terminal: bool
    state: CallState | None = None


@dataclass(slots=True)
class OutboundRequest:
    to: str
    from_number: str
    message: str
    mode: str  # "notify" | "conversation"
    stream: bool  # media streaming enabled for this call
    machine_detection: str = "off"  # off | detect | hangup | leave-message
    # The carrier's own detector does it (`Carrier.native_amd` offered one and `amd.detector` is auto):
    # ask for it on the dial. False: the bridge's local detector listens to the call's audio instead.
    native_amd: bool = False


@dataclass(frozen=True, slots=True)
class NativeAmd:
    """What a carrier's own answering-machine detection promises for a call, so the manager knows
    how long to wait and what silence means."""

    wait_s: float  # after the answer, a verdict arrives within this; otherwise `silent_means`
    silent_means: AnsweredBy = "unknown"  # "human" where the carrier calls back only for machines (Plivo)
    # leave-message: the carrier also reports the end of the greeting (a beep or silence). If not,
    # the bridge's local end-of-greeting detector listens to the media stream after the verdict.
    reports_greeting_end: bool = True


class CarrierHost(Protocol):
    """What the manager offers carriers."""

    settings: Settings
    clock: Clock

    def webhook_url(self, **query: str) -> str:
        """Public webhook URL with these query parameters added."""
        ...

    def stream_url(self) -> str:
        """Public wss:// URL of the media-stream endpoint."""
        ...

    def stream_token(self, call_id: str) -> str:
        """The per-call secret a media stream must present."""
        ...

    def emit(self, event: CallEvent) -> None:
        """Deliver an event from a carrier-side source (SIP stack, mock, ARI)."""
        ...

    def attach_media(self, call_id: str, transport: MediaTransport) -> MediaPipeline | None:
        """Connect a non-WebSocket media leg (pjsua2 port, mock caller) to the call's pipeline."""
        ...

    def detach_media(self, call_id: str) -> None: ...

    def get_call(self, call_id: str) -> CallRecord | None: ...


class Carrier(ABC):
    """The carrier interface. REST/SIP/ARI I/O lives in the async methods; verify/parse are pure."""

    name: ClassVar[str]
    # Pre-auth gate: a webhook with none of these headers is refused (401) before its body is read.
    signature_headers: ClassVar[tuple[str, ...]] = ()
    # Whether this carrier delivers call audio through a media stream or leg (so TTS/STT run here).
    streams_media: ClassVar[bool] = True
    # Whether the carrier's media leg reports key presses out of band (stream `dtmf` events). Then the
    # in-band Goertzel detector is off by default (streaming.inbandDtmf: auto): it costs ~30% of the
    # media path's CPU and would only find the same digits again.
    reports_dtmf: ClassVar[bool] = False
    # Whether the media leg exists whatever `streaming.enabled` says (SIP's RTP, the mock's loopback),
    # rather than being a stream the carrier opens only when asked (Twilio, Telnyx, Plivo).
    media_always: ClassVar[bool] = False
    # A cold transfer replaces what the call runs, so its media stream ends; when the transfer fails
    # the carrier opens a new one (Twilio <Dial>, Plivo Transfer API), and the bridge waits for it.
    transfer_ends_stream: ClassVar[bool] = False

    host: CarrierHost

    async def start(self, host: CarrierHost) -> None:
        self.host = host

    async def close(self) -> None:
        return None

    @abstractmethod
    async def initiate_call(self, call: CallRecord, request: OutboundRequest) -> str:
        """Place the call; return the carrier's call id."""

    async def answer_call(self, call: CallRecord) -> None:
        """Answer an accepted inbound call (carriers that need an explicit answer, e.g. Telnyx)."""
        return None

    async def reject_call(self, call: CallRecord) -> None:
        """Refuse an inbound call the policy rejected. Default: hang it up."""
        await self.hangup_call(call, CallState.HANGUP_BOT)

    @abstractmethod
    async def hangup_call(self, call: CallRecord, reason: CallState) -> None:
        """Hang up; a call the carrier says already ended counts as success."""

    async def speak_native(self, call: CallRecord, text: str) -> None:
        """Speak with the carrier's own TTS (used when no media stream is up)."""
        raise CarrierError(f"{self.name}: no media stream is up and the carrier has no native speech")

    async def start_listening(self, call: CallRecord, turn_token: str) -> None:
        """Ask the carrier for speech recognition (Gather/transcription_start/GetInput) when no stream."""
        return None

    async def stop_listening(self, call: CallRecord) -> None:
        return None

    # Keys out: True where `send_dtmf` is the carrier's own (REST/RFC 4733) and used even while a media
    # leg is up; False: the manager plays the digits as in-band tones on the call's media pipeline.
    sends_dtmf: ClassVar[bool] = False
    # `send_dtmf` ends the running media stream and starts a new one (Twilio `<Play digits>` replaces
    # the TwiML): the manager keeps the call up and its conversation going across the restart.
    dtmf_restarts_stream: ClassVar[bool] = False

    async def send_dtmf(self, call: CallRecord, digits: str) -> None:
        """Send keys (0-9 * # A-D; `w` 0.5 s and `W` 1 s pauses where `dtmf_pauses`)."""
        raise CarrierError(f"{self.name}: sending DTMF is not supported")

    # `send_dtmf` takes `w`/`W` pauses itself (one request for a whole dtmfSequence).
    dtmf_pauses: ClassVar[bool] = False

    def native_amd(self, mode: str) -> NativeAmd | None:
        """The carrier's own answering-machine detection for a call in this mode (detect | hangup |
        leave-message), or None: the bridge's local detector listens to the call's audio."""
        return None

    async def transfer_cold(self, call: CallRecord, to: str) -> None:
        """Start a cold (blind) transfer of the caller to `to` (E.164 or a sip: URI) and return once the
        carrier accepted the request. The outcome arrives later as a `CallEvent` of type
        `EventType.TRANSFER` with `outcome` set to a `TransferOutcome` value (from `parse_webhook` or
        `host.emit`); the manager then ends the call `transferred` or brings the caller back."""
        raise CarrierError(f"{self.name}: transfer is not supported")

    async def join_legs(self, call: CallRecord, person: CallRecord) -> bool:
        """Warm transfer, last step: join the caller's call and the person's call (which the bridge
        placed with `initiate_call` and briefed) at the carrier, so the bridge can leave. Return False
        when the carrier cannot join them itself: the manager then relays audio between the two legs'
        media pipelines (the local bridge used on SIP, Asterisk and the mock)."""
        return False

    async def get_call_status(self, call: CallRecord) -> ProviderStatus | None:
        """Terminal or not, per the carrier; None when unknown."""
        return None

    async def reattach_media(self, call: CallRecord) -> bool:
        """Ask the carrier for a new media stream to `host.stream_url()` for a live, answered call whose
        stream went away with its node (cluster failover). False: this carrier cannot, the call is ended."""
        return False

    def verify_webhook(self, request: WebhookRequest) -> WebhookVerdict:
        return WebhookVerdict(ok=False, reason=f"{self.name} does not take webhooks")

    def parse_webhook(self, request: WebhookRequest, calls: CallLookup) -> WebhookResult:
        """Pure: the result depends only on the request, the settings and `calls` (read, never
        changed). No carrier state is read or changed here and nothing is sent: what must follow
        goes into `effects` (and `respond`)."""
        return WebhookResult()

    def apply_effects(self, effects: Sequence[object]) -> None:
        """Run the follow-ups of a parsed webhook (sync: REST commands are spawned as tasks)."""
        return None

    def open_stream(self) -> MediaStreamCodec | None:
        """A codec for one new media-stream WebSocket, or None if the carrier has none."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}
