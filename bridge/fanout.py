"""Call events out: observers (metrics, traces, turn timing) and RPC subscribers, on one node or, on a
cluster, through the shared event bus so every node's subscribers see every call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from bridge.calls import CallRecord
from bridge.store import SharedStore
from media.clock import Clock

log = logging.getLogger(__name__)

# Sees every call event (kind, call, extra fields) as it is published: metrics, traces, turn timing.
CallObserver = Callable[[str, CallRecord, dict[str, Any]], None]


class EventFanout:
    def __init__(self, shared: SharedStore | None, clock: Clock) -> None:
        self.shared = shared
        self.clock = clock
        self.observers: list[CallObserver] = []
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._bus: asyncio.Task[None] | None = None

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    async def start(self) -> None:
        """On a cluster: relay the shared bus to this node's subscribers."""
        if self.shared is not None:
            stream = await self.shared.subscribe()
            self._bus = asyncio.get_running_loop().create_task(self._relay_bus(self.shared, stream), name="event-bus")

    async def stop(self) -> None:
        if self._bus is not None:
            self._bus.cancel()
            await asyncio.gather(self._bus, return_exceptions=True)
            self._bus = None

    def publish(self, kind: str, call: CallRecord, **extra: Any) -> None:
        for observer in self.observers:
            try:
                observer(kind, call, extra)
            except Exception:  # noqa: BLE001 - monitoring must never break a call
                log.exception("call observer failed on %s", kind)
        if self.shared is not None:  # every node's subscribers get it from the bus, this node's too
            self.shared.publish({"type": kind, "callId": call.callId, "state": str(call.state), **extra})
            return
        if not self._subscribers:
            return
        self._fan_out({"type": kind, "callId": call.callId, "state": str(call.state), **extra})

    def _fan_out(self, message: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                log.warning("event subscriber too slow; dropping it")
                self._subscribers.discard(queue)

    async def _relay_bus(self, shared: SharedStore, stream: AsyncIterator[dict[str, Any]]) -> None:
        while True:
            try:
                async for message in stream:
                    self._fan_out(message)
                stream = await shared.subscribe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: resubscribe when it is back
                log.warning("event bus lost (%s); resubscribing", type(exc).__name__)
                await self.clock.sleep(0.5)
                try:
                    stream = await shared.subscribe()
                except Exception:  # noqa: BLE001, S112 - still away: the next round tries again
                    continue
