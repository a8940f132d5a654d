"""pocketsphinx, offline and grammar- or keyword-constrained (extra `offline`), for lab use.

Open-vocabulary results on phone audio are poor, so the engine takes either a JSGF grammar or a
keyword list. Decoding runs on one worker thread per session; `feed` only queues audio, so the
event loop never waits on the decoder. Events come back on the loop via call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from media.formats import AudioFormat
from media.resample import StreamResampler
from media.stt.base import SttEngine, SttError, SttEvent, SttSession

log = logging.getLogger(__name__)

DECODER_RATE = 16000


def available() -> bool:
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return False
    return True


def keywords_grammar(keywords: Sequence[str]) -> str:
    """A JSGF grammar accepting one of the given words or phrases per utterance."""
    alts = " | ".join(k.strip().lower() for k in keywords if k.strip())
    if not alts:
        raise SttError("streaming.providers.pocketsphinx.keywords must not be empty")
    return f"#JSGF V1.0;\ngrammar kw;\npublic <utt> = ( {alts} ) ;\n"


class PocketsphinxStt(SttEngine):
    name = "pocketsphinx"

    def __init__(self, *, grammar: str | None = None, keywords: Sequence[str] = ()) -> None:
        if not available():
            raise SttError("pocketsphinx is not installed (pip install 'voicecall[offline]')")
        if not grammar and not keywords:
            raise SttError("streaming.providers.pocketsphinx needs a grammar or keywords")
        self.grammar = grammar or keywords_grammar(keywords)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PocketsphinxStt:
        return cls(grammar=cfg.get("grammar"), keywords=cfg.get("keywords") or ())

    def open(
        self,
        *,
        sample_rate: int,
        on_event: Callable[[SttEvent], None],
        wire_format: AudioFormat | None = None,
    ) -> PocketsphinxSession:
        return PocketsphinxSession(self.grammar, sample_rate=sample_rate, on_event=on_event)


class PocketsphinxSession(SttSession):
    def __init__(self, grammar: str, *, sample_rate: int, on_event: Callable[[SttEvent], None]) -> None:
        self._grammar = grammar
        self._on_event = on_event
        self._resampler = StreamResampler(sample_rate, DECODER_RATE)
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="pocketsphinx", daemon=True)
        self._thread.start()
        await self._loop.run_in_executor(None, self._ready.wait, 30.0)
        if self.error is not None:
            raise SttError(f"pocketsphinx failed to start: {self.error}")

    def feed(self, pcm: bytes) -> None:
        data = self._resampler.process(pcm)
        if data:
            self._q.put(data)

    async def close(self) -> None:
        if self._thread is None:
            return
        tail = self._resampler.flush()
        if tail:
            self._q.put(tail)
        self._q.put(None)
        assert self._loop is not None
        await self._loop.run_in_executor(None, self._thread.join)
        self._thread = None

    def _emit(self, event: SttEvent) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_event, event)

    def _work(self) -> None:
        try:
            from pocketsphinx import Config, Decoder, Endpointer

            config = Config(jsgf=None, lm=None, samprate=DECODER_RATE, loglevel="FATAL")
            decoder = Decoder(config)
            decoder.add_jsgf_string("grammar", self._grammar)
            decoder.activate_search("grammar")
            endpointer = Endpointer(window=0.5, sample_rate=DECODER_RATE)
        except Exception as exc:
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        buf = bytearray()
        fb = endpointer.frame_bytes
        last_partial = ""
        while True:
            data = self._q.get()
            if data is None:
                break
            buf += data
            while len(buf) >= fb:
                frame = bytes(buf[:fb])
                del buf[:fb]
                was_speech = endpointer.in_speech
                speech = endpointer.process(frame)
                if speech is None:
                    continue
                if not was_speech:
                    decoder.start_utt()
                    last_partial = ""
                    self._emit(SttEvent("speech_started"))
                decoder.process_raw(speech, False, False)
                hyp = decoder.hyp()
                if endpointer.in_speech:
                    if hyp is not None and hyp.hypstr and hyp.hypstr != last_partial:
                        last_partial = hyp.hypstr
                        self._emit(SttEvent("partial", hyp.hypstr))
                else:
                    decoder.end_utt()
                    hyp = decoder.hyp()
                    if hyp is not None and hyp.hypstr:
                        self._emit(SttEvent("final", hyp.hypstr))
        if endpointer.in_speech:
            tail = endpointer.end_stream(bytes(buf))
            if tail is not None:
                decoder.process_raw(tail, False, False)
            decoder.end_utt()
            hyp = decoder.hyp()
            if hyp is not None and hyp.hypstr:
                self._emit(SttEvent("final", hyp.hypstr))
