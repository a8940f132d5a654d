"""A `websockets` client connection that reads and writes whole text messages without a task hop.

`websockets` parses frames in the protocol's `data_received` and puts them on a queue that the
reading task's `recv()` wakes up for, once per message; `send()` is a coroutine, so each message
from synchronous code needs a task to await it. A realtime model sends an audio delta every
20-100 ms per call and takes the caller's audio every 40 ms: those hand-offs were a quarter of the
bridge's event-loop work at 20 speech-to-speech calls (py-spy, bench/README.md).

- `on_text(data)` takes a complete, unfragmented text message (UTF-8 bytes) straight from the
  parser while nothing is queued ahead of it; everything else (fragments, binary, control frames,
  messages behind a queued one) goes through the queue and `recv()`, in order.
- `write_now(data)` writes one text (or binary) message at once when the socket is open and not
  applying back-pressure; False means "use `send()`" (the caller queues it), so flow control stays.

Used by the realtime model connection (bridge/realtime/connection.py) and the streaming STT
sessions (media/stt/socket_session.py: the caller's audio, 50 messages a second per call).

Both lean on `websockets.asyncio` internals (`recv_messages.frames`, `paused`, `send_data`); where
they have moved, `inline_ok` is False and the plain `recv()` / `send()` paths carry everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import State

log = logging.getLogger(__name__)


class InlineClientConnection(ClientConnection):
    on_text: Callable[[bytes], None] | None = None
    inline_messages = 0
    written_now = 0

    @property
    def inline_ok(self) -> bool:
        frames = getattr(getattr(self, "recv_messages", None), "frames", None)
        return (frames is not None and hasattr(frames, "__len__") and hasattr(self, "paused")
                and callable(getattr(self, "send_data", None)))

    def process_event(self, event: Any) -> None:
        on_text = self.on_text
        if (on_text is not None and self.response is not None and isinstance(event, Frame)
                and event.opcode is Opcode.TEXT and event.fin and not len(self.recv_messages.frames)):
            self.inline_messages += 1
            try:
                on_text(bytes(event.data))
            except Exception:  # called from data_received, which must not raise
                log.exception("realtime message handler failed")
            return
        super().process_event(event)

    def write_now(self, data: bytes, *, text: bool = True) -> bool:
        if self.protocol.state is not State.OPEN or self.paused:
            return False
        if text:
            self.protocol.send_text(data)
        else:
            self.protocol.send_binary(data)
        try:
            self.send_data()
        except Exception as exc:  # noqa: BLE001 - as websockets' own send path: the connection ends
            self.set_connection_exc(exc)
        self.written_now += 1
        return True
