"""OpenAI Realtime transcription over WebSocket (`<baseUrl>/realtime?intent=transcription`).

Session setup follows the transcription-session shape (`transcription_session.update` with input
format, model, server VAD); audio goes up as `input_audio_buffer.append`; the server's
`speech_started`, transcription `delta` and `completed` events become SttEvents. G.711 u-law (or
A-law) at 8 kHz from the carrier is passed through untouched; anything else is sent as pcm16 at
24 kHz. The socket reconnects with exponential backoff; audio captured meanwhile is kept (up to
`max_backlog_s`) and sent after the reconnect.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from media.formats import AudioEncoding, AudioFormat
from media.logsafe import quiet_logger
from media.resample import StreamResampler
from media.stt.base import SttEngine, SttError, SttEvent
from media.stt.socket_session import WebSocketSttSession
from media.urls import websocket_url

log = logging.getLogger(__name__)

REALTIME_PCM_RATE = 24000
DEFAULT_BASE_URL = "wss://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-transcribe"


def realtime_url(base_url: str) -> str:
    return websocket_url(base_url, "realtime", {"intent": "transcription"})


class OpenAiRealtimeStt(SttEngine):
    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        model: str = DEFAULT_MODEL,
        language: str | None = None,
        prompt: str | None = None,
        vad_threshold: float = 0.5,
        prefix_padding_ms: int = 300,
        silence_duration_ms: int = 800,
        passthrough_g711: bool = True,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        connect_timeout_s: float = 10.0,
        max_backlog_s: float = 10.0,
    ) -> None:
        self.api_key = api_key
        self.url = realtime_url(base_url)
        self.model = model
        self.language = language
        self.prompt = prompt
        self.vad_threshold = vad_threshold
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self.passthrough_g711 = passthrough_g711
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.max_backlog_s = max_backlog_s

    def __repr__(self) -> str:  # never show the key
        return f"OpenAiRealtimeStt(url={self.url!r}, model={self.model!r})"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> OpenAiRealtimeStt:
        key = cfg.get("apiKey") or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise SttError("streaming.providers.openai.apiKey is required (or set OPENAI_API_KEY)")
        kw: dict[str, Any] = {}
        for src, dst in (
            ("baseUrl", "base_url"), ("model", "model"), ("language", "language"), ("prompt", "prompt"),
            ("vadThreshold", "vad_threshold"), ("prefixPaddingMs", "prefix_padding_ms"),
            ("silenceDurationMs", "silence_duration_ms"), ("passthroughG711", "passthrough_g711"),
        ):
            if cfg.get(src) is not None:
                kw[dst] = cfg[src]
        return cls(api_key=str(key), **kw)

    def open(
        self,
        *,
        sample_rate: int,
        on_event: Callable[[SttEvent], None],
        wire_format: AudioFormat | None = None,
    ) -> RealtimeSession:
        return RealtimeSession(self, sample_rate=sample_rate, on_event=on_event, wire_format=wire_format)

    def session_update(self, input_format: str) -> dict[str, Any]:
        transcription: dict[str, Any] = {"model": self.model}
        if self.language:
            transcription["language"] = self.language
        if self.prompt:
            transcription["prompt"] = self.prompt
        return {
            "type": "transcription_session.update",
            "session": {
                "input_audio_format": input_format,
                "input_audio_transcription": transcription,
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": self.vad_threshold,
                    "prefix_padding_ms": self.prefix_padding_ms,
                    "silence_duration_ms": self.silence_duration_ms,
                },
            },
        }


_G711_FORMATS = {AudioEncoding.PCMU: "g711_ulaw", AudioEncoding.PCMA: "g711_alaw"}


class RealtimeSession(WebSocketSttSession):
    reports_speech_end = True
    provider = "OpenAI Realtime STT"

    def __init__(
        self,
        engine: OpenAiRealtimeStt,
        *,
        sample_rate: int,
        on_event: Callable[[SttEvent], None],
        wire_format: AudioFormat | None,
    ) -> None:
        super().__init__(on_event, connect_timeout_s=engine.connect_timeout_s, max_retries=engine.max_retries,
                         backoff_s=engine.backoff_s, task_name="openai-realtime-stt")
        self.engine = engine
        if (
            engine.passthrough_g711
            and wire_format is not None
            and wire_format.rate == 8000
            and wire_format.encoding in _G711_FORMATS
        ):
            self.wants_wire = True
            self.input_format = _G711_FORMATS[wire_format.encoding]
            bytes_per_s = 8000
        else:
            self.wants_wire = False
            self.input_format = "pcm16"
            bytes_per_s = REALTIME_PCM_RATE * 2
        self._resampler = StreamResampler(sample_rate, REALTIME_PCM_RATE)
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._max_queued = int(engine.max_backlog_s * bytes_per_s)
        self._wake = asyncio.Event()
        self._partials: dict[str, str] = {}
        self.dropped_bytes = 0

    # ------------------------------------------------------------------ feeding (sync)

    def feed(self, pcm: bytes) -> None:
        if self.wants_wire:
            return
        self._enqueue(self._resampler.process(pcm))

    def feed_wire(self, payload: bytes) -> None:
        if self.wants_wire:
            self._enqueue(payload)

    def _enqueue(self, data: bytes) -> None:
        if not data or self._closing:
            return
        if not self._queue and self._write_now(_append_json(data), text=True):
            self.sent_bytes += len(data)
            return
        self._queue.append(data)
        self._queued += len(data)
        while self._queued > self._max_queued and self._queue:  # keep the newest audio
            old = self._queue.popleft()
            self._queued -= len(old)
            self.dropped_bytes += len(old)
        self._wake.set()

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        self._closing = True
        await self._stop_task()

    def _connect(self) -> Any:
        import websockets

        from media.ws_client import InlineClientConnection

        return websockets.connect(
            self.engine.url,
            additional_headers={
                "Authorization": f"Bearer {self.engine.api_key}",
                "OpenAI-Beta": "realtime=v1",
            },
            open_timeout=self.engine.connect_timeout_s,
            max_size=2**22,
            logger=quiet_logger("media.stt.openai_realtime.ws"),
            create_connection=InlineClientConnection,
        )

    async def _opened(self, ws: Any) -> None:
        await ws.send(json.dumps(self.engine.session_update(self.input_format)))

    def _receive(self, raw: str | bytes) -> None:
        self._handle(json.loads(raw))

    async def _send_loop(self, ws: Any) -> None:
        while True:
            if not self._queue:
                await self._wake.wait()
            self._wake.clear()
            while self._queue:
                # Coalesce what is queued (after a reconnect, up to 0.5 s per message).
                parts: list[bytes] = []
                size = 0
                while self._queue and size < 12000:
                    p = self._queue.popleft()
                    parts.append(p)
                    size += len(p)
                data = b"".join(parts)
                try:
                    await ws.send(_append_json(data).decode())
                except Exception:
                    self._queue.appendleft(data)  # resend after the reconnect
                    raise
                self._queued -= len(data)
                self.sent_bytes += len(data)

    def _handle(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type", "")
        if kind == "input_audio_buffer.speech_started":
            self._emit(SttEvent("speech_started"))
        elif kind == "input_audio_buffer.speech_stopped":
            self._emit(SttEvent("speech_ended"))
        elif kind == "conversation.item.input_audio_transcription.delta":
            item = str(ev.get("item_id", ""))
            text = self._partials.get(item, "") + str(ev.get("delta", ""))
            self._partials[item] = text
            self._emit(SttEvent("partial", text))
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._partials.pop(str(ev.get("item_id", "")), None)
            self._emit(SttEvent("final", str(ev.get("transcript", ""))))
        elif kind == "conversation.item.input_audio_transcription.failed" or kind == "error":
            err = ev.get("error") or {}
            log.warning("OpenAI Realtime STT error: %s %s", err.get("type", kind), str(err.get("message", ""))[:200])


_APPEND_HEAD = b'{"type":"input_audio_buffer.append","audio":"'


def _append_json(chunk: bytes) -> bytes:
    """The append message as JSON text (UTF-8), built around the base64 without a dict or json.dumps."""
    return _APPEND_HEAD + binascii.b2a_base64(chunk, newline=False) + b'"}'
