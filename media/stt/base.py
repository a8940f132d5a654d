"""The STT interface: a per-call session fed with audio, reporting speech-started, partial and
final transcripts through a callback (called on the event loop)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from media.formats import AudioFormat

SttEventKind = Literal["speech_started", "speech_ended", "partial", "final", "error"]


@dataclass(frozen=True, slots=True)
class SttEvent:
    kind: SttEventKind
    text: str = ""
    ago_s: float = 0.0  # speech_ended: how long before this event the caller actually fell silent


class SttError(Exception):
    """Bad STT configuration or a failed session; the message is safe to log (no secrets)."""


class SttSession(ABC):
    # True when the session wants the carrier's raw payloads (`feed_wire`) instead of pipeline PCM
    # (`feed`): e.g. OpenAI Realtime takes G.711 u-law as is. Feed one or the other, not both.
    wants_wire: bool = False
    # True when the engine emits `speech_ended` (the caller fell silent) ahead of its finals; else
    # the call's local VAD stands in for it in turn timing.
    reports_speech_end: bool = False

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    def feed(self, pcm: bytes) -> None:
        """PCM16 mono at the session's sample rate. Sync and non-blocking (called per frame)."""

    def feed_wire(self, payload: bytes) -> None:
        """A raw wire payload, in the `wire_format` given to `open`; only when `wants_wire`."""
        raise NotImplementedError

    @abstractmethod
    async def close(self) -> None: ...


class SttEngine(ABC):
    name: str = "stt"

    @abstractmethod
    def open(
        self,
        *,
        sample_rate: int,
        on_event: Callable[[SttEvent], None],
        wire_format: AudioFormat | None = None,
    ) -> SttSession:
        """A session for one call. `wire_format` (optional) lets an engine that accepts the
        carrier's codec take the raw payloads (see `SttSession.wants_wire`)."""
