"""What a realtime protocol reports after parsing one server message (provider-neutral)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ready:
    """The session is configured; audio may flow."""


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The provider heard the caller start talking (OpenAI speech_started, Gemini interrupted)."""


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """The provider decided the caller's turn ended (OpenAI speech_stopped); `audio_end_ms`: where in
    the session's input audio the speech ended."""

    audio_end_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    response_id: str
    tag: str | None = None  # the `say` request this response answers, if any


@dataclass(frozen=True, slots=True)
class AudioOut:
    item_id: str
    audio: bytes  # in the protocol's output format (see `decode_output`)
    response_id: str = ""


@dataclass(frozen=True, slots=True)
class AudioDone:
    item_id: str


@dataclass(frozen=True, slots=True)
class ResponseDone:
    response_id: str
    status: str = "completed"


@dataclass(frozen=True, slots=True)
class UserTranscript:
    text: str
    final: bool


@dataclass(frozen=True, slots=True)
class BotTranscript:
    item_id: str
    text: str  # the whole transcript of that item so far


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class ToolCancelled:
    call_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GoAway:
    """The provider will close this connection soon: hand over to a resumed one now."""

    time_left_s: float


@dataclass(frozen=True, slots=True)
class LinkLost:
    """The socket dropped; audio of an unfinished response will not come (a reconnect follows)."""


@dataclass(frozen=True, slots=True)
class ProviderError:
    message: str


RealtimeEvent = (Ready | SpeechStarted | SpeechStopped | ResponseStarted | AudioOut | AudioDone | ResponseDone | UserTranscript
                 | BotTranscript | ToolCall | ToolCancelled | GoAway | LinkLost | ProviderError)
