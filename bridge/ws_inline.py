"""An aiohttp WebSocket whose text messages can be handled in the read callback itself.

aiohttp parses WebSocket frames in the protocol's `data_received` and puts each message on a
queue; the handler task wakes up (a future, a task step, `receive()`) once per message. A media
stream gets 50 messages a second per call, and that hand-off is the largest per-message cost
left in the edge (bench/README.md). `InlineWebSocketResponse.inline(on_text)` lets the handler
take text messages straight from the parser instead, while the queue is empty; everything else
(control frames, binary, close, errors, and any text message `on_text` declines) still goes
through the queue and `receive()`, in order, so the protocol behaviour is aiohttp's.

`send_str_now` is the write half of the same idea: the pacing wheel (media/wheel.py) sends a
media message from its timer callback without a coroutine, when aiohttp would not wait anyway.

The handshake, routing, limits and the port stay aiohttp's: one listener, behind any reverse
proxy that passes WebSocket upgrades. Parsing stays in aiohttp's (Cython) frame reader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader

log = logging.getLogger(__name__)

OnText = Callable[[str], bool]


class _InlineQueue(WebSocketDataQueue):
    """aiohttp's message queue, which first offers a text message to `on_text` when nothing is
    queued ahead of it (order is kept); `on_text` returns False to have it queued as usual."""

    on_text: OnText | None = None
    inline_messages = 0

    def feed_data(self, data: Any, size: int) -> None:
        on_text = self.on_text
        if on_text is not None and data.type is WSMsgType.TEXT and not self._buffer and on_text(data.data):
            self.inline_messages += 1
            return
        super().feed_data(data, size)


class InlineWebSocketResponse(web.WebSocketResponse):
    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        handler = request.protocol
        # Swap in the inline queue only if the parser has seen no byte yet (nothing arrived with
        # the upgrade request), so no message or partial frame is left behind in the old one.
        fresh = not getattr(handler, "_message_tail", b"")
        super()._post_start(request, protocol, writer)
        if not fresh:
            return
        old, loop = self._reader, self._loop
        if old is None or loop is None:
            return
        try:
            queue = _InlineQueue(handler, old._limit // 2, loop=loop)  # noqa: SLF001 - _limit is 2 x limit
            parser = WebSocketReader(queue, self._max_msg_size, compress=bool(self._compress),
                                     decode_text=self._decode_text)
            if handler is None or handler._payload_parser is not self._parser:  # noqa: SLF001
                return
            handler._payload_parser = parser  # noqa: SLF001
            self._reader, self._parser = queue, parser
        except AttributeError as exc:  # an aiohttp whose internals moved: the queue path still works
            log.debug("inline WebSocket dispatch unavailable: %s", exc)

    def inline(self, on_text: OnText | None) -> bool:
        """Hand text messages to `on_text` in the read callback from now on (None: stop).
        False if this socket cannot (then every message comes through `receive()`)."""
        queue = self._reader
        if not isinstance(queue, _InlineQueue):
            return False
        queue.on_text = on_text
        return True

    def send_str_now(self, text: str) -> bool:
        """Write a text message now, as `send_str` does when it need not wait (no compression, the
        peer reading); False, having written nothing, when it would wait or cannot (then await
        `send_str`). Counted in `sent_now`."""
        writer = self._writer
        try:
            if writer is None or writer.compress or writer._closing or writer.protocol._paused:  # noqa: SLF001
                return False
            writer._write_websocket_frame(text.encode("utf-8"), WSMsgType.TEXT, 0)  # noqa: SLF001
            if writer._output_size > writer._limit:  # noqa: SLF001 - as send_frame does; the next send waits if paused
                writer._output_size = 0  # noqa: SLF001
        except AttributeError:  # an aiohttp whose writer changed: the async path still works
            return False
        self.sent_now += 1
        return True

    sent_now = 0

    @property
    def inline_messages(self) -> int:
        """Text messages handled in the read callback so far."""
        queue = self._reader
        return queue.inline_messages if isinstance(queue, _InlineQueue) else 0
