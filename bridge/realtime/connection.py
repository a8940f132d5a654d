"""The asyncio edge of a realtime session: one WebSocket at a time (two during a goAway hand-over).

- `start()` connects in the background (pre-warm: while the call still rings); `wait_ready()`.
- `send()` / `send_audio()` are sync and never block: messages queue in order and one sender
  task writes them to the current socket; queued audio is capped (oldest audio dropped first).
- A dropped socket reconnects with exponential backoff on the injectable clock; the protocol's
  `opening()` carries the newest resumption handle (Gemini). After `max_retries` failures in a
  row `on_failed(reason)` is called once and the session stops.
- `GoAway`: a replacement socket opens at once; when it is ready, sends move to it while the old
  one keeps delivering what it still has until the server closes it (no gap in the model's audio).
- Per message, no task hop either way where the socket allows it (`media/ws_client.py`): server messages
  are handled in the read callback, and a send with nothing queued ahead is written at once; the
  caller's audio goes up as prebuilt JSON bytes (`protocol.audio_json`), parsed with orjson when
  installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.realtime import events as ev
from media.clock import Clock, RealClock
from media.fastjson import loads as _loads
from media.logsafe import quiet_logger
from media.ws_client import InlineClientConnection

log = logging.getLogger(__name__)

COALESCE_BYTES = 16000  # after a backlog, up to this much audio per message


class RealtimeProtocol(Protocol):
    name: str
    url: str
    headers: dict[str, str]
    wire_passthrough: bool
    reports_speech_end: bool  # sends SpeechStopped (else the bridge's VAD dates the caller's end of speech)
    input_rate: int
    output_rate: int

    def opening(self) -> list[dict[str, Any]]: ...
    def handle(self, msg: dict[str, Any]) -> list[ev.RealtimeEvent]: ...
    def audio(self, chunk: bytes) -> dict[str, Any]: ...
    def audio_json(self, chunk: bytes) -> bytes: ...
    def link_lost(self) -> None: ...
    def items_lost(self, item_ids: set[str]) -> None: ...
    def set_wire(self, wire: Any) -> list[dict[str, Any]]: ...
    def decode_output(self, audio: bytes) -> bytes: ...
    def say(self, text: str, tag: str) -> list[dict[str, Any]]: ...
    def tool_result(self, call_id: str, name: str, output: str) -> list[dict[str, Any]]: ...
    def user_text(self, text: str) -> list[dict[str, Any]]: ...
    def truncate(self, item_id: str, audio_end_ms: int) -> list[dict[str, Any]]: ...
    def cancel(self) -> list[dict[str, Any]]: ...


class _AuthFailed(Exception):
    pass


@dataclass(eq=False)
class _Link:
    ws: Any
    ready: asyncio.Future[None]
    go_away: asyncio.Future[float]
    reader: asyncio.Task[None] | None = None
    retired: bool = False
    inline: bool = False  # messages go both ways without a task hop (media/ws_client.py)
    items: set[str] = field(default_factory=set)  # audio items this socket delivered


class RealtimeConnection:
    def __init__(
        self,
        protocol: RealtimeProtocol,
        *,
        clock: Clock | None = None,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        connect_timeout_s: float = 10.0,
        max_backlog_bytes: int = 160_000,
    ) -> None:
        self.protocol = protocol
        self._clock: Clock = clock or RealClock()
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.max_backlog_bytes = max_backlog_bytes
        self._on_event: Callable[[ev.RealtimeEvent], None] | None = None
        self._early: list[ev.RealtimeEvent] = []  # events before a listener was attached (pre-warm)
        self.on_failed: Callable[[str], None] | None = None
        self._queue: deque[dict[str, Any] | bytes] = deque()
        self._audio_queued = 0
        self._wake = asyncio.Event()
        self._new_link = asyncio.Event()
        self._link: _Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._closing = False
        self.ready = asyncio.Event()
        self.failed: str | None = None
        self.connects = 0
        self.handovers = 0
        self.dropped_audio_bytes = 0
        self.sent_audio_bytes = 0
        self.ready_at: float | None = None  # clock.monotonic() when first ready

    # ------------------------------------------------------------------ public

    def listen(self, on_event: Callable[[ev.RealtimeEvent], None]) -> None:
        self._on_event = on_event
        early, self._early = self._early, []
        for event in early:
            self._dispatch(event)

    @property
    def socket(self) -> Any:
        """The current WebSocket (None while connecting)."""
        return self._link.ws if self._link is not None else None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"realtime-{self.protocol.name}")
            self._sender = asyncio.create_task(self._send_loop(), name=f"realtime-{self.protocol.name}-send")

    async def wait_ready(self, timeout: float) -> bool:
        if self.ready.is_set():
            return True
        self.start()
        waiter = asyncio.ensure_future(self.ready.wait())
        assert self._task is not None
        try:
            await self._clock.wait_for(_first(waiter, self._task), timeout)
        except TimeoutError:
            pass
        finally:
            waiter.cancel()
        return self.ready.is_set()

    def send(self, messages: list[dict[str, Any]]) -> None:
        if self._closing or self.failed:
            return
        for i, message in enumerate(messages):
            if not self._write_now(json.dumps(message).encode()):
                self._queue.extend(messages[i:])
                self._wake.set()
                return

    def send_audio(self, chunk: bytes) -> None:
        if not chunk or self._closing or self.failed:
            return
        if self._write_now(self.protocol.audio_json(chunk), chunk):
            return
        self._queue.append(chunk)
        self._audio_queued += len(chunk)
        if self._audio_queued > self.max_backlog_bytes:
            self._drop_old_audio()
        self._wake.set()

    def _write_now(self, data: bytes, audio: bytes | None = None) -> bool:
        """Write `data` on the current socket at once if nothing is queued ahead of it (order) and the
        socket takes it without back-pressure; False: the caller queues it for the send loop."""
        link = self._link
        if self._queue or link is None or not isinstance(link.ws, InlineClientConnection) or not link.inline:
            return False
        if not link.ws.write_now(data):
            return False
        if audio is not None:
            self.sent_audio_bytes += len(audio)
        return True

    async def close(self) -> None:
        self._closing = True
        tasks = [t for t in (self._task, self._sender, *self._retiring) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._link is not None:
            await self._close_link(self._link)

    # ------------------------------------------------------------------ connecting

    async def _run(self) -> None:
        failures = 0
        link: _Link | None = None
        while not self._closing:
            if link is None:
                try:
                    link = await self._open()
                except asyncio.CancelledError:
                    raise
                except _AuthFailed as exc:
                    self._fail(str(exc))
                    return
                except Exception as exc:  # noqa: BLE001 - any transport failure leads to a retry
                    failures += 1
                    log.warning("%s realtime: connect failed (%s), attempt %d", self.protocol.name, _describe(exc), failures)
                    if failures > self.max_retries:
                        self._fail(f"could not reconnect after {self.max_retries} attempts ({_describe(exc)})")
                        return
                    await self._clock.sleep(self.backoff_s * 2 ** (failures - 1))
                    continue
                failures = 0
                self._set_link(link)
            link = await self._serve(link)
            if link is None and not self._closing:
                self._link = None
                log.warning("%s realtime: connection lost; reconnecting", self.protocol.name)
                self.protocol.link_lost()
                self._dispatch(ev.LinkLost())

    async def _open(self) -> _Link:
        import websockets

        try:
            ws = await websockets.connect(self.protocol.url, additional_headers=self.protocol.headers,
                                          open_timeout=self.connect_timeout_s, max_size=2**24, compression=None,
                                          logger=quiet_logger("bridge.realtime.ws"),
                                          create_connection=InlineClientConnection)
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise _AuthFailed(f"authentication failed (HTTP {status})") from None
            raise
        loop = asyncio.get_running_loop()
        link = _Link(ws, loop.create_future(), loop.create_future())
        try:
            for message in self.protocol.opening():
                await ws.send(json.dumps(message))
            if isinstance(ws, InlineClientConnection) and ws.inline_ok:
                link.inline = True
                ws.on_text = lambda data: self._message(link, data)
            link.reader = asyncio.create_task(self._read(link))
            await self._clock.wait_for(_first(link.ready, link.reader), self.connect_timeout_s)
            if not link.ready.done():
                raise ConnectionError("closed before the session was ready")
        except BaseException:
            await self._close_link(link)
            raise
        self.connects += 1
        return link

    async def _serve(self, link: _Link) -> _Link | None:
        """Until `link` ends: None (lost), or the replacement that took over after a goAway."""
        assert link.reader is not None
        replacement: asyncio.Task[_Link] | None = None
        while True:
            wait: set[asyncio.Future[Any]] = {link.reader}
            if replacement is None:
                wait.add(link.go_away)
            else:
                wait.add(replacement)
            await asyncio.wait(wait, return_when=asyncio.FIRST_COMPLETED)
            if replacement is None and link.go_away.done():
                log.info("%s realtime: goAway (%.1f s left); opening the resumed session", self.protocol.name,
                         link.go_away.result())
                replacement = asyncio.create_task(self._open())
                continue
            if replacement is not None and (replacement.done() or link.reader.done()):
                try:
                    new = await replacement
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    log.warning("%s realtime: resumed session failed (%s)", self.protocol.name, _describe(exc))
                    replacement = None
                    if link.reader.done():
                        return None
                    continue
                self.handovers += 1
                self._set_link(new)
                self._retire(link, link.go_away.result())
                return new
            if link.reader.done():
                return None

    def _set_link(self, link: _Link) -> None:
        self._link = link
        self._new_link.set()
        if not self.ready.is_set():
            self.ready_at = self._clock.monotonic()
            self.ready.set()

    def _retire(self, link: _Link, time_left: float) -> None:
        """Let the old socket deliver the rest of what it has, then close it."""
        link.retired = True

        async def retire() -> None:
            assert link.reader is not None
            with contextlib.suppress(TimeoutError, Exception):
                await self._clock.wait_for(asyncio.shield(link.reader), max(time_left, 0.0) + 1.0)
            await self._close_link(link)
            # a reply the old socket had not finished will not continue on the new one
            self.protocol.items_lost(link.items)
            for item in link.items:
                self._dispatch(ev.AudioDone(item))

        task = asyncio.create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_link(self, link: _Link) -> None:
        if link.reader is not None and not link.reader.done():
            link.reader.cancel()
        with contextlib.suppress(Exception):
            await link.ws.close()

    async def _read(self, link: _Link) -> None:
        """Messages the read callback did not take (all of them when the socket is not inline), until the
        socket ends."""
        try:
            async for raw in link.ws:
                self._message(link, raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken socket ends this link; _run decides what next
            log.info("%s realtime: socket ended (%s)", self.protocol.name, _describe(exc))

    def _message(self, link: _Link, raw: str | bytes) -> None:
        try:
            msg = _loads(raw)
            if not isinstance(msg, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            log.warning("%s realtime: unreadable server message ignored (%s)", self.protocol.name, exc)
            return
        for event in self.protocol.handle(msg):
            if isinstance(event, ev.Ready):
                if not link.ready.done():
                    link.ready.set_result(None)
            elif isinstance(event, ev.GoAway):
                if not link.go_away.done() and not link.retired:
                    link.go_away.set_result(event.time_left_s)
            else:
                if isinstance(event, ev.AudioOut):
                    link.items.add(event.item_id)
                self._dispatch(event)

    # ------------------------------------------------------------------ sending

    async def _send_loop(self) -> None:
        while not self._closing:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            link = self._link
            if link is None or link.ws.state.name != "OPEN":
                self._new_link.clear()
                if self._link is link:
                    await self._new_link.wait()
                continue
            item = self._queue.popleft()
            if isinstance(item, bytes):
                parts = [item]
                size = len(item)
                while self._queue and isinstance(self._queue[0], bytes) and size < COALESCE_BYTES:
                    nxt = self._queue.popleft()
                    assert isinstance(nxt, bytes)
                    parts.append(nxt)
                    size += len(nxt)
                data = b"".join(parts)
                self._audio_queued -= size
                text = self.protocol.audio_json(data).decode()
            else:
                text = json.dumps(item)
            try:
                await link.ws.send(text)
                if isinstance(item, bytes):
                    self.sent_audio_bytes += len(data)
            except Exception:  # noqa: BLE001 - resend on the next socket
                if isinstance(item, bytes):
                    self._queue.appendleft(data)
                    self._audio_queued += len(data)
                else:
                    self._queue.appendleft(item)
                self._new_link.clear()
                if self._link is link:
                    await self._new_link.wait()

    def _drop_old_audio(self) -> None:
        kept: deque[dict[str, Any] | bytes] = deque()
        for item in self._queue:
            if isinstance(item, bytes) and self._audio_queued > self.max_backlog_bytes:
                self._audio_queued -= len(item)
                self.dropped_audio_bytes += len(item)
            else:
                kept.append(item)
        self._queue = kept

    # ------------------------------------------------------------------ events

    def _dispatch(self, event: ev.RealtimeEvent) -> None:
        if self._on_event is None:
            self._early.append(event)
            return
        try:
            self._on_event(event)
        except Exception:  # a listener bug must not kill the session
            log.exception("realtime event handler failed")

    def _fail(self, reason: str) -> None:
        if self.failed:
            return
        self.failed = reason
        log.error("%s realtime session failed: %s", self.protocol.name, reason)
        if self.on_failed is not None:
            self.on_failed(reason)


def _first(*futures: asyncio.Future[Any]) -> asyncio.Future[None]:
    """A plain future done when any of `futures` is (the fake clock's wait_for needs a plain one)."""
    out: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(_: asyncio.Future[Any]) -> None:
        if not out.done():
            out.set_result(None)

    for future in futures:
        future.add_done_callback(done)
    return out


def _describe(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status else (type(exc).__name__ + (f": {exc}" if str(exc) else ""))[:200]
