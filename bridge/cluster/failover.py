"""Node leases and failover: a node that stops renewing its lease has its live calls ended by a survivor.

One lease per node (`<prefix>:lease:<nodeId>`, expiring after `cluster.leaseSeconds`) rather than one
per call: a call record names its node, so "the node's lease is gone" is "the call's lease is gone",
at one key and one renewal per node instead of per call. Every node sweeps the live-call set; the
first survivor to `SET NX` a call's claim key ends it at the carrier, so the hang-up happens once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from bridge.calls import CallRecord, CallState
from bridge.cluster.handover import claim
from bridge.cluster.redis_store import TRANSIENT, RedisStore, VersionConflict
from bridge.tasks import BackgroundTasks
from media.clock import Clock, TimerHandle

log = logging.getLogger(__name__)

Hangup = Callable[[CallRecord], Awaitable[None]]
Announce = Callable[[CallRecord], None]


class Failover:
    def __init__(self, store: RedisStore, node_id: str, lease_s: float, clock: Clock,
                 hangup: Hangup, announce: Announce) -> None:
        self.store = store
        self.node_id = node_id
        self.lease_s = lease_s
        self.clock = clock
        self._hangup = hangup
        self._announce = announce
        self._tasks = BackgroundTasks(log)
        self._timer: TimerHandle | None = None
        self.taken_over: list[str] = []

    def lease_key(self, node_id: str) -> str:
        return f"{self.store.keys.prefix}:lease:{node_id}"

    async def start(self) -> None:
        await self._renew()
        self._schedule()

    async def close(self, *, release: bool = True) -> None:
        """`release`: drop the lease now, so survivors take this node's remaining calls at once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._tasks.cancel()
        if release:
            try:
                await self.store.redis.delete(self.lease_key(self.node_id))
            except TRANSIENT:
                pass  # it expires on its own

    def _schedule(self) -> None:
        self._timer = self.clock.call_later(self.lease_s / 3, self._tick)

    def _tick(self) -> None:
        self._tasks.spawn(self.round(), "lease-round")
        self._schedule()

    async def round(self) -> None:
        """Renew our lease, then end the live calls of nodes whose lease is gone."""
        try:
            await self._renew()
            await self.sweep()
        except TRANSIENT as exc:
            log.warning("lease round skipped: redis unavailable (%s)", type(exc).__name__)

    async def _renew(self) -> None:
        await self.store.redis.set(self.lease_key(self.node_id), "1", px=int(self.lease_s * 1000))

    async def sweep(self) -> list[str]:
        ended: list[str] = []
        for call_id in sorted(str(m) for m in await self.store.redis.smembers(self.store.keys.live)):
            loaded = await self.store.load(call_id)
            if loaded is None:
                continue
            record, version = loaded
            owner = record.metadata.get("node")
            if not owner or owner == self.node_id or record.terminal:
                continue
            if await self.store.redis.exists(self.lease_key(str(owner))):
                continue
            if not await claim(self.store, call_id, str(owner), self.node_id):
                continue  # another survivor has it (or took it over when its media came back)
            await self._take_over(record, version, str(owner))
            ended.append(call_id)
        return ended

    async def _take_over(self, record: CallRecord, version: int, owner: str) -> None:
        log.warning("call %s: node %s is gone (lease expired); ending the call", record.callId, owner)
        await self._hangup(record)
        record.state = CallState.HANGUP_BOT
        record.endedAt = self.clock.time()
        record.endReason = CallState.HANGUP_BOT.value
        record.metadata["failover"] = {"from": owner, "by": self.node_id}
        try:
            await self.store.save(record, expected_version=version)
        except VersionConflict:  # the record moved meanwhile: write the end over the newest version
            await self.store.update(record.callId, lambda r: _mark_ended(r, record))
        self.taken_over.append(record.callId)
        self._announce(record)


def _mark_ended(target: CallRecord, ended: CallRecord) -> None:
    target.state = ended.state
    target.endedAt = ended.endedAt
    target.endReason = ended.endReason
    target.metadata["failover"] = ended.metadata["failover"]
