"""The TTS interface: text in, PCM16 mono chunks out, streamed as the engine produces them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator


class TtsError(Exception):
    """Synthesis failed; the message is safe to log (no secrets)."""


class TtsEngine(ABC):
    name: str = "tts"
    sample_rate: int  # of the PCM16 mono chunks `synthesize` yields

    @abstractmethod
    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Stream PCM16 little-endian mono at `sample_rate`. Chunks may have any size (even empty);
        every chunk holds whole samples. Closing the iterator early stops the synthesis."""

    def open_text_stream(self) -> TextStream | None:
        """Engines that take text incrementally (one session for a whole streamed reply) return a
        TextStream; the others return None and get one `synthesize` call per piece."""
        return None

    def prewarm(self) -> None:
        """A call is ringing: open what its first synthesis will need (sync, never blocks; most engines: nothing)."""
        return None

    async def close(self) -> None:
        """Release clients and connections."""


class TextStream(ABC):
    """One reply's synthesis, fed text piece by piece as the model writes it."""

    @abstractmethod
    def push(self, text: str) -> None:
        """Queue a speakable piece (sync; sent in order)."""

    @abstractmethod
    def end(self) -> None:
        """No more text: finish the audio of what was pushed."""

    @abstractmethod
    def audio(self) -> AsyncIterator[bytes]:
        """PCM16 mono at the engine's `sample_rate`, as it arrives; closing it stops the synthesis."""

    def heard_text(self, heard_ms: float) -> str | None:
        """The text spoken in the first `heard_ms` of the audio, from the engine's own character
        timings; None when the engine gives none (the caller then estimates by time)."""
        return None


class CharTimeline:
    """Characters of a synthesis and when each starts in its audio (ms), built from per-chunk
    alignments (ElevenLabs: `chars`, `charStartTimesMs`, relative to that chunk's audio)."""

    def __init__(self) -> None:
        self.chars: list[str] = []
        self.starts_ms: list[float] = []

    def add(self, chars: list[str], starts_ms: list[float], chunk_at_ms: float) -> None:
        for char, start in zip(chars, starts_ms, strict=False):
            self.chars.append(char)
            self.starts_ms.append(chunk_at_ms + start)

    def spoken(self, heard_ms: float) -> str:
        """The words whose every character had started by `heard_ms` (a word cut mid-way is not kept)."""
        n = sum(1 for start in self.starts_ms if start < heard_ms)
        text = "".join(self.chars[:n])
        if n < len(self.chars) and not self.chars[n].isspace():
            text = text.rsplit(None, 1)[0] if " " in text.strip() else ""
        return " ".join(text.split())


class EvenBytes:
    """Holds back a dangling odd byte so that every chunk holds whole PCM16 samples."""

    __slots__ = ("_odd",)

    def __init__(self) -> None:
        self._odd = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._odd + chunk if self._odd else chunk
        if len(data) % 2:
            self._odd, data = data[-1:], data[:-1]
        else:
            self._odd = b""
        return bytes(data)
