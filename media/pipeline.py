"""MediaPipeline: one call's audio between the carrier leg and the local pipeline.

Inbound (sync, per frame, on the event loop):
    wire frame -> [reorder by sequence] -> G.711 decode -+-> in-band DTMF -> listener.on_dtmf
                                                         +-> VAD -> barge-in
                                                         +-> taps (machine detection)
                                                         +-> stream-resample to the pipeline rate
                                                             -> listener.on_pipeline_audio, recorder ch 0
    (DTMF and VAD sit before the resampler, on the wire audio itself.)
Outbound (`play`, serialized):
    PCM16 at the engine's rate -> stream-resample to the wire rate -> encode -> messages of exactly
    the transport's `send_ms` (20 ms frames on SIP, 40 ms on WebSocket streams by default; the
    last one padded to whole 20 ms frames only) -> the play's outbox, each message sent at its
    pacing turn by one timer for all calls (media/wheel.py; absolute schedule, ~`lead_ms` queued at
    the carrier) -> mark -> PlaybackResult with what the caller actually heard (in ms); recorder
    ch 1 gets what was played.
Barge-in (`interrupt`): no frame is sent after it returns, the carrier is told to `clear`, the
engine's stream is closed, queued plays are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from media import g711
from media.clock import Clock, RealClock, TimerHandle
from media.dtmf import DtmfDetector, dtmf_tones
from media.formats import FRAME_MS
from media.frames import Framer, Pacer
from media.jitter import ReorderBuffer
from media.levels import LevelTap
from media.recorder import CallRecorder
from media.resample import StreamResampler
from media.transport import CallerAudioTap, MediaListener, MediaTransport, outbound_ms, reports_dtmf
from media.vad import EnergyVad
from media.wheel import PacedOutbox, PacingWheel, shared_wheel

log = logging.getLogger(__name__)

# Seconds to wait for a mark beyond the audio's own play-out before trusting the clock instead.
MARK_GRACE_S = 2.0
# Same digit from in-band and out-of-band detection within this window is one key press.
DTMF_DEDUPE_S = 0.3
# The caller's audio at the pipeline rate (recorder, echo) comes in pieces this long: one filter
# call per piece instead of per 20 ms frame (see StreamResampler.hold_ms); barge-in VAD, DTMF and
# machine detection read the wire audio and never wait for it. A listener that acts on the audio as
# it comes (an STT fed pipeline-rate PCM, a realtime model) asks for every frame at once instead
# (`pipeline_audio_hold_ms = 0`): its end of speech must not wait for the piece to fill.
CALLER_RESAMPLE_HOLD_MS = 100
# Messages a play may queue beyond the carrier's lead before its producer waits (it is woken once
# the queue is down to the lead): the producer wakes once per this many messages, not per message.
QUEUE_SLACK = 4


@dataclass(frozen=True, slots=True)
class PlaybackResult:
    completed: bool
    interrupted: bool
    frames_sent: int  # media messages (of the transport's `send_ms` each, the last one maybe shorter)
    heard_ms: float
    label: str | None = None
    sent_ms: float = 0.0  # audio in those messages

    def heard_fraction(self) -> float:
        return 1.0 if self.completed else (self.heard_ms / self.sent_ms if self.sent_ms else 0.0)


def heard_text(text: str, result: PlaybackResult, *, total_ms: float | None = None) -> str:
    """The words of `text` the caller heard before a barge-in, estimated by time (for the transcript).

    `total_ms` is the utterance's full duration when known; by default the audio that was sent.
    """
    if result.completed:
        return text
    total = total_ms or result.sent_ms
    if total <= 0 or result.heard_ms <= 0:
        return ""
    words = text.split()
    keep = int(len(words) * min(1.0, result.heard_ms / total))
    return " ".join(words[:keep])


@dataclass(slots=True)
class MediaStats:
    frames_in: int = 0
    frames_out: int = 0
    late_frames: int = 0  # inbound: arrived after their turn; dropped
    lost_frames: int = 0  # inbound: sequence numbers never seen
    reordered_frames: int = 0
    underruns: int = 0  # outbound: the engine was slower than real time and the carrier ran dry
    interrupts: int = 0
    plays: int = 0
    dtmf_inband: int = 0
    dtmf_outofband: int = 0
    bad_frames: int = 0


@dataclass(slots=True)
class _Play:
    label: str | None
    barge_in: bool
    task: asyncio.Task[PlaybackResult] | None = None
    pacer: Pacer | None = None
    outbox: PacedOutbox | None = None
    stopped: bool = False
    marks: dict[str, asyncio.Future[None]] = field(default_factory=dict)


class MediaPipeline:
    def __init__(
        self,
        transport: MediaTransport,
        listener: MediaListener,
        *,
        pipeline_rate: int = 16000,
        recorder: CallRecorder | None = None,
        inband_dtmf: bool | None = None,
        vad_barge_in: bool = True,
        clock: Clock | None = None,
        lead_ms: int = 60,
        jitter_frames: int = 3,
        stall_timeout_s: float | None = 8.0,
        wheel: PacingWheel | None = None,
    ) -> None:
        self.transport = transport
        self.listener = listener
        self.wire = transport.format
        self.pipeline_rate = pipeline_rate
        self.recorder = recorder
        self.barge_in_enabled = True
        self.stats = MediaStats()
        self._clock: Clock = clock or RealClock()
        self._wheel = wheel  # default: the one every pipeline on this clock shares (made on the first play)
        self._send_ms = outbound_ms(transport)
        # Audio queued at the carrier ahead of play-out: 3 x 20 ms, or 2 x 40 ms (rounded up).
        self._lead = max(1, -(-lead_ms // self._send_ms))
        self._stall_timeout = stall_timeout_s
        self._reorder = ReorderBuffer(jitter_frames)
        self._behind_s = 0.0  # audio released by the reorder buffer after the frame being handled
        self._wire_cb = getattr(listener, "on_wire_audio", None)
        # A listener that takes only the wire payloads (a realtime model fed u-law as is) needs no
        # pipeline-rate copy: skip the resampler unless the recorder wants the caller's side.
        self._pipeline_in = bool(getattr(listener, "wants_pipeline_audio", True)) or recorder is not None
        # created only when used (the wire rate often is the listener's)
        self._in_resampler = StreamResampler(self.wire.rate, pipeline_rate, hold_ms=_hold_ms(listener)) \
            if self._pipeline_in else None
        self._rec_in = StreamResampler(pipeline_rate, recorder.rate) if recorder else None
        # DTMF and VAD listen to the decoded wire audio, ahead of the resampler: a soxr pair releases
        # its output in blocks (20-130 ms late at HQ), which would delay barge-in by as much.
        # None: on unless the leg reports key presses itself (the detector is ~18% of the media CPU)
        if inband_dtmf is None:
            inband_dtmf = not reports_dtmf(transport)
        self._dtmf = DtmfDetector(self.wire.rate) if inband_dtmf else None
        self._vad = EnergyVad() if vad_barge_in else None
        self._vad_buf = bytearray()
        self._vad_frame = self.wire.rate * FRAME_MS // 1000 * 2
        self._taps: list[CallerAudioTap] = []
        self._last_dtmf: tuple[str, str, float] | None = None  # (digit, source, time)
        self._play_lock = asyncio.Lock()
        self._generation = 0  # bumped by interrupt(): plays queued before it are dropped
        self._current: _Play | None = None
        self._mark_ids = itertools.count(1)
        self._closed = False
        self._bg: set[asyncio.Task[None]] = set()
        self._level_taps: list[LevelTap] = []  # only while someone watches the call's levels
        self._first_audio_cb = getattr(listener, "on_first_audio", None)
        # told when the caller fell silent (seconds ago), for turn timing
        self._speech_end_cb = getattr(listener, "on_speech_ended", None)

    @property
    def closed(self) -> bool:
        return self._closed

    def add_level_tap(self, tap: LevelTap) -> None:
        self._level_taps.append(tap)

    def remove_level_tap(self, tap: LevelTap) -> None:
        if tap in self._level_taps:
            self._level_taps.remove(tap)

    # ------------------------------------------------------------------ inbound

    def receive(self, payload: bytes, sequence: int | None = None) -> None:
        """One inbound wire frame (any size the carrier sends; 20 ms is typical)."""
        if self._closed:
            return
        if sequence is None:
            self._inbound(payload)
            return
        before_late, before_skip = self._reorder.late, self._reorder.skipped
        released = self._reorder.push(sequence, payload)
        for i, p in enumerate(released):
            # a burst (the start of a stream, a gap filled): the frames after p arrived before now
            self._behind_s = sum(map(self.wire.ms_of, released[i + 1:])) / 1000 if i + 1 < len(released) else 0.0
            self._inbound(p)
        self.stats.late_frames += self._reorder.late - before_late
        self.stats.lost_frames += self._reorder.skipped - before_skip
        self.stats.reordered_frames = self._reorder.reordered

    def _inbound(self, payload: bytes) -> None:
        self.stats.frames_in += 1
        if self._wire_cb is not None:
            self._wire_cb(payload, self.wire)
        try:
            wire_pcm = g711.decode(payload, self.wire.encoding)
        except ValueError:
            self.stats.bad_frames += 1
            return
        for tap in self._taps:
            tap(wire_pcm, self.wire.rate)
        for level in self._level_taps:
            level.caller(wire_pcm)
        if self._dtmf is not None:
            for digit in self._dtmf.process(wire_pcm):
                self._dtmf_event(digit, "inband")
        if self._vad is not None:
            self._vad_buf += wire_pcm
            fb = self._vad_frame
            while len(self._vad_buf) >= fb:
                frame = bytes(self._vad_buf[:fb])
                del self._vad_buf[:fb]
                if self._vad.process(frame) and self._barge_in_allowed():
                    self.listener.on_speech_started()
                    self.interrupt("vad")
                if self._vad.ended and self._speech_end_cb is not None:
                    self._speech_end_cb(self._vad.hangover_s)
        if self._in_resampler is None:
            return
        pcm = self._in_resampler.process(wire_pcm)
        if pcm:
            self.listener.on_pipeline_audio(pcm)
            self._record_caller(pcm)

    def _record_caller(self, pcm: bytes) -> None:
        if self.recorder is None or self._rec_in is None or self._in_resampler is None:
            return
        out = self._rec_in.process(pcm)
        if out:
            # Where this audio sits in time: the newest input arrived now, `_behind_s` of it after
            # this frame; the resamplers still hold `pending_s`, and `out` ends where theirs ends.
            held = self._in_resampler.pending_s + self._rec_in.pending_s + self._behind_s
            at = self._clock.monotonic() - held - len(out) / 2 / self.recorder.rate
            self.recorder.write_caller(out, at=at)

    def add_tap(self, tap: CallerAudioTap) -> None:
        """Also give the caller's decoded wire audio, in order, to `tap` (e.g. machine detection)."""
        self._taps.append(tap)

    def remove_tap(self, tap: CallerAudioTap) -> None:
        if tap in self._taps:
            self._taps.remove(tap)

    def on_dtmf(self, digit: str) -> None:
        """A DTMF digit the carrier reported out of band."""
        self._dtmf_event(digit, "carrier")

    def _dtmf_event(self, digit: str, source: str) -> None:
        now = self._clock.monotonic()
        last = self._last_dtmf
        self._last_dtmf = (digit, source, now)
        if last and last[0] == digit and last[1] != source and now - last[2] < DTMF_DEDUPE_S:
            return
        if source == "inband":
            self.stats.dtmf_inband += 1
        else:
            self.stats.dtmf_outofband += 1
        self.listener.on_dtmf(digit)

    def on_speech_started(self) -> None:
        """The STT engine heard the caller start speaking."""
        if self._barge_in_allowed():
            self.interrupt("speech")

    def on_mark(self, name: str) -> None:
        play = self._current
        if play is not None:
            fut = play.marks.get(name)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _barge_in_allowed(self) -> bool:
        play = self._current
        return self.barge_in_enabled and play is not None and play.barge_in and not play.stopped

    # ------------------------------------------------------------------ outbound

    @property
    def playing(self) -> bool:
        return self._current is not None and not self._current.stopped

    async def play(
        self,
        audio: AsyncIterable[bytes],
        rate: int,
        *,
        label: str | None = None,
        barge_in: bool = True,
    ) -> PlaybackResult:
        """Play PCM16 mono chunks at `rate`; returns once the caller heard it all, or it was cut."""
        generation = self._generation
        async with self._play_lock:
            if self._closed or generation != self._generation:
                await _aclose(audio)
                return PlaybackResult(False, True, 0, 0.0, label)
            play = _Play(label=label, barge_in=barge_in)
            self._current = play
            play.task = asyncio.ensure_future(self._run_play(play, audio, rate))
            try:
                return await asyncio.shield(play.task)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    # Our caller gave up on this play: stop it like a barge-in, then honour the cancel.
                    self.interrupt("cancelled")
                    with contextlib.suppress(asyncio.CancelledError):
                        await play.task
                    raise
                return self._result(play, completed=False)
            finally:
                self._current = None
                self.stats.plays += 1
                if play.pacer is not None:
                    self.stats.underruns += play.pacer.underruns

    def _result(self, play: _Play, *, completed: bool) -> PlaybackResult:
        pacer = play.pacer
        if pacer is None:
            return PlaybackResult(completed, not completed, 0, 0.0, play.label)
        heard = pacer.sent_ms if completed else pacer.played_ms(self._clock.monotonic())
        return PlaybackResult(completed, not completed, pacer.sent, heard, play.label, pacer.sent_ms)

    async def _run_play(self, play: _Play, audio: AsyncIterable[bytes], rate: int) -> PlaybackResult:
        wire = self.wire
        resampler = StreamResampler(rate, wire.rate)
        framer = Framer(wire.bytes_for_ms(self._send_ms), wire.silence_byte, pad_to=wire.frame_bytes)
        pacer = play.pacer = Pacer(self._clock.monotonic, self._clock.sleep, lead_frames=self._lead,
                                   frame_ms=self._send_ms)
        rec = StreamResampler(wire.rate, self.recorder.rate) if self.recorder else None
        if self._wheel is None:
            self._wheel = shared_wheel(self._clock)
        outbox = play.outbox = PacedOutbox(
            pacer, self._wheel, self._clock, self._send_media, lambda frame: self._sent(play, pacer, frame, rec),
            high=self._lead + QUEUE_SLACK, low=self._lead, send_now=self._send_media_now)
        try:
            try:
                async for chunk in _with_stall_timeout(audio, self._stall_timeout, self._clock):
                    if play.stopped:
                        break
                    if chunk:
                        for frame in framer.push(g711.encode(resampler.process(chunk), wire.encoding)):
                            if outbox.put(frame):
                                await outbox.room()
                    if play.stopped:
                        break
            except Exception:
                # The engine failed: what it gave before is sent first, as if sent while it worked.
                await outbox.drained()
                raise
            if not play.stopped:
                tail = framer.push(g711.encode(resampler.flush(), wire.encoding))
                last = framer.flush()
                for frame in tail + ([last] if last else []):
                    if outbox.put(frame):
                        await outbox.room()
            await outbox.drained()
        finally:
            outbox.stop()
            await _aclose(audio)
        if rec is not None and self.recorder is not None and pacer.t0 is not None:
            at = pacer.play_start(0) + rec.samples_out / rec.out_rate
            self.recorder.write_bridge(rec.flush(), at=at)
        if play.stopped:
            return self._result(play, completed=False)
        await self._await_played(play, pacer)
        return self._result(play, completed=not play.stopped)

    def _send_media(self, frame: bytes) -> Coroutine[Any, Any, None]:
        return self.transport.send_media(frame)  # the transport as it is now (a stream may be replaced)

    def _send_media_now(self, frame: bytes) -> bool:
        send_now = getattr(self.transport, "send_media_now", None)
        return send_now is not None and bool(send_now(frame))

    def _sent(self, play: _Play, pacer: Pacer, frame: bytes, rec: StreamResampler | None) -> None:
        """A message went out (the outbox sends it at its pacing turn): the play's accounting."""
        if pacer.sent == 0 and self._first_audio_cb is not None:
            self._first_audio_cb(play.label)
        pacer.sent_one(self.wire.ms_of(frame))
        self.stats.frames_out += 1
        if self._level_taps:
            pcm = g711.decode(frame, self.wire.encoding)
            for tap in self._level_taps:
                tap.bot(pcm)
        if self.recorder is not None and rec is not None:
            before = rec.samples_out
            out = rec.process(g711.decode(frame, self.wire.encoding))
            if out:  # placed by sample count from the first frame's play-out, not by when soxr let go
                self.recorder.write_bridge(out, at=pacer.play_start(0) + before / rec.out_rate)

    async def _await_played(self, play: _Play, pacer: Pacer) -> None:
        end = pacer.end_time
        if end is None:
            return
        remaining = max(0.0, end - self._clock.monotonic())
        if self.transport.supports_marks:
            name = f"{play.label or 'play'}-{next(self._mark_ids)}"
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            play.marks[name] = fut
            await self.transport.send_mark(name)
            try:
                await self._clock.wait_for(fut, remaining + MARK_GRACE_S)
                return
            except TimeoutError:
                log.warning("mark %s not echoed; trusting the pacing clock", name)
        remaining = max(0.0, end - self._clock.monotonic())
        if remaining > 0:
            await self._clock.sleep(remaining)

    def set_listener(self, listener: MediaListener) -> None:
        """Swap the listener; the caller's pipeline-rate path follows what the new one wants."""
        self.listener = listener
        self._wire_cb = getattr(listener, "on_wire_audio", None)
        self._pipeline_in = bool(getattr(listener, "wants_pipeline_audio", True)) or self.recorder is not None
        if self._pipeline_in and self._in_resampler is None:
            self._in_resampler = StreamResampler(self.wire.rate, self.pipeline_rate, hold_ms=_hold_ms(listener))
        elif self._in_resampler is not None:
            self._in_resampler.set_hold_ms(_hold_ms(listener))

    def interrupt(self, reason: str = "barge-in") -> None:
        """Stop the current play at once (no frame is sent after this returns), clear the
        carrier's buffer, and drop queued plays."""
        self._generation += 1
        play = self._current
        if play is None or play.stopped:
            return
        play.stopped = True
        if play.outbox is not None:
            play.outbox.stop()  # what is queued is dropped at once
        self.stats.interrupts += 1
        log.debug("playback interrupted (%s) after %d frames", reason, play.pacer.sent if play.pacer else 0)
        for fut in play.marks.values():
            if not fut.done():
                fut.cancel()
        if play.task is not None:
            play.task.cancel()
        self._spawn(self.transport.send_clear())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def send_dtmf(self, digits: str, *, tone_ms: int = 100, gap_ms: int = 60) -> PlaybackResult:
        """Send `digits` as in-band tones (the only way over Twilio/Telnyx/Plivo media streams)."""
        pcm = dtmf_tones(digits, self.wire.rate, tone_ms, gap_ms)
        return await self.play(_once(pcm), self.wire.rate, label="dtmf", barge_in=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._generation += 1
        play = self._current
        if play is not None and not play.stopped:
            play.stopped = True
            if play.outbox is not None:
                play.outbox.stop()
            if play.task is not None:
                play.task.cancel()
        self._closed = True
        for p in self._reorder.drain():
            self._inbound(p)
        tail = self._in_resampler.flush() if self._in_resampler is not None else b""
        if tail:
            self.listener.on_pipeline_audio(tail)
            if self.recorder is not None and self._rec_in is not None:
                self.recorder.write_caller(self._rec_in.process(tail) + self._rec_in.flush())
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
        if self.recorder is not None:
            await self.recorder.close()


async def _with_stall_timeout(audio: AsyncIterable[bytes], timeout: float | None, clock: Clock) -> AsyncIterator[bytes]:
    """The engine's chunks; TimeoutError if it produces nothing for `timeout` seconds (on `clock`).

    The chunks are awaited in the play's own task, watched by one timer per play (`_StallWatch`),
    not through a `wait_for` per chunk: that made a task per chunk and cost two extra loop turns
    between the engine's bytes and the caller's first frame (each a full turn of a loop busy with
    every other call's media)."""
    if timeout is None:
        async for chunk in audio:
            yield chunk
        return
    task = asyncio.current_task()
    assert task is not None
    watch = _StallWatch(clock, timeout, task)
    it = aiter(audio)
    try:
        while True:
            watch.waiting()
            try:
                chunk = await anext(it)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if watch.expired and task.cancelling() <= 1:  # our own cancel, nobody else's
                    task.uncancel()
                    raise TimeoutError(f"the speech engine produced no audio for {timeout:.1f} s") from None
                raise
            finally:
                watch.got_one()
            yield chunk
    finally:
        watch.close()


class _StallWatch:
    """Cancels `task` once it has waited `timeout` seconds for one chunk; re-armed lazily, so a
    chunk costs two assignments, not a timer."""

    def __init__(self, clock: Clock, timeout: float, task: asyncio.Task[Any]) -> None:
        self._clock = clock
        self._timeout = timeout
        self._task = task
        self._deadline: float | None = None
        self._timer: TimerHandle | None = None
        self.expired = False

    def waiting(self) -> None:
        self._deadline = self._clock.monotonic() + self._timeout
        if self._timer is None:
            self._timer = self._clock.call_later(self._timeout, self._check)

    def got_one(self) -> None:
        self._deadline = None

    def _check(self) -> None:
        self._timer = None
        if self._deadline is None:
            return  # not waiting now: armed again when it waits next
        left = self._deadline - self._clock.monotonic()
        if left > 0:
            self._timer = self._clock.call_later(left, self._check)
            return
        self.expired = True
        self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _aclose(audio: AsyncIterable[bytes]) -> None:
    aclose = getattr(audio, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def _hold_ms(listener: MediaListener) -> int:
    """How long the caller's pipeline-rate audio is held for this listener (see CALLER_RESAMPLE_HOLD_MS)."""
    hold = getattr(listener, "pipeline_audio_hold_ms", None)
    return CALLER_RESAMPLE_HOLD_MS if hold is None else int(hold)
