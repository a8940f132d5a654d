"""What a streaming STT session over a WebSocket needs whatever the provider: connect in the
background (start waits for the first connection up to the connect timeout), reconnect with
exponential backoff, give up on an authentication failure or after `max_retries`, one sender and one
receiver per connection, and events delivered so that a listener's bug never kills the session.

A provider's session says how to connect (`_connect`), what to send first (`_opened`), how to send
its queued audio (`_send_loop`) and what a received message means (`_receive`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from media.stt.base import SttEvent, SttSession

log = logging.getLogger(__name__)


class WebSocketSttSession(SttSession):
    provider = "STT"  # in log lines: "Deepgram STT", "OpenAI Realtime STT"

    def __init__(self, on_event: Callable[[SttEvent], None], *, connect_timeout_s: float, max_retries: int,
                 backoff_s: float, task_name: str) -> None:
        self._on_event = on_event
        self._connect_timeout_s = connect_timeout_s
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._task_name = task_name
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self.connects = 0
        self.sent_bytes = 0
        self._ws: Any = None  # the open socket, for writes without the sender task (media/ws_client.py)

    def rebind(self, on_event: Callable[[SttEvent], None]) -> None:
        """Deliver events to a new listener (a session opened ahead of the call, then adopted)."""
        self._on_event = on_event

    @property
    def socket(self) -> Any:
        """The open WebSocket (None between connections)."""
        return self._ws

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        """Connects in the background; waits for the first connection up to the connect timeout."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._task_name)
            self._started()
        waiter = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait({waiter, self._task}, timeout=self._connect_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    def _started(self) -> None:
        """The connection task is running (a hook: Deepgram arms its KeepAlive timer)."""

    async def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    @abstractmethod
    def _connect(self) -> Any:
        """`websockets.connect(...)` for this provider (URL, auth headers, limits)."""

    async def _opened(self, ws: Any) -> None:
        """Just connected: what the provider wants first (a session set-up message)."""

    @abstractmethod
    async def _send_loop(self, ws: Any) -> None:
        """Send queued audio and control messages; what a failed send took is queued again."""

    @abstractmethod
    def _receive(self, raw: str | bytes) -> None:
        """One message from the provider (an exception drops the connection: it is reconnected)."""

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            try:
                async with self._connect() as ws:
                    await self._opened(ws)
                    self.connects += 1
                    failures = 0
                    self._connected.set()
                    await self._pump(ws)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a transport error leads to a reconnect
                status = getattr(getattr(exc, "response", None), "status_code", None)
                detail = f"HTTP {status}" if status else type(exc).__name__
                if status in (401, 403):
                    log.error("%s: authentication failed (%s); not retrying", self.provider, detail)
                    self._emit(SttEvent("error", f"authentication failed ({detail})"))
                    return
                log.warning("%s connection lost: %s", self.provider, detail)
            if self._closing:
                return
            failures += 1
            if failures > self._max_retries:
                log.error("%s: giving up after %d reconnect attempts", self.provider, self._max_retries)
                self._emit(SttEvent("error", "transcription unavailable"))
                return
            await asyncio.sleep(self._backoff_s * 2 ** (failures - 1))

    def _write_now(self, data: bytes, *, text: bool) -> bool:
        """Write one message on the open socket at once (nothing may be queued ahead of it: the caller
        checks); False: queue it for the send loop (no socket, back-pressure, or a plain connection)."""
        write_now = getattr(self._ws, "write_now", None)  # media/ws_client.py's connection (imported lazily)
        return write_now is not None and bool(write_now(data, text=text))

    async def _pump(self, ws: Any) -> None:
        sender = asyncio.create_task(self._send_loop(ws))
        self._ws = ws
        try:
            async for raw in ws:
                self._receive(raw)
        finally:
            self._ws = None
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    def _emit(self, event: SttEvent) -> None:
        try:
            self._on_event(event)
        except Exception:  # a listener bug must not kill the transcription session
            log.exception("STT event handler failed")
