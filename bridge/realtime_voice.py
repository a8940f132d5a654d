"""RealtimeVoice: a call's voice in speech-to-speech mode, a drop-in for CallVoice.

The caller's audio goes to the realtime model (raw wire payloads when the session takes the
carrier's G.711, else pipeline PCM resampled to the model's rate); each assistant audio item the
model streams back plays through the call's MediaPipeline as one play (pacing, marks, recording,
heard-ms accounting as for TTS). When the caller talks over it (the provider's speech-started or
`interrupted`, or the bridge's own VAD), the bridge clears the carrier's buffer and the model is
told how much was actually heard (`conversation.item.truncate` with `audio_end_ms` on OpenAI;
Gemini truncates by itself). Transcripts of both sides go to the call record as SPEECH / SPEAKING
events.

`say(text)` (the greeting, the agent's `speak` and `continue`) asks the model to speak the text
word for word as its own response, so the caller hears one voice and the model's context holds
what was said. When the session is not up (or has failed) it falls back to the TTS engine.

A session that fails for good mid-call (reconnects exhausted, or auth refused) is recorded on the
call (`metadata.realtimeFailure`, a `call.error` event), the caller hears a short apology through
TTS, and the bridge hangs up: the line never just goes silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.calls import CallEvent, CallRecord, EventType
from bridge.realtime import events as ev
from bridge.voice import Spoken
from media.clock import Clock, RealClock, TimerHandle
from media.pipeline import MediaPipeline, PlaybackResult, heard_text
from media.resample import StreamResampler

if TYPE_CHECKING:
    from bridge.realtime.connection import RealtimeConnection
    from media.formats import AudioFormat
    from media.recorder import CallRecorder
    from media.transport import MediaTransport
    from media.tts.base import TtsEngine

log = logging.getLogger(__name__)

ToolRunner = Callable[[str, str, str], Awaitable[str]]
APOLOGY = "I'm sorry, I'm having technical trouble and have to end the call. Please try again later."
SAY_TIMEOUT_S = 30.0
# Legs that stop sending while the caller is silent (the mock, RTP with silence suppression)
# would stall the model's server VAD, which only hears time pass through audio: fill such gaps.
GAP_FILL_S = 0.1


@dataclass(eq=False)
class _Item:
    """One assistant audio item being played."""

    item_id: str
    response_id: str
    tag: str | None
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    audio_ms: float = 0.0
    ended: bool = False
    result: PlaybackResult | None = None
    task: asyncio.Task[None] | None = None


class RealtimeVoice:
    def __init__(
        self,
        *,
        call: CallRecord,
        transport: MediaTransport,
        connection: RealtimeConnection,
        tts: TtsEngine,
        emit: Callable[[CallEvent], None],
        pipeline_rate: int,
        recorder: CallRecorder | None = None,
        barge_in: bool = True,
        inband_dtmf: bool | None = None,  # None: off where the leg reports DTMF (media.pipeline)
        on_tool_call: ToolRunner | None = None,
        hang_up: Callable[[], Awaitable[Any]] | None = None,
        ready_timeout_s: float = 10.0,
        apology: str = APOLOGY,
        clock: Clock | None = None,
        input_chunk_ms: int = 40,
        on_milestone: Callable[..., None] | None = None,
        on_turn_note: Callable[..., None] | None = None,
    ) -> None:
        self.call = call
        self.call_id = call.callId
        # The caller talks to a person through the bridge's relay (a warm transfer): the model neither
        # hears the line nor speaks on it any more.
        self.muted = False
        self.tts = tts
        self.connection = connection
        self.protocol = connection.protocol
        self._emit = emit
        self._on_tool_call = on_tool_call
        self._hang_up = hang_up
        self._ready_timeout = ready_timeout_s
        self.apology = apology
        self.pipeline_rate = pipeline_rate
        self.connection.send(self.protocol.set_wire(transport.format))
        self._passthrough = self.protocol.wire_passthrough
        self.wants_pipeline_audio = not self._passthrough  # read by the MediaPipeline
        self.pipeline_audio_hold_ms = 0  # the model hears each frame as it comes (its own turn detection)
        self.bridge = MediaPipeline(transport, self, pipeline_rate=pipeline_rate, recorder=recorder,
                                  inband_dtmf=inband_dtmf, vad_barge_in=barge_in)
        self._resampler = None if self._passthrough else StreamResampler(pipeline_rate, self.protocol.input_rate)
        self._clock: Clock = clock or RealClock()
        self._last_in = self._clock.monotonic()
        self._gap_timer: TimerHandle | None = None
        if self._passthrough:
            n = int(transport.format.rate * GAP_FILL_S) * transport.format.bytes_per_sample
            self._gap_silence = bytes([transport.format.silence_byte]) * n
            bytes_per_ms = transport.format.rate * transport.format.bytes_per_sample / 1000
        else:
            self._gap_silence = bytes(int(self.protocol.input_rate * GAP_FILL_S) * 2)
            bytes_per_ms = self.protocol.input_rate * 2 / 1000
        # The caller's audio goes up in chunks of `input_chunk_ms`: each message to the model costs
        # ~0.1 ms of CPU (JSON, base64, a masked WebSocket frame, a syscall), so 40 ms chunks halve
        # what 20 ms frames would cost, for 20 ms more before the model hears the caller.
        self._in_buf = bytearray()
        self._in_chunk = max(1, int(input_chunk_ms * bytes_per_ms))
        self._in_bytes_per_ms = bytes_per_ms
        # turn timing (bridge/turnmarks.py): how much caller audio this session's model has had, to date
        # its `audio_end_ms`; counted again from 0 when a reconnect opens a new session
        self._milestone = on_milestone
        self._turn_note = on_turn_note
        self._sent_ms = 0.0
        self._sent_link = 0
        self._marked_responses: set[str] = set()
        self._items: dict[str, _Item] = {}
        self._cut: set[str] = set()  # items the caller talked over: their late audio is dropped
        self._responses: dict[str, str | None] = {}  # response id -> say tag
        self._done_responses: set[str] = set()
        self._bot_text: dict[str, str] = {}
        self._bot_done: dict[str, tuple[PlaybackResult, float]] = {}
        self._tags_with_audio: set[str] = set()
        self._said_items: set[str] = set()
        self._says: dict[str, tuple[str, asyncio.Future[Spoken]]] = {}
        self._provider_barge = False
        self._barge_in = barge_in
        self._ending: set[str] | None = None  # end_call: hang up after a response newer than these
        self._ended = False
        self._with_audio: set[str] = set()  # responses that produced audio
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.truncations: list[tuple[str, int]] = []
        connection.on_failed = self._on_failed
        connection.listen(self._on_event)
        if connection.failed:  # a pre-warmed session that failed while the call rang
            self._on_failed(connection.failed)

    async def start(self) -> None:
        self.connection.start()
        self._gap_timer = self._clock.call_later(GAP_FILL_S, self._fill_gap)
        if not await self.connection.wait_ready(self._ready_timeout) and not self.connection.failed:
            log.warning("call %s: realtime session not ready after %.0f s", self.call_id, self._ready_timeout)

    # ---- MediaListener
    def on_pipeline_audio(self, pcm: bytes) -> None:
        if self._resampler is not None:
            self._last_in = self._clock.monotonic()
            self._send_in(self._resampler.process(pcm))

    def on_wire_audio(self, payload: bytes, format: AudioFormat) -> None:
        if self._passthrough:
            self._last_in = self._clock.monotonic()
            self._send_in(payload)

    def _send_in(self, audio: bytes) -> None:
        if self.muted:
            return
        self._in_buf += audio
        if len(self._in_buf) >= self._in_chunk:
            self._send_audio(bytes(self._in_buf))
            self._in_buf.clear()

    def _send_audio(self, audio: bytes) -> None:
        if self.connection.connects != self._sent_link:
            self._sent_link, self._sent_ms = self.connection.connects, 0.0
        self._sent_ms += len(audio) / self._in_bytes_per_ms
        self.connection.send_audio(audio)

    # ---- turn timing
    def mark(self, milestone: str, ago: float = 0.0) -> None:
        if self._milestone is not None:
            self._milestone(milestone, ago)

    def note_turn(self, *, mode: str | None = None, interrupted: bool = False) -> None:
        if self._turn_note is not None:
            self._turn_note(mode=mode, interrupted=interrupted)

    def on_first_audio(self, label: str | None) -> None:
        if label != "dtmf":
            self.mark("firstAudioOut")

    def on_speech_ended(self, ago: float) -> None:
        # the bridge's VAD: the caller's end of speech when the provider does not report it (Gemini)
        if not getattr(self.protocol, "reports_speech_end", False):
            self.mark("speechEnd", ago)
            self.note_turn(mode="realtime")

    def _speech_stopped(self, audio_end_ms: int | None) -> None:
        """The model's VAD ended the caller's turn: the speech ended `audio_end_ms` into the audio it
        had (dated back from what was sent since), and the bridge learns it now (the `stt` part)."""
        ago = 0.0
        if audio_end_ms is not None and self.connection.connects == self._sent_link:
            ago = max(0.0, (self._sent_ms - audio_end_ms) / 1000)
        self.mark("speechEnd", ago)
        self.mark("sttFinal")
        self.note_turn(mode="realtime")

    def _fill_gap(self) -> None:
        if self._closed:
            return
        now = self._clock.monotonic()
        if now - self._last_in >= GAP_FILL_S and self.connection.ready.is_set() and not self.muted:
            if self._in_buf:
                self._send_audio(bytes(self._in_buf))
                self._in_buf.clear()
            self._send_audio(self._gap_silence)
            self._last_in = now
        self._gap_timer = self._clock.call_later(GAP_FILL_S, self._fill_gap)

    def on_dtmf(self, digit: str) -> None:
        self._emit(CallEvent(EventType.DTMF, call_id=self.call_id, digits=digit))
        # the model cannot hear a key press reliably (carriers report most out of band): tell it
        if self.connection.ready.is_set() and not self._closed:
            self.connection.send(self.protocol.user_text(f"[The caller pressed the {digit} key]"))

    def on_speech_started(self) -> None:
        return None  # the bridge cut its play; the item's end sends the truncate

    # ---- model events
    def _on_event(self, event: ev.RealtimeEvent) -> None:
        if isinstance(event, ev.AudioOut):
            self._audio(event)
        elif isinstance(event, ev.AudioDone):
            self._end_item(event.item_id)
        elif isinstance(event, ev.SpeechStopped):
            self._speech_stopped(event.audio_end_ms)
        elif isinstance(event, ev.SpeechStarted):
            self._provider_barge = True
            if self._barge_in:
                self.bridge.on_speech_started()
        elif isinstance(event, ev.ResponseStarted):
            self._provider_barge = False
            self._responses[event.response_id] = event.tag
        elif isinstance(event, ev.ResponseDone):
            self._done_responses.add(event.response_id)
            for item in list(self._items.values()):
                if item.response_id == event.response_id:
                    self._end_item(item.item_id)
            self._resolve_silent_say(event.response_id)
            if event.response_id not in self._with_audio:
                self._maybe_end(event.response_id)
        elif isinstance(event, ev.UserTranscript):
            if event.text.strip():
                self._emit(CallEvent(EventType.SPEECH, call_id=self.call_id, transcript=event.text.strip(),
                                     is_final=event.final))
        elif isinstance(event, ev.BotTranscript):
            if event.item_id not in self._said_items:
                self._bot_text[event.item_id] = event.text
                self._record_bot(event.item_id)
        elif isinstance(event, ev.ToolCall):
            self._spawn(self._run_tool(event))
        elif isinstance(event, ev.ToolCancelled):
            log.info("call %s: model cancelled tool calls %s", self.call_id, ", ".join(event.call_ids))
        elif isinstance(event, ev.LinkLost):
            for item in list(self._items.values()):
                self._end_item(item.item_id)
        elif isinstance(event, ev.ProviderError):
            log.warning("call %s: realtime provider error: %s", self.call_id, event.message)

    def _audio(self, event: ev.AudioOut) -> None:
        if event.item_id in self._cut or self._closed or self.muted:
            return
        item = self._items.get(event.item_id)
        if item is None:
            item = _Item(event.item_id, event.response_id, self._responses.get(event.response_id))
            if item.tag is not None:
                self._tags_with_audio.add(item.tag)
            self._with_audio.add(event.response_id)
            self._items[event.item_id] = item
            item.task = self._spawn(self._play(item))
        if event.response_id not in self._marked_responses:  # the model's first audio of this answer
            self._marked_responses.add(event.response_id)
            self.mark("modelFirstToken")
            self.mark("ttsFirstByte")
        pcm = self.protocol.decode_output(event.audio)
        item.audio_ms += len(pcm) / 2 / self.protocol.output_rate * 1000
        item.queue.put_nowait(pcm)

    def _end_item(self, item_id: str) -> None:
        item = self._items.get(item_id)
        if item is not None and not item.ended:
            item.ended = True
            item.queue.put_nowait(None)

    async def _play(self, item: _Item) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            while (chunk := await item.queue.get()) is not None:
                yield chunk

        try:
            result = await self.bridge.play(chunks(), self.protocol.output_rate, label="model")
        except Exception as exc:  # noqa: BLE001 - a stalled model must not kill the call's voice
            log.warning("call %s: model audio play failed: %s", self.call_id, exc)
            result = PlaybackResult(False, True, 0, 0.0, "model")
        item.result = result
        self._items.pop(item.item_id, None)
        if result.interrupted:
            if item.tag is None:  # an answer, not the agent's words
                self.note_turn(interrupted=True)
            self._cut.add(item.item_id)
            heard = int(result.heard_ms)
            self.truncations.append((item.item_id, heard))
            self.connection.send(self.protocol.truncate(item.item_id, heard))
            if not self._provider_barge and item.response_id not in self._done_responses:
                self.connection.send(self.protocol.cancel())  # our own VAD cut it; the model keeps going otherwise
        if item.tag is not None:
            self._resolve_say(item.tag, result, item.audio_ms)
            self._said_items.add(item.item_id)  # the manager records the requested text itself
            self._bot_text.pop(item.item_id, None)
        else:
            self._bot_done[item.item_id] = (result, item.audio_ms)
            self._record_bot(item.item_id)
        self._maybe_end(item.response_id)

    def _record_bot(self, item_id: str) -> None:
        """The model's words as the caller heard them, once both the play and the transcript are in."""
        done = self._bot_done.get(item_id)
        text = self._bot_text.get(item_id)
        if done is None or text is None:
            return
        del self._bot_done[item_id], self._bot_text[item_id]
        result, total_ms = done
        heard = heard_text(text, result, total_ms=total_ms or None)
        if heard:
            self._emit(CallEvent(EventType.SPEAKING, call_id=self.call_id, text=heard))

    # ---- ending the call from a tool
    def end_after_reply(self, grace_s: float = 10.0) -> None:
        """Hang up once the model's next reply (its goodbye) has played, or after `grace_s`."""
        if self._ending is None:
            self._ending = set(self._responses)
            asyncio.get_running_loop().call_later(grace_s, self._end_now)

    def _maybe_end(self, response_id: str) -> None:
        if self._ending is not None and response_id not in self._ending:
            self._end_now()

    def _end_now(self) -> None:
        if not self._ended and not self._closed and self._hang_up is not None:
            self._ended = True
            self._spawn(self._hang_up())

    # ---- tools
    async def _run_tool(self, call: ev.ToolCall) -> None:
        log.info("call %s: tool call %s", self.call_id, call.name)
        if self._on_tool_call is None:
            output = json.dumps({"error": f"no tool named {call.name}"})
        else:
            try:
                output = await self._on_tool_call(call.call_id, call.name, call.arguments)
            except Exception as exc:  # noqa: BLE001 - the model hears the failure; the call goes on
                output = json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]})
        if not self._closed:
            self.connection.send(self.protocol.tool_result(call.call_id, call.name, output))

    # ---- speaking
    async def say(self, text: str) -> Spoken:
        if self.connection.failed or self._closed or not self.connection.ready.is_set():
            if not self.connection.failed and not self._closed:
                await self.connection.wait_ready(self._ready_timeout)
            if not self.connection.ready.is_set() or self.connection.failed:
                return await self._say_tts(text)
        tag = uuid.uuid4().hex[:12]
        future: asyncio.Future[Spoken] = asyncio.get_running_loop().create_future()
        self._says[tag] = (text, future)
        self.connection.send(self.protocol.say(text, tag))
        try:
            return await asyncio.wait_for(asyncio.shield(future), SAY_TIMEOUT_S)
        except TimeoutError:
            log.warning("call %s: the model did not speak the requested text", self.call_id)
            return Spoken(text, "", True, 0.0, 0.0)
        finally:
            self._says.pop(tag, None)

    def _resolve_say(self, tag: str, result: PlaybackResult, audio_ms: float) -> None:
        entry = self._says.get(tag)
        if entry is None or entry[1].done():
            return
        text, future = entry
        heard = heard_text(text, result, total_ms=audio_ms or None)
        future.set_result(Spoken(text, heard, result.interrupted, result.heard_ms, audio_ms))

    def _resolve_silent_say(self, response_id: str) -> None:
        """A response for a `say` that ended without any audio (failed, or cancelled before any)."""
        tag = self._responses.get(response_id)
        entry = self._says.get(tag) if tag is not None else None
        if tag is not None and entry is not None and tag not in self._tags_with_audio and not entry[1].done():
            entry[1].set_result(Spoken(entry[0], "", True, 0.0, 0.0))

    async def _say_tts(self, text: str) -> Spoken:
        produced = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal produced
            async for chunk in self.tts.synthesize(text):
                produced += len(chunk)
                yield chunk

        result = await self.bridge.play(counted(), self.tts.sample_rate, label="tts")
        total = produced / 2 / self.tts.sample_rate * 1000
        return Spoken(text, heard_text(text, result, total_ms=total or None), result.interrupted, result.heard_ms, total)

    def interrupt(self) -> None:
        self.bridge.interrupt("manager")

    # ---- failure and shutdown
    def _on_failed(self, reason: str) -> None:
        self._spawn(self._fail(reason))

    async def _fail(self, reason: str) -> None:
        self.call.metadata["realtimeFailure"] = reason
        self._emit(CallEvent(EventType.ERROR, call_id=self.call_id, error=f"realtime: {reason}", retryable=True))
        for item in list(self._items.values()):
            self._end_item(item.item_id)
        for text, future in list(self._says.values()):
            if not future.done():
                future.set_result(Spoken(text, "", True, 0.0, 0.0))
        if self._closed:
            return
        try:
            await self._say_tts(self.apology)
        except Exception as exc:  # noqa: BLE001 - hang up all the same
            log.warning("call %s: apology not played: %s", self.call_id, exc)
        if self._hang_up is not None and not self._closed:
            await self._hang_up()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("call %s: realtime voice task failed: %s", self.call_id, task.exception())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gap_timer is not None:
            self._gap_timer.cancel()
        for text, future in list(self._says.values()):
            if not future.done():
                future.set_result(Spoken(text, "", True, 0.0, 0.0))
        for item in list(self._items.values()):
            self._end_item(item.item_id)
        await self.connection.close()
        await self.bridge.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        for task in list(self._tasks):
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

