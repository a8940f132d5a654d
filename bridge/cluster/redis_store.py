"""Call records, dedupe keys, turn tokens, the live-call count and the event bus in Redis.

Every operation that reads and writes (a versioned save, a capacity reservation) runs as one Lua
script, so it is atomic across nodes: two nodes applying events of one call never lose an update
(the loser of a race gets `VersionConflict` and re-applies on the fresh record), and
`maxConcurrentCalls` holds however many nodes reserve at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.calls import CallRecord
from bridge.cluster.keys import Keys
from bridge.cluster.observed import ObservedRedis, RedisObserver
from bridge.store import Replay, read_log

SEEN_TTL_S = 86_400  # a carrier's redelivery window is minutes; a day is ample
TURN_TTL_S = 3_600
MAX_UPDATE_RETRIES = 50

# KEYS: call hash, calls set, live set, started zset. ARGV: expected version (-1: any), json, call id,
# terminal (1/0), the carrier's call id ('' = none), the key prefix of its index (carrier id -> our id), startedAt.
# A terminal record gives its live-call slot back (slots are taken by _RESERVE).
# Returns the new version, or -(current version) - 1 on a version mismatch.
_SAVE = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
local expected = tonumber(ARGV[1])
if expected >= 0 and expected ~= v then return -v - 1 end
v = v + 1
redis.call('HSET', KEYS[1], 'v', v, 'json', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
if ARGV[4] == '1' then redis.call('SREM', KEYS[3], ARGV[3]) end
if ARGV[5] ~= '' then redis.call('SET', ARGV[6] .. ARGV[5], ARGV[3]) end
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[3])
return v
"""

# KEYS: live set. ARGV: call id, limit. 1: reserved (or held already), 0: at the limit.
_RESERVE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""

TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


class VersionConflict(Exception):
    """Another node wrote the call since it was read."""

    def __init__(self, current: int) -> None:
        super().__init__(f"record is at version {current}")
        self.current = current


class RedisStore:
    def __init__(self, url: str, *, prefix: str = "voicecall") -> None:
        # Retries ride over a Redis restart: a command waits for the server to come back (bounded).
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=40)
        # from_url builds `cls`; redis-py's annotation says the base class
        self.redis: ObservedRedis = cast(ObservedRedis, ObservedRedis.from_url(
            url, decode_responses=True, retry=retry, retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=5))
        self.keys = Keys(prefix)
        self._save = self.redis.register_script(_SAVE)
        self._reserve = self.redis.register_script(_RESERVE)
        self.redis.name_script(self._save.sha, "save_call")
        self.redis.name_script(self._reserve.sha, "reserve_slot")

    def observe(self, observer: RedisObserver) -> None:
        """Report every Redis command (operation, seconds, ok) to `observer` (the runtime's metrics)."""
        self.redis.observer = observer

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()

    # ------------------------------------------------------------------ call records

    async def save(self, record: CallRecord, *, expected_version: int = -1) -> int:
        """Write the full record; with `expected_version` only if nobody wrote it since. The new version."""
        payload = record.json_text()
        k = self.keys
        result = int(await self._save(keys=[k.call(record.callId), k.calls, k.live, k.started],
                                      args=[expected_version, payload, record.callId, "1" if record.terminal else "0",
                                            record.providerCallId or "", k.provider_prefix, record.startedAt]))
        if result < 0:
            raise VersionConflict(-result - 1)
        return result

    async def load(self, call_id: str) -> tuple[CallRecord, int] | None:
        fields = await self.redis.hgetall(self.keys.call(call_id))
        if not fields or "json" not in fields:
            return None
        return CallRecord.from_json(json.loads(fields["json"])), int(fields.get("v", 0))

    async def load_many(self, call_ids: list[str]) -> list[CallRecord]:
        """The records of these ids that exist and can be read, in the order given (one round trip)."""
        if not call_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for call_id in call_ids:
            pipe.hget(self.keys.call(call_id), "json")
        records = []
        for raw in await pipe.execute():
            try:
                records.append(CallRecord.from_json(json.loads(raw)))
            except (ValueError, KeyError, TypeError):
                continue
        return records

    async def recent_calls(self, limit: int, *, active: bool = False) -> list[CallRecord]:
        """Every node's calls, the newest `limit` by start, oldest first; `active`: the live ones only."""
        if active:
            ids = [str(m) for m in await self.redis.smembers(self.keys.live)]
            records = sorted((r for r in await self.load_many(ids) if not r.terminal), key=lambda r: r.startedAt)
            return records[-limit:]
        ids = [str(m) for m in await self.redis.zrange(self.keys.started, -limit, -1)]
        return await self.load_many(ids)

    async def call_id_for(self, provider_call_id: str) -> str | None:
        value = await self.redis.get(self.keys.provider_prefix + provider_call_id)
        return str(value) if value is not None else None

    async def update(self, call_id: str, change: Callable[[CallRecord], None]) -> CallRecord:
        """Read, change, write back only if unchanged meanwhile; on a race re-read and re-apply."""
        for _ in range(MAX_UPDATE_RETRIES):
            loaded = await self.load(call_id)
            if loaded is None:
                raise KeyError(call_id)
            record, version = loaded
            change(record)
            try:
                await self.save(record, expected_version=version)
            except VersionConflict:
                continue
            return record
        raise RuntimeError(f"call {call_id}: too much contention ({MAX_UPDATE_RETRIES} retries)")

    async def replay(self) -> Replay:
        """Every stored call; an unreadable record is skipped and counted, as in the JSONL replay."""
        result = Replay()
        ids = sorted(str(member) for member in await self.redis.smembers(self.keys.calls))
        for start in range(0, len(ids), 500):
            pipe = self.redis.pipeline(transaction=False)
            for call_id in ids[start:start + 500]:
                pipe.hget(self.keys.call(call_id), "json")
            for raw in await pipe.execute():
                try:
                    record = CallRecord.from_json(json.loads(raw))
                except (ValueError, KeyError, TypeError):
                    result.skipped_lines += 1
                    continue
                result.calls[record.callId] = record
        return result

    async def import_log(self, path: Path) -> tuple[int, int]:
        """Copy a JSONL call log into Redis: (calls imported, unreadable lines skipped)."""
        replay = read_log(path)
        for record in replay.calls.values():
            await self.save(record)
            if not record.terminal:
                await self.redis.sadd(self.keys.live, record.callId)
        return len(replay.calls), replay.skipped_lines

    # ------------------------------------------------------------------ capacity

    async def reserve(self, call_id: str, limit: int) -> bool:
        """Take one of `limit` live-call slots across all nodes; False when all are taken."""
        return bool(await self._reserve(keys=[self.keys.live], args=[call_id, limit]))

    async def release(self, call_id: str) -> None:
        await self.redis.srem(self.keys.live, call_id)

    async def live_count(self) -> int:
        return int(await self.redis.scard(self.keys.live))

    # ------------------------------------------------------------------ dedupe and turn tokens

    async def first_time(self, key: str, ttl_s: int = SEEN_TTL_S) -> bool:
        """True for the first node to see this event id / replay key within the TTL, False for the rest."""
        return bool(await self.redis.set(self.keys.seen(key), "1", nx=True, ex=ttl_s))

    async def set_turn(self, call_id: str, token: str, ttl_s: int = TURN_TTL_S) -> None:
        await self.redis.set(self.keys.turn(call_id), token, ex=ttl_s)

    async def get_turn(self, call_id: str) -> str | None:
        value = await self.redis.get(self.keys.turn(call_id))
        return str(value) if value is not None else None

    async def clear_turn(self, call_id: str) -> None:
        await self.redis.delete(self.keys.turn(call_id))

    # ------------------------------------------------------------------ event bus

    async def publish(self, message: dict[str, Any]) -> None:
        await self.redis.publish(self.keys.events, json.dumps(message, separators=(",", ":"), default=str))

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """Subscribed when this returns (so nothing published afterwards is missed): every node's events."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.keys.events)
        return _messages(pubsub)


async def _messages(pubsub: PubSub) -> AsyncIterator[dict[str, Any]]:
    try:
        async for item in pubsub.listen():
            if item.get("type") == "message":
                yield json.loads(item["data"])
    finally:
        await pubsub.aclose()
