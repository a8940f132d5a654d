"""Speak text pieces as they arrive: each piece goes to TTS at once (the next one synthesizes while
the current one plays), and all their audio plays gap-free, in order, through ONE MediaPipeline.play.
Engines that take text incrementally (ElevenLabs stream-input) get every piece into one session.

A barge-in stops the play; the bridge then closes our audio stream, which cancels the syntheses
and the text source (and so the model's HTTP stream). What the caller heard is worked out over the
concatenated pieces: whole pieces up to the cut, then the heard share of the cut piece's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from media.pipeline import MediaPipeline, PlaybackResult, heard_text
from media.tts.base import TextStream, TtsEngine, TtsError

log = logging.getLogger(__name__)

_END = object()


@dataclass(slots=True)
class _Piece:
    text: str
    audio: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    played_bytes: int = 0
    finished: bool = False  # all of its audio went to the player
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class StreamedSpeech:
    text: str  # everything that was queued to be said
    heard_text: str
    interrupted: bool
    heard_ms: float
    pieces: int
    error: BaseException | None = None  # the text source or TTS failed (what was ready still played)


@dataclass(slots=True)
class SpeechMarks:
    """Callbacks for the turn's latency record (monotonic seconds)."""

    on_piece: Callable[[str], None] = lambda text: None
    on_tts_first_byte: Callable[[], None] = lambda: None
    on_first_audio: Callable[[], None] = lambda: None


async def speak_stream(bridge: MediaPipeline, tts: TtsEngine, pieces: AsyncIterator[str],
                       marks: SpeechMarks | None = None, *, synth_ahead: int = 2) -> StreamedSpeech:
    marks = marks or SpeechMarks()
    text_stream = tts.open_text_stream()
    if text_stream is not None:
        return await _speak_incremental(bridge, tts, text_stream, pieces, marks)
    queue: asyncio.Queue[object] = asyncio.Queue()  # _Piece, then _END or the source's exception
    order: list[_Piece] = []
    errors: list[BaseException] = []
    slots = asyncio.Semaphore(synth_ahead)
    first_byte = True

    async def synthesize(piece: _Piece) -> None:
        nonlocal first_byte
        try:
            async for chunk in tts.synthesize(piece.text):
                if chunk:
                    if first_byte:
                        first_byte = False
                        marks.on_tts_first_byte()
                    piece.audio.put_nowait(chunk)
            piece.audio.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported through the result, never a silent line
            piece.audio.put_nowait(exc)
        finally:
            slots.release()

    async def produce() -> None:
        try:
            async for text in pieces:
                await slots.acquire()
                piece = _Piece(text)
                marks.on_piece(text)
                piece.task = asyncio.ensure_future(synthesize(piece))
                order.append(piece)
                queue.put_nowait(piece)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            queue.put_nowait(exc)

    producer = asyncio.ensure_future(produce())

    async def audio() -> AsyncGenerator[bytes, None]:
        first = True
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    errors.append(item)
                    return
                assert isinstance(item, _Piece)
                while True:
                    chunk = await item.audio.get()
                    if chunk is _END:
                        item.finished = True
                        break
                    if isinstance(chunk, BaseException):
                        errors.append(chunk)
                        return
                    assert isinstance(chunk, bytes)
                    if first:
                        first = False
                        marks.on_first_audio()
                    item.played_bytes += len(chunk)
                    yield chunk
        finally:
            await _stop(producer, order)

    stream = audio()
    try:
        result = await bridge.play(stream, tts.sample_rate)
    except (TimeoutError, OSError, TtsError) as exc:  # the engine stalled, or the leg broke: never a silent hang
        return _failed(" ".join(p.text for p in order), len(order), exc)
    finally:
        await stream.aclose()
    return _account(order, result, tts.sample_rate, errors[0] if errors else None)


def _failed(text: str, pieces: int, exc: BaseException) -> StreamedSpeech:
    return StreamedSpeech(text, "", True, 0.0, pieces, exc)


async def _speak_incremental(bridge: MediaPipeline, tts: TtsEngine, text_stream: TextStream,
                             pieces: AsyncIterator[str], marks: SpeechMarks) -> StreamedSpeech:
    """Engines that take text incrementally: every piece goes into ONE synthesis session, whose
    audio is the play. What was heard comes from the engine's character timings (ElevenLabs'
    alignment), else it is estimated over the whole text by time (no per-piece sizes)."""
    pushed: list[str] = []
    errors: list[BaseException] = []
    received = 0
    finished = False

    async def produce() -> None:
        try:
            async for text in pieces:
                marks.on_piece(text)
                pushed.append(text)
                text_stream.push(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model failed: finish what was pushed, report it
            errors.append(exc)
        text_stream.end()

    producer = asyncio.ensure_future(produce())

    async def audio() -> AsyncGenerator[bytes, None]:
        nonlocal received, finished
        source = text_stream.audio()
        try:
            async for chunk in source:
                if not chunk:
                    continue
                if not received:
                    marks.on_tts_first_byte()
                    marks.on_first_audio()
                received += len(chunk)
                yield chunk
            finished = True
        except Exception as exc:  # noqa: BLE001 - the engine failed mid-reply
            errors.append(exc)
        finally:
            await _aclose(source)
            await _stop(producer, [])

    stream = audio()
    try:
        result = await bridge.play(stream, tts.sample_rate)
    except (TimeoutError, OSError, TtsError) as exc:
        return _failed(" ".join(pushed), len(pushed), exc)
    finally:
        await stream.aclose()
    text = " ".join(pushed)
    error = errors[0] if errors else None
    if result.completed and finished and error is None:
        return StreamedSpeech(text, text, False, result.heard_ms, len(pushed))
    aligned = text_stream.heard_text(result.heard_ms) if result.heard_ms > 0 else ""
    total_ms = received / 2 / tts.sample_rate * 1000 if finished else None
    heard = aligned if aligned is not None else heard_text(text, result, total_ms=total_ms)
    return StreamedSpeech(text, heard, result.interrupted, result.heard_ms, len(pushed), error)


async def _aclose(source: AsyncIterator[bytes]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def _stop(producer: asyncio.Task[None], order: list[_Piece]) -> None:
    tasks = [producer, *(p.task for p in order if p.task is not None)]
    for task in tasks:
        if not task.done():
            task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _account(order: list[_Piece], result: PlaybackResult, rate: int, error: BaseException | None) -> StreamedSpeech:
    text = " ".join(p.text for p in order)
    if result.completed and error is None:
        return StreamedSpeech(text, text, False, result.heard_ms, len(order))
    heard: list[str] = []
    left = result.heard_ms
    for piece in order:
        piece_ms = piece.played_bytes / 2 / rate * 1000
        if piece_ms <= 0 or left <= 0:
            break
        if left >= piece_ms and piece.finished:
            heard.append(piece.text)
            left -= piece_ms
            continue
        partial = PlaybackResult(False, True, 0, left, None, piece_ms)
        heard.append(heard_text(piece.text, partial, total_ms=piece_ms))
        break
    return StreamedSpeech(text, " ".join(h for h in heard if h), result.interrupted, result.heard_ms, len(order),
                          error)
