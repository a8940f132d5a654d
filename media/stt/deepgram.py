"""Deepgram streaming STT (`wss://api.deepgram.com/v1/listen`), over a plain WebSocket.

Audio: G.711 from the carrier passes through untouched (`encoding=mulaw|alaw&sample_rate=8000`);
anything else goes up as `linear16` at the pipeline rate. Audio is sent as binary frames, control
messages as JSON text frames.

Turns: interim `Results` become partial events (the finals so far plus the current guess);
`is_final` segments are concatenated; the utterance is final at `speech_final` (endpointing) or at
`UtteranceEnd` (word-timing gap, for noisy lines where endpointing never fires). `SpeechStarted`
(`vad_events=true`) is the barge-in signal. When no audio has been sent for `keepalive_s`, a
`KeepAlive` goes out (Deepgram closes an idle stream after 10 s), timed on the injectable clock.
Closing sends `CloseStream` and waits briefly for the final results and `Metadata`.

Why not the Deepgram SDK: its listen client is a thin wrapper over the same socket (the wire is a
handful of query parameters and four message types); the bridge needs its own reconnect, its
clock for KeepAlive and byte-exact passthrough, which a plain socket gives with no extra layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from media.clock import Clock, RealClock, TimerHandle
from media.formats import AudioEncoding, AudioFormat
from media.logsafe import quiet_logger
from media.stt.base import SttEngine, SttError, SttEvent
from media.stt.socket_session import WebSocketSttSession
from media.urls import websocket_url

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "wss://api.deepgram.com/v1"
_G711 = {AudioEncoding.PCMU: "mulaw", AudioEncoding.PCMA: "alaw"}


def listen_url(base_url: str, params: dict[str, Any]) -> str:
    return websocket_url(base_url, "listen", params)


class DeepgramStt(SttEngine):
    name = "deepgram"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        model: str = "nova-3",
        language: str | None = None,
        endpointing_ms: int = 300,
        utterance_end_ms: int = 1000,
        keepalive_s: float = 4.0,
        passthrough_g711: bool = True,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        connect_timeout_s: float = 10.0,
        close_timeout_s: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        self.api_key = api_key
        self.base_url = base_url
        self.model = model
        self.language = language
        self.endpointing_ms = endpointing_ms
        self.utterance_end_ms = utterance_end_ms
        self.keepalive_s = keepalive_s
        self.passthrough_g711 = passthrough_g711
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.clock: Clock = clock or RealClock()

    def __repr__(self) -> str:  # never show the key
        return f"DeepgramStt(base_url={self.base_url!r}, model={self.model!r})"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> DeepgramStt:
        key = cfg.get("apiKey") or os.environ.get("DEEPGRAM_API_KEY")
        if not key:
            raise SttError("streaming.providers.deepgram.apiKey is required (or set DEEPGRAM_API_KEY)")
        kw: dict[str, Any] = {}
        for src, dst in (("baseUrl", "base_url"), ("model", "model"), ("language", "language"),
                         ("endpointingMs", "endpointing_ms"), ("utteranceEndMs", "utterance_end_ms"),
                         ("keepAliveSeconds", "keepalive_s"), ("passthroughG711", "passthrough_g711")):
            if cfg.get(src) is not None:
                kw[dst] = cfg[src]
        return cls(api_key=str(key), **kw)

    def params(self, encoding: str, sample_rate: int) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "encoding": encoding, "sample_rate": sample_rate,
                                  "channels": 1, "interim_results": "true", "endpointing": self.endpointing_ms,
                                  "utterance_end_ms": self.utterance_end_ms, "vad_events": "true",
                                  "punctuate": "true"}
        if self.language:
            params["language"] = self.language
        return params

    def open(self, *, sample_rate: int, on_event: Callable[[SttEvent], None],
             wire_format: AudioFormat | None = None) -> DeepgramSession:
        return DeepgramSession(self, sample_rate=sample_rate, on_event=on_event, wire_format=wire_format)


class TurnBuilder:
    """Deepgram's messages -> SttEvents (sans-I/O)."""

    def __init__(self) -> None:
        self.finals: list[str] = []
        self.last_word_end: float | None = None  # seconds into the stream where the last final word ended
        self.speech_end_s: float | None = None  # of the utterance `speech_ended` closed

    def handle(self, msg: dict[str, Any]) -> list[SttEvent]:
        kind = msg.get("type")
        if kind == "SpeechStarted":
            return [SttEvent("speech_started")]
        if kind == "UtteranceEnd":
            end = msg.get("last_word_end")
            if isinstance(end, (int, float)) and not isinstance(end, bool):
                self.last_word_end = float(end)
            return self._end()
        if kind != "Results":
            return []
        alternatives = (msg.get("channel") or {}).get("alternatives") or [{}]
        text = str(alternatives[0].get("transcript") or "").strip()
        out: list[SttEvent] = []
        if msg.get("is_final"):
            words = [w for w in alternatives[0].get("words") or [] if isinstance(w, dict)]
            ends = [float(w["end"]) for w in words if isinstance(w.get("end"), (int, float))
                    and not isinstance(w.get("end"), bool)]
            if ends:
                self.last_word_end = max(ends)
            if text:
                self.finals.append(text)
                out.append(SttEvent("partial", " ".join(self.finals)))
            if msg.get("speech_final"):
                out += self._end()
        elif text:
            out.append(SttEvent("partial", " ".join([*self.finals, text])))
        return out

    def _end(self) -> list[SttEvent]:
        if not self.finals:
            return []
        text, self.finals = " ".join(self.finals), []
        self.speech_end_s, self.last_word_end = self.last_word_end, None
        return [SttEvent("speech_ended"), SttEvent("final", text)]


class DeepgramSession(WebSocketSttSession):
    reports_speech_end = True
    provider = "Deepgram STT"

    def __init__(self, engine: DeepgramStt, *, sample_rate: int, on_event: Callable[[SttEvent], None],
                 wire_format: AudioFormat | None) -> None:
        super().__init__(on_event, connect_timeout_s=engine.connect_timeout_s, max_retries=engine.max_retries,
                         backoff_s=engine.backoff_s, task_name="deepgram-stt")
        self.engine = engine
        if engine.passthrough_g711 and wire_format is not None and wire_format.rate == 8000 \
                and wire_format.encoding in _G711:
            self.wants_wire = True
            self.encoding, self.sample_rate = _G711[wire_format.encoding], 8000
        else:
            self.wants_wire = False
            self.encoding, self.sample_rate = "linear16", sample_rate
        self.url = listen_url(engine.base_url, engine.params(self.encoding, self.sample_rate))
        self._turns = TurnBuilder()
        self._queue: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self._metadata = asyncio.Event()
        self._last_audio = engine.clock.monotonic()
        self._keepalive: TimerHandle | None = None
        self.keepalives_sent = 0
        self._link_bytes = 0  # sent_bytes when this connection opened: Deepgram's times restart with it
        self._bytes_per_s = (1 if self.wants_wire else 2) * self.sample_rate

    # ---- feeding (sync)
    def feed(self, pcm: bytes) -> None:
        if not self.wants_wire:
            self._send_audio(pcm)

    def feed_wire(self, payload: bytes) -> None:
        if self.wants_wire:
            self._send_audio(payload)

    def _send_audio(self, data: bytes) -> None:
        if data and not self._closing:
            self._last_audio = self.engine.clock.monotonic()
            if self._queue.empty() and self._write_now(data, text=False):
                self.sent_bytes += len(data)
                return
            self._queue.put_nowait(data)

    # ---- lifecycle
    def _started(self) -> None:
        self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        self._keepalive = self.engine.clock.call_later(self.engine.keepalive_s, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        if self._closing:
            return
        if self.engine.clock.monotonic() - self._last_audio >= self.engine.keepalive_s - 1e-6:
            self.keepalives_sent += 1
            self._queue.put_nowait(json.dumps({"type": "KeepAlive"}))
        self._arm_keepalive()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._task is None:
            return
        if self._connected.is_set() and not self._task.done():
            self._queue.put_nowait(json.dumps({"type": "CloseStream"}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._metadata.wait(), self.engine.close_timeout_s)
        await self._stop_task()

    def _connect(self) -> Any:
        import websockets

        from media.ws_client import InlineClientConnection

        return websockets.connect(self.url, additional_headers={"Authorization": f"Token {self.engine.api_key}"},
                                  open_timeout=self.engine.connect_timeout_s, compression=None,
                                  logger=quiet_logger("media.stt.deepgram.ws"),
                                  create_connection=InlineClientConnection)

    async def _opened(self, ws: Any) -> None:
        self._link_bytes = self.sent_bytes

    def _receive(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            return
        try:
            msg = json.loads(raw)
        except ValueError:
            return
        if isinstance(msg, dict):
            if msg.get("type") == "Metadata":
                self._metadata.set()
            for event in self._turns.handle(msg):
                self._emit(self._dated(event))

    async def _send_loop(self, ws: Any) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            try:
                await ws.send(item)
            except Exception:
                if isinstance(item, bytes):
                    self._queue.put_nowait(item)  # after the reconnect (order within the gap may shift)
                raise
            if isinstance(item, bytes):
                self.sent_bytes += len(item)

    def _dated(self, event: SttEvent) -> SttEvent:
        """speech_ended, dated back to the last word's end: the audio sent since then took that long
        (it flows in real time), so the caller fell silent that long ago."""
        end = self._turns.speech_end_s
        if event.kind != "speech_ended" or end is None:
            return event
        streamed_s = (self.sent_bytes - self._link_bytes) / self._bytes_per_s
        return SttEvent("speech_ended", ago_s=max(0.0, streamed_s - end))

    def _emit(self, event: SttEvent) -> None:
        try:
            self._on_event(event)
        except Exception:  # a listener bug must not kill the transcription session
            log.exception("STT event handler failed")
