"""Node leases and failover: a node that stops renewing its lease has its live calls taken by a survivor.

One lease per node (`<prefix>:lease:<nodeId>`, expiring after `cluster.leaseSeconds`) rather than one
per call: a call record names its node, so "the node's lease is gone" is "the call's lease is gone",
at one key and one renewal per node instead of per call. Every node sweeps the live-call set; the
first survivor to `SET NX` a call's claim key takes it over: it writes itself as the owner, and asks
the carrier for a new media stream (Twilio, Telnyx: the call carries on with its transcript) or ends
the call there once (one hang-up, one report, the slot freed). A call whose media came back to a
survivor first (bridge/cluster/handover.py, same claim key) names its new node by then and is left alone.
"""

from __future__ import annotations

import logging
from typing import Protocol

from bridge.calls import CallRecord
from bridge.cluster.handover import claim
from bridge.cluster.redis_store import TRANSIENT, RedisStore, VersionConflict
from bridge.tasks import BackgroundTasks
from media.clock import Clock, TimerHandle

log = logging.getLogger(__name__)

ATTEMPTS = 5


class OrphanHost(Protocol):
    """The call manager, for a dead node's call this node now owns."""

    def adopt(self, record: CallRecord) -> CallRecord: ...

    async def resume_orphan(self, call: CallRecord) -> bool:
        """A new media stream from the carrier (True), or the call ended at the carrier (False)."""
        ...


class Failover:
    def __init__(self, store: RedisStore, node_id: str, lease_s: float, clock: Clock, host: OrphanHost) -> None:
        self.store = store
        self.node_id = node_id
        self.lease_s = lease_s
        self.clock = clock
        self._host = host
        self._tasks = BackgroundTasks(log)
        self._timer: TimerHandle | None = None
        self.taken_over: list[str] = []
        self.reattached: list[str] = []  # of those, the ones the carrier gave a new stream

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
        log.warning("call %s: node %s is gone (lease expired); taking the call over", record.callId, owner)
        for _ in range(ATTEMPTS):
            record.metadata["failover"] = {"from": owner, "by": self.node_id}
            record.metadata["node"] = self.node_id
            try:
                await self.store.save(record, expected_version=version)
                break
            except VersionConflict:  # the record moved meanwhile: take the newest version
                loaded = await self.store.load(record.callId)
                if loaded is None or loaded[0].terminal:
                    return
                record, version = loaded
        else:
            return
        call = self._host.adopt(record)
        if await self._host.resume_orphan(call):
            self.reattached.append(call.callId)
        self.taken_over.append(call.callId)
