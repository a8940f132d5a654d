"""What a MediaPipeline needs from a carrier's media leg (a WebSocket, a pjsua2 port, the mock caller)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from media.formats import FRAME_MS, AudioFormat


class MediaTransport(Protocol):
    """One call's media leg toward the carrier.

    `format` is the wire format of payloads in both directions. Outbound messages carry `send_ms`
    of audio, an optional attribute (20 when absent; a multiple of 20): `send_media` takes exactly
    that much encoded audio, except the last message of a play, which may be shorter by whole 20 ms
    frames. Transports that cannot echo marks set `supports_marks = False`; the bridge then derives
    "heard" from its own pacing clock. A transport whose leg reports key presses out of band
    (Twilio/Telnyx/Plivo `dtmf` events) sets `reports_dtmf = True`; the bridge then leaves its in-band
    detector off unless told otherwise. A transport may also offer `send_media_now(payload) -> bool`:
    the same send done synchronously when it needs no waiting (False, having done nothing, when it
    would wait; the pipeline then awaits `send_media`), which spares a coroutine per message.
    """

    format: AudioFormat
    supports_marks: bool

    async def send_media(self, payload: bytes) -> None: ...

    async def send_mark(self, name: str) -> None: ...

    async def send_clear(self) -> None: ...


def outbound_ms(transport: object) -> int:
    """The transport's outbound message duration (`send_ms`, default one 20 ms frame)."""
    ms = getattr(transport, "send_ms", FRAME_MS)
    if not isinstance(ms, int) or ms <= 0 or ms % FRAME_MS:
        raise ValueError(f"send_ms must be a positive multiple of {FRAME_MS} ms (got {ms!r})")
    return ms


def reports_dtmf(transport: object) -> bool:
    """Whether the transport's leg reports key presses itself (`reports_dtmf`, default False)."""
    return getattr(transport, "reports_dtmf", False) is True


class MediaListener(Protocol):
    """Where the bridge delivers what the caller says, at the pipeline rate (PCM16 mono)."""

    def on_pipeline_audio(self, pcm: bytes) -> None: ...

    def on_dtmf(self, digit: str) -> None: ...

    def on_speech_started(self) -> None: ...


class WireAudioListener(Protocol):
    """Optional extra for a MediaListener: the caller's audio as it came off the wire (in order,
    before decoding), so an STT engine that takes the wire codec (OpenAI Realtime with g711_ulaw)
    gets it without a decode/resample/encode round trip. MediaPipeline calls it when present.
    A listener that sets `wants_pipeline_audio = False` gets no `on_pipeline_audio` calls (the
    bridge then skips resampling the caller's audio, unless it records the call). A listener that
    acts on that audio as it comes (a local STT's end of speech, a realtime model) sets
    `pipeline_audio_hold_ms = 0`: it then gets every frame as it arrives rather than 100 ms pieces."""

    def on_wire_audio(self, payload: bytes, format: AudioFormat) -> None: ...


# Extra consumers of the caller's audio next to the listener (answering-machine detection):
# PCM16 mono as decoded off the wire, and its sample rate. Called per frame on the event loop.
CallerAudioTap = Callable[[bytes, int], None]
