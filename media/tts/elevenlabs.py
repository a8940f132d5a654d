"""ElevenLabs TTS: the HTTP stream endpoint through the official SDK (`pcm_16000` by default, or
`ulaw_8000` decoded here), or the stream-input WebSocket (`transport: "websocket"`).

Pre-warm (a call is ringing): over HTTP, a HEAD leaves a connection in the SDK's pool (kept alive
30 s, not httpx's default 5 s, so a call that rings a while still finds it); over the WebSocket, a
stream-input socket is opened and initialised ahead, and the call's first synthesis takes it
instead of paying for the TCP/TLS/WebSocket set-up (2-3 round trips to a remote service).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any
from urllib.parse import urlencode

from media import g711
from media.formats import AudioEncoding
from media.logsafe import quiet_logger
from media.tts.base import CharTimeline, EvenBytes, TextStream, TtsEngine, TtsError

DEFAULT_BASE_URL = "https://api.elevenlabs.io"
DEFAULT_MODEL = "eleven_flash_v2_5"
DEFAULT_VOICE = "21m00Tcm4TlvDq8ikWAM"  # "Rachel", a premade voice
log = logging.getLogger(__name__)

KEEPALIVE_S = 30.0  # a pooled HTTP connection (the pre-warmed one included) stays open this long idle
WARM_SOCKETS = 4  # pre-opened stream-input sockets waiting for a call's first synthesis, at most
WARM_SOCKET_TTL_S = 50.0  # a warm socket unused this long is closed (it asks the service for 60 s)
WARM_INACTIVITY_S = 60  # `inactivity_timeout` of a warm socket (the service's default is 20 s)
FORMATS = {"pcm_8000": 8000, "pcm_16000": 16000, "pcm_22050": 22050, "pcm_24000": 24000, "pcm_44100": 44100, "ulaw_8000": 8000}


class ElevenLabsTts(TtsEngine):
    name = "elevenlabs"

    def __init__(
        self,
        *,
        api_key: str,
        voice_id: str = DEFAULT_VOICE,
        model_id: str = DEFAULT_MODEL,
        output_format: str = "pcm_16000",
        base_url: str = DEFAULT_BASE_URL,
        transport: str = "http",
        voice_settings: dict[str, Any] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if output_format not in FORMATS:
            raise TtsError(f"tts.elevenlabs.outputFormat must be one of {', '.join(FORMATS)}")
        if transport not in ("http", "websocket"):
            raise TtsError("tts.elevenlabs.transport must be 'http' or 'websocket'")
        self.voice_id = voice_id
        self.model_id = model_id
        self.output_format = output_format
        self.sample_rate = FORMATS[output_format]
        self.base_url = base_url.rstrip("/")
        self.transport = transport
        self.voice_settings = voice_settings
        self._api_key = api_key
        self._timeout = timeout_s
        self._client: Any = None
        self._httpx: Any = None
        self._warm: list[tuple[float, Any]] = []  # (opened at, initialised stream-input socket)
        self._opening: set[asyncio.Task[None]] = set()  # pre-warms under way (cancelled at close)
        self._closing: set[asyncio.Task[None]] = set()  # stale warm sockets closing (awaited at close)
        self.warmed = 0  # pre-warms that left a connection or a socket ready

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ElevenLabsTts:
        key = cfg.get("apiKey") or os.environ.get("ELEVENLABS_API_KEY") or os.environ.get("XI_API_KEY")
        if not key:
            raise TtsError("tts.elevenlabs.apiKey is required (or set ELEVENLABS_API_KEY)")
        return cls(
            api_key=key,
            voice_id=cfg.get("voiceId") or DEFAULT_VOICE,
            model_id=cfg.get("modelId") or DEFAULT_MODEL,
            output_format=cfg.get("outputFormat") or "pcm_16000",
            base_url=cfg.get("baseUrl") or DEFAULT_BASE_URL,
            transport=cfg.get("transport") or "http",
            voice_settings=cfg.get("voiceSettings"),
        )

    def _pcm(self, chunk: bytes, even: EvenBytes) -> bytes:
        if self.output_format == "ulaw_8000":
            return g711.decode(chunk, AudioEncoding.PCMU)
        return even.feed(chunk)

    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        return self._ws(text) if self.transport == "websocket" else self._http(text)

    async def _http(self, text: str) -> AsyncIterator[bytes]:
        from elevenlabs import AsyncElevenLabs  # the `elevenlabs` extra
        from elevenlabs.core.api_error import ApiError

        if self._client is None:
            self._client = AsyncElevenLabs(api_key=self._api_key, base_url=self.base_url, timeout=self._timeout,
                                           httpx_client=self._http_client())
        even = EvenBytes()
        kw: dict[str, Any] = {}
        if self.voice_settings:
            kw["voice_settings"] = self.voice_settings
        try:
            async for chunk in self._client.text_to_speech.stream(
                self.voice_id, text=text, model_id=self.model_id, output_format=self.output_format, **kw
            ):
                yield self._pcm(chunk, even)
        except ApiError as exc:
            raise TtsError(f"ElevenLabs TTS failed: HTTP {exc.status_code}") from None

    def _http_client(self) -> Any:
        import httpx  # the SDK's own HTTP client

        if self._httpx is None:
            self._httpx = httpx.AsyncClient(timeout=self._timeout, follow_redirects=True,
                                            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S))
        return self._httpx

    def prewarm(self) -> None:
        _spawn(self._opening, self._open_warm_socket() if self.transport == "websocket" else self._head())

    async def prewarm_done(self) -> None:
        """Until the pre-warms started so far have finished (or failed)."""
        while self._opening:
            await asyncio.gather(*self._opening, return_exceptions=True)

    async def _head(self) -> None:
        """Any answer leaves the connection in the pool (the method does not matter; no key is sent)."""
        try:
            response = await self._http_client().head(f"{self.base_url}/v1/text-to-speech/{self.voice_id}/stream")
            await response.aclose()
            self.warmed += 1
        except Exception as exc:  # noqa: BLE001 - httpx's errors; the turn connects by itself
            log.info("ElevenLabs pre-warm failed: %s", type(exc).__name__)

    async def _open_warm_socket(self) -> None:
        self._drop_stale_sockets()
        if len(self._warm) + len(self._opening) > WARM_SOCKETS:  # this opening counts in `_opening`
            return
        try:
            ws = await self._connect(inactivity_s=WARM_INACTIVITY_S)
            await ws.send(self._init_message())
        except Exception as exc:  # noqa: BLE001 - TtsError or websockets' errors; the turn connects by itself
            log.info("ElevenLabs pre-warm failed: %s", exc if isinstance(exc, TtsError) else type(exc).__name__)
            return
        self._warm.append((time.monotonic(), ws))
        self.warmed += 1

    def _drop_stale_sockets(self) -> None:
        from websockets.protocol import State

        now, keep = time.monotonic(), []
        for opened, ws in self._warm:
            if ws.state is State.OPEN and now - opened < WARM_SOCKET_TTL_S:
                keep.append((opened, ws))
            else:
                _spawn(self._closing, ws.close())
        self._warm = keep

    def _take_warm_socket(self) -> Any:
        self._drop_stale_sockets()
        return self._warm.pop(0)[1] if self._warm else None

    async def _connect(self, inactivity_s: int | None = None) -> Any:
        import websockets

        try:
            return await websockets.connect(
                self._ws_url(inactivity_s),
                additional_headers={"xi-api-key": self._api_key},
                open_timeout=self._timeout,
                max_size=2**24,
                logger=quiet_logger("media.tts.elevenlabs.ws"),
            )
        except websockets.InvalidStatus as exc:
            raise TtsError(f"ElevenLabs TTS failed: HTTP {exc.response.status_code}") from None
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            raise TtsError(f"ElevenLabs TTS connection failed: {type(exc).__name__}") from None

    def open_text_stream(self) -> TextStream | None:
        """stream-input takes a reply's text as it is written: one socket, each piece flushed."""
        return _ElevenLabsTextStream(self) if self.transport == "websocket" else None

    def _ws_url(self, inactivity_s: int | None = None) -> str:
        scheme_url = self.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        params: dict[str, Any] = {"model_id": self.model_id, "output_format": self.output_format}
        if inactivity_s is not None:
            params["inactivity_timeout"] = inactivity_s
        query = urlencode(params)
        return f"{scheme_url}/v1/text-to-speech/{self.voice_id}/stream-input?{query}"

    def _init_message(self) -> str:
        init: dict[str, Any] = {"text": " ", "generation_config": {"chunk_length_schedule": [120, 160, 250, 290]}}
        if self.voice_settings:
            init["voice_settings"] = self.voice_settings
        return json.dumps(init)

    async def _ws(self, text: str, more: asyncio.Queue[str | None] | None = None,
                  timeline: CharTimeline | None = None) -> AsyncIterator[bytes]:
        """One stream-input session: `text` (if any), then every piece from `more` until None;
        `timeline` collects the characters' timings from each message's `alignment`."""
        import websockets

        even = EvenBytes()
        samples = 0  # PCM samples yielded so far: where the next chunk's alignment starts
        sender: asyncio.Task[None] | None = None
        warm = self._take_warm_socket()  # opened and initialised while the call rang
        try:
            async with warm or await self._connect() as ws:
                if warm is None:
                    await ws.send(self._init_message())
                if text:
                    await ws.send(json.dumps({"text": text.rstrip() + " ", "flush": True}))
                if more is None:
                    await ws.send(json.dumps({"text": ""}))
                else:
                    sender = asyncio.ensure_future(_send_pieces(ws, more))
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("audio"):
                        if timeline is not None:
                            _align(timeline, msg.get("alignment"), samples * 1000 / self.sample_rate)
                        pcm = self._pcm(base64.b64decode(msg["audio"]), even)
                        samples += len(pcm) // 2
                        yield pcm
                    if msg.get("isFinal"):
                        break
                    if msg.get("error"):
                        raise TtsError(f"ElevenLabs TTS failed: {str(msg.get('error'))[:80]}")
        except (OSError, websockets.WebSocketException) as exc:
            raise TtsError(f"ElevenLabs TTS connection failed: {type(exc).__name__}") from None
        finally:
            if sender is not None:
                sender.cancel()

    async def close(self) -> None:
        for task in list(self._opening):
            task.cancel()
        await asyncio.gather(*self._opening, *self._closing, return_exceptions=True)
        warm, self._warm = self._warm, []
        for _, ws in warm:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._httpx is not None:
            await self._httpx.aclose()
            self._httpx = None
            self._client = None


def _spawn(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _align(timeline: CharTimeline, alignment: Any, chunk_at_ms: float) -> None:
    if not isinstance(alignment, dict):
        return
    chars, starts = alignment.get("chars"), alignment.get("charStartTimesMs")
    if isinstance(chars, list) and isinstance(starts, list):
        timeline.add([str(c) for c in chars],
                     [float(s) if isinstance(s, (int, float)) else 0.0 for s in starts], chunk_at_ms)


async def _send_pieces(ws: Any, pieces: asyncio.Queue[str | None]) -> None:
    while (piece := await pieces.get()) is not None:
        # flush: generate this piece now (the chunk schedule would wait for 120 characters first)
        await ws.send(json.dumps({"text": piece.rstrip() + " ", "flush": True}))
    await ws.send(json.dumps({"text": ""}))


class _ElevenLabsTextStream(TextStream):
    def __init__(self, engine: ElevenLabsTts) -> None:
        self._engine = engine
        self._pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self._timeline = CharTimeline()

    def push(self, text: str) -> None:
        self._pieces.put_nowait(text)

    def end(self) -> None:
        self._pieces.put_nowait(None)

    def audio(self) -> AsyncIterator[bytes]:
        return self._engine._ws("", self._pieces, self._timeline)  # noqa: SLF001 - the same session code as synthesize

    def heard_text(self, heard_ms: float) -> str | None:
        return self._timeline.spoken(heard_ms) if self._timeline.chars else None
