"""Media-stream WebSockets: connection limits, the start handshake, and frames into the MediaPipeline.

The carrier's `MediaStreamCodec` knows the dialect (Twilio, Telnyx, Plivo); this module knows
the rules every stream obeys: `maxConnections` (503 before the upgrade), pending-connection caps
(close 1013), the pre-start timeout (close 1008), the per-call token (close 1008 "Unknown call"),
a bad frame (close 1008, this stream only) and the send-buffer cap (close 1013).

Every frame is checked for JSON nesting depth before the codec sees it, and a codec that raises
anything on odd input closes that stream with 1008 and one log line, before or after `start`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import WSCloseCode, WSMsgType, web

from bridge.ws_inline import InlineWebSocketResponse
from carriers.base import (
    MediaStreamCodec,
    StreamDtmf,
    StreamMark,
    StreamMedia,
    StreamMessage,
    StreamProtocolError,
    StreamStart,
    StreamStop,
)
from media.formats import AudioFormat
from media.untrusted import MAX_DEPTH, too_deep

if TYPE_CHECKING:
    from bridge.config import StreamingSettings
    from bridge.manager import CallManager
    from bridge.metrics import Metrics
    from media.pipeline import MediaPipeline

log = logging.getLogger(__name__)

CLOSE_POLICY = WSCloseCode.POLICY_VIOLATION  # 1008
CLOSE_TRY_AGAIN = WSCloseCode.TRY_AGAIN_LATER  # 1013


class StreamGate:
    """Counts open and not-yet-started media-stream sockets, in total and per source IP."""

    def __init__(self, limits: StreamingSettings) -> None:
        self.limits = limits
        self.open = 0
        self.pending = 0
        self.pending_by_ip: Counter[str] = Counter()

    def full(self) -> bool:
        return self.open >= self.limits.maxConnections

    def pending_refusal(self, ip: str) -> str | None:
        if self.pending >= self.limits.maxPendingConnections:
            return "Too many pending connections"
        if self.pending_by_ip[ip] >= self.limits.maxPendingConnectionsPerIp:
            return "Too many pending connections from this address"
        return None

    def enter(self, ip: str) -> None:
        self.open += 1
        self.pending += 1
        self.pending_by_ip[ip] += 1

    def started(self, ip: str) -> None:
        self.pending -= 1
        self._drop_ip(ip)

    def leave(self, ip: str, *, was_pending: bool) -> None:
        self.open -= 1
        if was_pending:
            self.pending -= 1
            self._drop_ip(ip)

    def _drop_ip(self, ip: str) -> None:
        self.pending_by_ip[ip] -= 1
        if self.pending_by_ip[ip] <= 0:
            del self.pending_by_ip[ip]


@dataclass(slots=True)
class WebSocketTransport:
    """MediaTransport over one carrier WebSocket."""

    ws: web.WebSocketResponse
    codec: MediaStreamCodec
    format: AudioFormat
    max_buffer: int
    send_ms: int = 20  # audio per outbound media message (streaming.outboundFrameMs)
    supports_marks: bool = True
    reports_dtmf: bool = False  # the carrier sends `dtmf` events on this stream
    overflowed: bool = False

    def _buffered(self) -> int:
        transport = self.ws._writer.transport if self.ws._writer is not None else None  # noqa: SLF001
        return transport.get_write_buffer_size() if transport is not None else 0

    async def _send(self, text: str) -> None:
        if self.ws.closed or self.overflowed:
            return
        if self._buffered() > self.max_buffer:
            # The peer stopped reading: never let one stream eat the process's memory.
            self.overflowed = True
            log.warning("media stream send buffer over %d bytes; closing it", self.max_buffer)
            await self.ws.close(code=CLOSE_TRY_AGAIN, message=b"Send buffer full")
            return
        try:
            await self.ws.send_str(text)
        except ConnectionError:
            pass

    async def send_media(self, payload: bytes) -> None:
        await self._send(self.codec.encode_media(payload))

    def send_media_now(self, payload: bytes) -> bool:
        """`send_media` without a coroutine when it would not wait (the pacing wheel's fast path);
        False, having done nothing, when it would: then await `send_media`."""
        ws = self.ws
        if ws.closed or self.overflowed:
            return True  # dropped, as `send_media` drops it
        if not isinstance(ws, InlineWebSocketResponse) or self._buffered() > self.max_buffer:
            return False
        return ws.send_str_now(self.codec.encode_media(payload))

    async def send_mark(self, name: str) -> None:
        await self._send(self.codec.encode_mark(name))

    async def send_clear(self) -> None:
        await self._send(self.codec.encode_clear())


class StreamHandler:
    def __init__(self, manager: CallManager, gate: StreamGate, metrics: Metrics) -> None:
        self.manager = manager
        self.gate = gate
        self.metrics = metrics
        self.sockets: set[web.WebSocketResponse] = set()
        # On a cluster: makes this node the owner of the call a stream starts for (True: it is now)
        self.take_over: Callable[[StreamStart], Awaitable[bool]] | None = None

    async def close_all(self) -> None:
        """On shutdown: close every media stream so no handler keeps the server waiting."""
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")
                               for ws in list(self.sockets)), return_exceptions=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        codec = self.manager.carrier.open_stream()
        if codec is None:
            raise web.HTTPNotFound(text="this carrier has no media streams")
        if self.gate.full():
            self.metrics.stream_refused.labels(reason="max_connections").inc()
            return web.Response(status=503, text="Too many media streams")
        ws = InlineWebSocketResponse(max_msg_size=64 * 1024, autoping=True)
        try:
            await ws.prepare(request)
        except ConnectionError:  # the client left during the upgrade (seen under load): one line, no traceback
            log.info("media stream client gone before the upgrade completed")
            return ws
        self.sockets.add(ws)
        try:
            return await self._serve(ws, codec, request.remote or "")
        finally:
            self.sockets.discard(ws)

    async def _serve(self, ws: web.WebSocketResponse, codec: MediaStreamCodec, ip: str) -> web.WebSocketResponse:
        limits = self.gate.limits
        refusal = self.gate.pending_refusal(ip)
        if refusal is not None:
            self.metrics.stream_refused.labels(reason="pending").inc()
            await ws.close(code=CLOSE_TRY_AGAIN, message=refusal.encode())
            return ws
        self.gate.enter(ip)
        pending = True
        call_id: str | None = None
        bridge: MediaPipeline | None = None
        try:
            start = await self._await_start(ws, codec, limits.preStartTimeoutMs / 1000)
            if start is None:
                return ws
            call = self.manager.accept_stream(self.manager.carrier.name, start.provider_call_id,
                                              start.call_id, start.token)
            if call is None and self.take_over is not None and await self.take_over(start):
                # on a cluster: the node that accepts the media carries the call (bridge/cluster/handover.py)
                call = self.manager.accept_stream(self.manager.carrier.name, start.provider_call_id,
                                                  start.call_id, start.token)
            if call is None:
                await ws.close(code=CLOSE_POLICY, message=b"Unknown call")
                return ws
            self.gate.started(ip)
            pending = False
            call_id = call.callId
            transport = WebSocketTransport(ws, codec, start.format, limits.maxSendBufferBytes, limits.outboundFrameMs,
                                           reports_dtmf=self.manager.carrier.reports_dtmf)
            bridge = self.manager.attach_media(call_id, transport)
            if bridge is None:
                await ws.close(code=CLOSE_POLICY, message=b"Call cannot take media")
                return ws
            self.metrics.streams_started.inc()
            await self._pump(ws, codec, bridge)
        finally:
            self.gate.leave(ip, was_pending=pending)
            if call_id is not None:
                self.manager.media_disconnected(call_id, bridge)
        return ws

    async def _await_start(self, ws: web.WebSocketResponse, codec: MediaStreamCodec,
                           timeout: float) -> StreamStart | None:
        try:
            async with asyncio.timeout(timeout):
                async for msg in ws:
                    if msg.type != WSMsgType.TEXT:
                        await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"Text frames only")
                        return None
                    try:
                        parsed = _parse(codec, msg.data)
                    except StreamProtocolError as exc:
                        log.info("media stream refused before start: %s", exc)
                        await ws.close(code=CLOSE_POLICY, message=_reason(exc))
                        return None
                    if isinstance(parsed, StreamStart):
                        return parsed
                    if isinstance(parsed, StreamStop):
                        await ws.close()
                        return None
        except TimeoutError:
            await ws.close(code=CLOSE_POLICY, message=b"Start timeout")
        return None

    async def _pump(self, ws: web.WebSocketResponse, codec: MediaStreamCodec, bridge: MediaPipeline) -> None:
        frames = 0
        reorders = codec.reorders
        # The verdict the inline path reached on the one message it handed back to this task.
        held: list[StreamMessage | Exception] = []

        def dispatch(parsed: StreamMessage) -> bool:
            """Act on a message that needs no await; False for the ones that do (stop)."""
            nonlocal frames
            if isinstance(parsed, StreamMedia):
                frames += 1
                # ordered transports (TCP streams) skip the reorder buffer and its start-up hold
                bridge.receive(parsed.payload, parsed.sequence if reorders else None)
            elif isinstance(parsed, StreamMark):
                bridge.on_mark(parsed.name)
            elif isinstance(parsed, StreamDtmf):
                bridge.on_dtmf(parsed.digit)
            elif isinstance(parsed, StreamStop):
                return False
            return True

        def on_text(text: str) -> bool:
            # In aiohttp's read callback: no task wake-up per frame. A stop, a bad frame or a
            # failure goes to this task (with its verdict, so the codec parses it once), and the
            # inline path ends: what follows is read in order by the task, as before.
            try:
                parsed = _parse(codec, text)
                if dispatch(parsed):
                    return True
                held.append(parsed)
            except Exception as exc:  # noqa: BLE001 - handed to the task, which raises or closes
                held.append(exc)
            inline(None)
            return False

        def inline(handler: Callable[[str], bool] | None) -> None:
            if isinstance(ws, InlineWebSocketResponse):
                ws.inline(handler)

        context = contextvars.copy_context()  # the call's log context, as the task has it
        inline(lambda text: context.run(on_text, text))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"Text frames only")
                    return
                try:
                    parsed = held.pop() if held else _parse(codec, msg.data)
                    if isinstance(parsed, Exception):
                        raise parsed
                except StreamProtocolError as exc:
                    log.warning("media stream closed: %s", exc)
                    await ws.close(code=CLOSE_POLICY, message=_reason(exc))
                    return
                if not dispatch(parsed):
                    await ws.close()
                    return
        finally:
            inline(None)
            self.metrics.stream_frames_in.inc(frames)


def _parse(codec: MediaStreamCodec, text: str) -> StreamMessage:
    """The codec's parse, with every failure as a StreamProtocolError (one line, no traceback)."""
    if too_deep(text, MAX_DEPTH):
        raise StreamProtocolError(f"frame nested deeper than {MAX_DEPTH} levels")
    try:
        return codec.parse(text)
    except StreamProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - odd values the codec did not expect: a bad frame
        raise StreamProtocolError(f"malformed frame ({type(exc).__name__})") from None


def _reason(exc: Exception) -> bytes:
    return str(exc).encode()[:120]
