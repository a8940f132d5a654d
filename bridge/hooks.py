"""Delivery of after-call reports to `hooks.callEnded`: from the persistent outbox, signed, retried.

Every report is in the outbox (fsync'd) before the first attempt, and is marked done only after a
2xx, so a crash or restart anywhere in between loses nothing: on start the pending entries are
sent again, keeping their delivery id (at-least-once on the wire; a receiver that dedupes on
X-Voicecall-Delivery sees each report exactly once). Failures back off exponentially on the
injectable clock: retryBaseMs, doubling per attempt, capped at retryMaxMs, up to maxAttempts.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bridge.config import CallEndedHook
from bridge.outbox import COMPACT_BYTES, Outbox, Pending
from bridge.report import DELIVERY_HEADER, EVENT, EVENT_HEADER, SIGNATURE_HEADER, encode, signature
from bridge.tasks import BackgroundTasks
from media.clock import Clock

log = logging.getLogger(__name__)


class ReportSender:
    def __init__(self, hook: CallEndedHook, store_dir: Path, clock: Clock) -> None:
        self.hook = hook
        self.outbox = Outbox(store_dir)
        self._clock = clock
        self._secret = hook.secret.get_secret_value()
        self._where = urlsplit(hook.url).netloc  # for logs: never the query (it may hold a token)
        self._tasks = BackgroundTasks(log)
        self._session: aiohttp.ClientSession | None = None
        self._adding: set[asyncio.Future[None]] = set()  # outbox writes: finished, never cancelled, on close
        self._closing = False
        self._inflight: set[str] = set()
        self.attempts = 0  # POSTs started
        self.delivered = 0
        self.failures = 0

    async def start(self) -> None:
        await asyncio.to_thread(self.outbox.repair)
        await asyncio.to_thread(self.outbox.compact)
        pending = await asyncio.to_thread(self.outbox.pending)
        for entry in pending:
            log.info("after-call report %s still pending from before; delivering", entry.id)
            self._tasks.spawn(self._deliver(entry), f"report-{entry.id}")

    def submit(self, report: dict[str, Any]) -> None:
        """Queue a report: written to the outbox (in a thread), then delivered."""
        task = asyncio.ensure_future(self._enqueue(report))
        self._adding.add(task)
        task.add_done_callback(self._adding.discard)

    async def _enqueue(self, report: dict[str, Any]) -> None:
        entry = Pending(str(report["deliveryId"]), encode(report).decode(), self._clock.time())
        try:
            await asyncio.to_thread(self.outbox.add, entry)
        except OSError as exc:
            log.error("after-call report %s not queued: %s", entry.id, exc)
            return
        if not self._closing:
            self._tasks.spawn(self._deliver(entry), f"report-{entry.id}")

    async def _deliver(self, entry: Pending) -> None:
        hook = self.hook
        self._inflight.add(entry.id)
        while True:
            wait = entry.next_at - self._clock.time()
            if wait > 0:
                await self._clock.sleep(wait)
            self.attempts += 1
            problem = await self._post(entry)
            if problem is None:
                await asyncio.to_thread(self.outbox.done, entry.id)
                self.delivered += 1
                self._inflight.discard(entry.id)
                if not self._inflight and not self._adding:
                    await asyncio.to_thread(self.outbox.compact, larger_than=COMPACT_BYTES)
                return
            self.failures += 1
            entry.attempts += 1
            if entry.attempts >= hook.maxAttempts:
                log.warning("after-call report %s to %s given up after %d attempts (%s)", entry.id, self._where,
                            entry.attempts, problem)
                await asyncio.to_thread(self.outbox.dead, entry.id)
                self._inflight.discard(entry.id)
                return
            backoff_ms = min(hook.retryMaxMs, hook.retryBaseMs * 2 ** (entry.attempts - 1))
            entry.next_at = self._clock.time() + backoff_ms / 1000
            log.info("after-call report %s to %s failed (%s); retry %d in %.1f s", entry.id, self._where, problem,
                     entry.attempts, backoff_ms / 1000)
            await asyncio.to_thread(self.outbox.attempted, entry)

    async def _post(self, entry: Pending) -> str | None:
        """None on a 2xx, else what went wrong (one line, no secrets)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        body = entry.body.encode()
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: EVENT,
            DELIVERY_HEADER: entry.id,
            SIGNATURE_HEADER: signature(self._secret, int(self._clock.time()), body),
        }
        timeout = aiohttp.ClientTimeout(total=self.hook.timeoutMs / 1000)
        try:
            async with self._session.post(self.hook.url, data=body, headers=headers, timeout=timeout) as resp:
                await resp.read()
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return type(exc).__name__

    async def drain(self) -> None:
        while self._adding:
            await asyncio.gather(*list(self._adding))
        await self._tasks.drain()

    async def close(self) -> None:
        self._closing = True
        while self._adding:
            await asyncio.gather(*list(self._adding))
        await self._tasks.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
