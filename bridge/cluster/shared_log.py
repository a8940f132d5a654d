"""The manager's store on Redis: sync `append`/`publish` feed one ordered writer task per node.

The manager's event path is sync (DESIGN: process_event never awaits), so writes are queued and a
single task sends them in order; a write that fails while Redis is away is retried (on the
injectable clock) until it lands, so a Redis restart loses no record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bridge.calls import CallRecord
from bridge.cluster.redis_store import TRANSIENT, RedisStore
from bridge.store import Replay
from media.clock import Clock, RealClock

log = logging.getLogger(__name__)

RETRY_S = 0.5

Write = Callable[[], Awaitable[Any]]


class SharedCallLog:
    def __init__(self, store: RedisStore, node_id: str, *, clock: Clock | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self.clock: Clock = clock or RealClock()
        self._queue: asyncio.Queue[Write | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.writes = 0  # Redis commands sent by the writer (the measured cost per call)
        self.last_error: str | None = None  # set while a write is being retried (Redis away)
        self.write_failures = 0

    @property
    def degraded(self) -> bool:
        return self.last_error is not None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def open(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._run(), name="redis-writer")

    def append(self, record: CallRecord) -> bool:
        if record.metadata.get("node") not in (None, self.node_id):
            return True  # a call another node took over: that node writes it now
        snapshot = CallRecord.from_json(record.to_json())  # the record keeps changing after this call
        self._queue.put_nowait(lambda: self.store.save(snapshot))
        return True  # queued: the writer retries until Redis has it

    def flush(self) -> bool:
        return not self.degraded

    def publish(self, message: dict[str, Any]) -> None:
        self._queue.put_nowait(lambda: self.store.publish(message))

    async def load(self) -> Replay:
        """This node's calls only: another node's live calls are that node's to carry (and end)."""
        replay = await self.store.replay()
        replay.calls = {k: v for k, v in replay.calls.items() if v.metadata.get("node") in (None, self.node_id)}
        return replay

    async def reserve(self, call_id: str, limit: int) -> bool:
        return await self.store.reserve(call_id, limit)

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        return await self.store.subscribe()

    async def drain(self) -> None:
        await self._queue.join()

    def close(self) -> None:
        """Sync close (the Store interface): the writer stops after what is queued; `aclose` waits."""
        if self._writer is not None:
            self._queue.put_nowait(None)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer
            self._writer = None
        await self.store.close()

    async def _run(self) -> None:
        while True:
            write = await self._queue.get()
            try:
                if write is None:
                    return
                await self._send(write)
            finally:
                self._queue.task_done()

    async def _send(self, write: Write) -> None:
        while True:
            try:
                await write()
                self.writes += 1
                self.last_error = None
                return
            except TRANSIENT as exc:
                self.last_error = type(exc).__name__
                self.write_failures += 1
                log.warning("redis write failed (%s); retrying in %.1fs", type(exc).__name__, RETRY_S)
                await self.clock.sleep(RETRY_S)
