"""One call's voice: its MediaPipeline, STT session and TTS engine, wired to the manager's events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.calls import CallEvent, EventType
from media.pipeline import MediaPipeline, heard_text

if TYPE_CHECKING:
    from media.formats import AudioFormat
    from media.recorder import CallRecorder
    from media.stt.base import SttEngine, SttEvent, SttSession
    from media.transport import MediaTransport
    from media.tts.base import TtsEngine

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Spoken:
    """What the caller actually heard of one utterance."""

    text: str
    heard_text: str
    interrupted: bool
    heard_ms: float
    synthesized_ms: float


class CallVoice:
    def __init__(
        self,
        *,
        call_id: str,
        transport: MediaTransport,
        tts: TtsEngine,
        stt_engine: SttEngine | None,
        emit: Callable[[CallEvent], None],
        pipeline_rate: int,
        recorder: CallRecorder | None = None,
        barge_in: bool = True,
        inband_dtmf: bool | None = None,
        echo: bool = False,
        on_milestone: Callable[..., None] | None = None,
        on_turn_note: Callable[..., None] | None = None,
    ) -> None:
        self.call_id = call_id
        self.tts = tts
        self._emit = emit
        self.stt: SttSession | None = (
            stt_engine.open(sample_rate=pipeline_rate, on_event=self._on_stt, wire_format=transport.format)
            if stt_engine else None
        )
        # Read by the MediaPipeline: an STT that takes the wire payloads (or none at all) needs no
        # pipeline-rate copy of the caller, so the inbound resampler is skipped (~1/4 of a call's CPU).
        stt_takes_pcm = self.stt is not None and not self.stt.wants_wire
        self.wants_pipeline_audio = echo or stt_takes_pcm
        # an STT on that audio hears the end of speech on the frame it happens in, not up to 100 ms later
        self.pipeline_audio_hold_ms: int | None = 0 if stt_takes_pcm else None
        self.bridge = MediaPipeline(transport, self, pipeline_rate=pipeline_rate, recorder=recorder,
                                  inband_dtmf=inband_dtmf, vad_barge_in=barge_in and not echo,
                                  stall_timeout_s=None if echo else 8.0)
        self.pipeline_rate = pipeline_rate
        # Benchmark mode: the caller's audio is played straight back through the whole media path.
        self._echo: asyncio.Queue[bytes | None] | None = asyncio.Queue() if echo else None
        self._echo_task: asyncio.Task[None] | None = None
        self._closed = False
        # Set while the call is relayed to a person (warm transfer). The cascade has no model of its own
        # on the line (the manager holds replies), so its STT goes on: the transcript keeps both sides.
        self.muted = False
        # Turn timing (bridge/turnmarks.py): told when TTS audio first arrives and first leaves.
        self._milestone = on_milestone
        self._turn_note = on_turn_note

    async def start(self) -> None:
        if self._echo is not None:
            self._echo_task = asyncio.create_task(self._run_echo(self._echo))
        if self.stt is not None:
            await self.stt.start()

    async def _run_echo(self, queue: asyncio.Queue[bytes | None]) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            while (chunk := await queue.get()) is not None:
                yield chunk

        while not self._closed:
            await self.bridge.play(chunks(), self.pipeline_rate, barge_in=False)

    # ---- MediaListener
    def on_pipeline_audio(self, pcm: bytes) -> None:
        if self._echo is not None:
            self._echo.put_nowait(pcm)
        if self.stt is not None:
            self.stt.feed(pcm)

    def on_wire_audio(self, payload: bytes, format: AudioFormat) -> None:
        # engines that take the carrier's codec (OpenAI Realtime with g711) skip decode/resample
        if self.stt is not None and self.stt.wants_wire:
            self.stt.feed_wire(payload)

    def on_dtmf(self, digit: str) -> None:
        self._emit(CallEvent(EventType.DTMF, call_id=self.call_id, digits=digit))

    def mark(self, milestone: str, ago: float = 0.0) -> None:
        """A turn milestone (bridge/turnmarks.py) reached now (or `ago` seconds ago), for turn timing."""
        if self._milestone is not None:
            self._milestone(milestone, ago)

    def note_turn(self, *, mode: str | None = None, interrupted: bool = False) -> None:
        """Tell the turn record what drove the turn, or that the caller cut the answer off."""
        if self._turn_note is not None:
            self._turn_note(mode=mode, interrupted=interrupted)

    def on_speech_ended(self, ago: float) -> None:
        # The local VAD heard the caller fall silent; an engine that reports it itself is preferred.
        if self.stt is None or not self.stt.reports_speech_end:
            self.mark("speechEnd", ago)

    def on_first_audio(self, label: str | None) -> None:
        if self._milestone is not None and label != "dtmf":
            self._milestone("firstAudioOut")

    def on_speech_started(self) -> None:
        return None  # the bridge already barged in; nothing else to do here

    def _on_stt(self, event: SttEvent) -> None:
        if event.kind == "speech_started":
            self.bridge.on_speech_started()
        elif event.kind == "speech_ended":
            self.mark("speechEnd", event.ago_s)
        elif event.kind == "error":
            log.warning("call %s: speech recognition error: %s", self.call_id, event.text)
            # engines report "error" only once their session gave up (after their own reconnects)
            self._emit(CallEvent(EventType.ERROR, call_id=self.call_id, error=f"stt lost: {event.text}",
                                 retryable=True))
        elif event.kind in ("partial", "final") and event.text.strip():
            self._emit(CallEvent(EventType.SPEECH, call_id=self.call_id, transcript=event.text.strip(),
                                 is_final=event.kind == "final"))

    # ---- speaking
    async def say(self, text: str) -> Spoken:
        counter = _ByteCounter(self.tts.synthesize(text), self._milestone)
        result = await self.bridge.play(counter, self.tts.sample_rate, label=None)
        synthesized_ms = counter.bytes / 2 / self.tts.sample_rate * 1000
        heard = heard_text(text, result, total_ms=synthesized_ms or None)
        return Spoken(text, heard, result.interrupted, result.heard_ms, synthesized_ms)

    def interrupt(self) -> None:
        self.bridge.interrupt("manager")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._echo is not None:
            self._echo.put_nowait(None)
        if self._echo_task is not None:
            self._echo_task.cancel()
        if self.stt is not None:
            await self.stt.close()
        await self.bridge.close()


class _ByteCounter:
    """Counts the PCM bytes a TTS stream produced (to tell how much of an utterance was heard)."""

    def __init__(self, source: AsyncIterator[bytes], on_milestone: Callable[[str], None] | None = None) -> None:
        self._source = source
        self.bytes = 0
        self._on_milestone = on_milestone

    def __aiter__(self) -> _ByteCounter:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._source.__anext__()
        if not self.bytes and chunk and self._on_milestone is not None:
            self._on_milestone("ttsFirstByte")
        self.bytes += len(chunk)
        return chunk

    async def aclose(self) -> None:
        """The bridge closes the stream on barge-in: stop the engine (e.g. kill espeak-ng) too."""
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()
