"""The kept-alive HTTP session of an engine that posts once or more per turn (chat model, TTS), and its pre-warm.

`warm(url)` sends a HEAD to the endpoint the turn will POST to while the call still rings. Any
answer (405 or 404: the method does not matter, and no key is sent with it) leaves a connection whose
TCP and TLS set-up is done in the session's keep-alive pool, so the greeting's or the first turn's
request takes it instead of paying for its own set-up (with a remote engine a new TLS connection
costs one to three round trips before the request is even sent).

One warm connection per ringing call at most: a HEAD takes an idle pooled connection when there
is one (calls ringing one after another share it) and opens a new one only when none is idle.
aiohttp closes a connection idle for longer than its keep-alive time (`KEEPALIVE_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

log = logging.getLogger(__name__)

KEEPALIVE_S = 30.0  # a call rings for up to ~30 s before its first request


class HttpPool:
    def __init__(self, timeout: aiohttp.ClientTimeout) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._warming: set[asyncio.Task[None]] = set()
        self.warmed = 0  # HEADs answered (any status)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
        return self._session

    def warm(self, url: str) -> None:
        """Open (or keep) a connection to `url`'s host in the pool, in the background."""
        task = asyncio.ensure_future(self._head(url))
        self._warming.add(task)
        task.add_done_callback(self._warming.discard)

    async def _head(self, url: str) -> None:
        try:
            async with self.session.head(url, allow_redirects=False) as response:
                await response.read()
            self.warmed += 1
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # the turn will connect by itself
            log.info("pre-warm of %s failed: %s", url.split("?", 1)[0], type(exc).__name__)

    async def close(self) -> None:
        for task in list(self._warming):
            task.cancel()
        for task in list(self._warming):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
