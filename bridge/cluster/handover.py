"""Moving a call's ownership to this node: the node that accepts a call's media carries its voice.

A call record names its owner (`metadata.node`). When a media stream (or, after a node died, a
webhook) for a call reaches another node, that node takes the call over:
- the owner is alive: it is asked to release the call (`cluster.release`); it agrees only when it
  holds no media for it, forgets the call (timers, waiting turns) and flushes its writes first;
- the owner is gone (no one on its channel, silent, or shutting down): the first node to `SET NX`
  the claim key `<prefix>:claim:<callId>:<owner>` takes it (the failover sweep uses the same key, so
  a dead node's call is taken or ended once, never both);
then the new owner is written with a version check (no lost update) and the call is adopted in memory.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bridge.calls import CallRecord
from bridge.cluster.errors import NodeUnreachable, RouteError
from bridge.cluster.redis_store import TRANSIENT, RedisStore, VersionConflict
from bridge.cluster.router import ClusterRouter
from media.clock import Clock

log = logging.getLogger(__name__)

RELEASE_METHOD = "cluster.release"
RELEASE_TIMEOUT_S = 5.0
CLAIM_TTL_S = 86_400
ATTEMPTS = 5
MOVE_POLL_S = 0.1
CLAIM_WAIT_S = 0.2  # another node holds the claim: its owner write follows within a round trip or two


class OwnershipHost(Protocol):
    """What the call manager does for a move: let a call go, or take one in."""

    def release(self, call_id: str) -> bool:
        """Forget a call another node takes over; False (and nothing changes) while it has media here."""
        ...

    def adopt(self, record: CallRecord) -> CallRecord:
        """Carry a call (already written as this node's in Redis) from now on; returns the live record."""
        ...


def claim_key(store: RedisStore, call_id: str, owner: str) -> str:
    return f"{store.keys.prefix}:claim:{call_id}:{owner}"


async def claim(store: RedisStore, call_id: str, owner: str, node_id: str) -> bool:
    """True for the one node that takes over `owner`'s call `call_id` after `owner` went away."""
    return bool(await store.redis.set(claim_key(store, call_id, owner), node_id, nx=True, ex=CLAIM_TTL_S))


class Handover:
    def __init__(self, store: RedisStore, router: ClusterRouter, host: OwnershipHost, clock: Clock,
                 flush: Callable[[], Awaitable[None]]) -> None:
        """`flush`: waits until this node's queued writes are in Redis (before it answers a release)."""
        self.store = store
        self._flush = flush
        self.router = router
        self.host = host
        self.clock = clock
        self.node_id = router.node_id
        self.taken: list[tuple[str, str]] = []  # (call id, previous owner), for tests and logs
        router.internal[RELEASE_METHOD] = self._on_release

    async def _on_release(self, params: dict[str, Any]) -> dict[str, Any]:
        released = self.host.release(str(params.get("callId") or ""))
        await self._flush()
        return {"released": released}

    async def wait_moved(self, call_ids: list[str], timeout_s: float) -> list[str]:
        """At shutdown: wait until these calls name another node (or ended); the ones still here."""
        deadline = self.clock.monotonic() + timeout_s
        left = list(call_ids)
        while left:
            try:
                records = await self.store.load_many(left)
            except TRANSIENT:
                return left
            left = [r.callId for r in records if not r.terminal and r.metadata.get("node") == self.node_id]
            if not left or self.clock.monotonic() >= deadline:
                break
            await self.clock.sleep(MOVE_POLL_S)
        if left:
            log.warning("%d call(s) not re-attached elsewhere before shutdown; survivors end them", len(left))
        return left

    async def take_for_stream(self, provider: str, provider_call_id: str | None, call_id: str | None,
                              token: str | None) -> bool:
        """A media stream's `start` for a call this node does not carry: checked like a local one (the
        call's provider and per-call token, constant time) before the call moves here."""
        if not call_id and provider_call_id:
            call_id = await self.store.call_id_for(provider_call_id)
        loaded = await self.store.load(call_id) if call_id else None
        if loaded is None or loaded[0].terminal or loaded[0].provider != provider:
            return False
        expected = str(loaded[0].metadata.get("streamToken") or "")
        if not expected or not token or not hmac.compare_digest(expected.encode(), token.encode()):
            return False
        return await self.take(loaded[0].callId) is not None

    async def take(self, call_id: str) -> CallRecord | None:
        """Make this node the owner of a live call; None when the call is over, unknown, or has media elsewhere."""
        released: str | None = None  # the owner that let the call go (its late writes may still land)
        for _ in range(ATTEMPTS):
            loaded = await self.store.load(call_id)
            if loaded is None or loaded[0].terminal:
                return None
            record, version = loaded
            owner = str(record.metadata.get("node") or "")
            if owner and owner not in (self.node_id, released):
                outcome = await self._free(call_id, owner)
                if outcome == "refused":
                    return None
                if outcome == "freed":
                    released = owner
                continue  # read again: the owner flushed its writes before it answered (or a claimer wrote)
            record.metadata["node"] = self.node_id
            try:
                await self.store.save(record, expected_version=version)
            except VersionConflict:
                continue
            if owner and owner != self.node_id:
                log.info("call %s: taken over from node %s", call_id, owner)
                self.taken.append((call_id, owner))
            return self.host.adopt(record)
        log.warning("call %s: not taken over (it kept moving)", call_id)
        return None

    async def _free(self, call_id: str, owner: str) -> str:
        """`freed`: the owner let the call go (alive) or this node claimed it (owner gone); `wait`: another
        node claimed it, ask that one next; `refused`: it stays where it is."""
        try:
            result = await self.router.forward(owner, RELEASE_METHOD, {"callId": call_id}, RELEASE_TIMEOUT_S)
        except NodeUnreachable:
            if await claim(self.store, call_id, owner, self.node_id):
                return "freed"
            await self.clock.sleep(CLAIM_WAIT_S)
            return "wait"
        except RouteError as exc:
            log.warning("call %s: node %s did not release it: %s", call_id, owner, exc.message)
            return "refused"
        if not result or not result.get("released"):
            log.info("call %s: node %s still has its media; not taken over", call_id, owner)
            return "refused"
        return "freed"
