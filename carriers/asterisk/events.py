"""The ARI events WebSocket (`GET {url}/ari/events?app=APP`), kept open: reconnect with backoff.

Asterisk registers the Stasis application while this socket is open. A drop is logged and retried
forever (never raised); after a reconnect `on_reconnect` runs so the carrier can check the calls
it holds, whose events may have been lost meanwhile. The one exception: once another connection
took the application over (`ApplicationReplaced`: Asterisk gives one application to one WebSocket),
`give_up()` stops the reconnects, so two processes configured with one application name do not
take it from each other in turns.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from carriers.base import CarrierError

log = logging.getLogger("voicecall.asterisk")

BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 10.0


class AriEvents:
    def __init__(self, url: str, app: str, headers: dict[str, str],
                 on_event: Callable[[dict[str, Any]], None],
                 on_reconnect: Callable[[], Awaitable[None]]) -> None:
        self._url = f"{url}/ari/events"
        self._params = {"app": app}
        self._headers = headers
        self._on_event = on_event
        self._on_reconnect = on_reconnect
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._resyncs: set[asyncio.Task[None]] = set()
        self.connects = 0
        self.bad_messages = 0
        self.given_up = False

    async def start(self, timeout_s: float = 10.0) -> None:
        """Connect once (raise CarrierError if that fails), then keep the socket open in the background."""
        self._session = aiohttp.ClientSession(headers=self._headers)
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(first))
        try:
            await asyncio.wait_for(asyncio.shield(first), timeout_s)
        except CarrierError:
            await self.close()
            raise
        except TimeoutError:
            await self.close()
            raise CarrierError(f"asterisk: no events WebSocket from {self._url} within {timeout_s:.0f}s") from None

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed and not self.given_up

    def give_up(self) -> None:
        """Never reconnect again (the open socket stays as it is: Asterisk sends it nothing more)."""
        self.given_up = True

    async def close(self) -> None:
        for task in list(self._resyncs):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self, first: asyncio.Future[None]) -> None:
        assert self._session is not None
        backoff = BACKOFF_START_S
        while True:
            problem = ""
            try:
                async with self._session.ws_connect(self._url, params=self._params, heartbeat=20.0) as ws:
                    self._ws = ws
                    self.connects += 1
                    backoff = BACKOFF_START_S
                    if not first.done():
                        first.set_result(None)
                    else:
                        log.info("asterisk: events WebSocket reconnected")
                        task = asyncio.create_task(self._resync())
                        self._resyncs.add(task)
                        task.add_done_callback(self._resyncs.discard)
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            self._deliver(msg.data)
                        elif msg.type is aiohttp.WSMsgType.ERROR:
                            break
                    problem = f"closed by Asterisk (code {ws.close_code})"
            except aiohttp.WSServerHandshakeError as exc:
                problem = f"handshake refused: HTTP {exc.status}"
                if exc.status == 401:
                    problem += " (check asterisk.username / asterisk.password against ari.conf)"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                self._ws = None
            if not first.done():
                first.set_exception(CarrierError(f"asterisk: events WebSocket {self._url}: {problem}"))
                return
            if self.given_up:
                log.warning("asterisk: events WebSocket closed (%s); not reconnecting: the application is taken",
                            problem)
                return
            log.warning("asterisk: events WebSocket lost (%s); reconnecting in %.1fs", problem, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _deliver(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            self.bad_messages += 1
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.bad_messages += 1
            return
        try:
            self._on_event(event)
        except Exception:  # one bad event must not stop the stream of all calls
            log.exception("asterisk: handling %s failed", event.get("type"))

    async def _resync(self) -> None:
        try:
            await self._on_reconnect()
        except Exception:
            log.exception("asterisk: checking calls after reconnect failed")
