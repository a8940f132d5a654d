"""The cost of the cluster: Redis commands per call and per webhook, webhook latency Redis vs JSONL.

Runs in-process bridges on the mock carrier against a real redis-server it starts (AOF, fsync
always, as tests/redis_server.py). Sequential webhooks (one client): latency, not throughput.

    python bench/cluster_cost.py --calls 5 --webhooks 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import rpc_client, run_bridge, wait_for  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

MOCK = {"ringDelayMs": 20, "answerDelayMs": 40, "replyDelayMs": 50, "calleeHangupAfterMs": 0, "calleeScript": []}


def config(redis_url: str | None, node_id: str) -> dict[str, Any]:
    raw: dict[str, Any] = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678",
                           "maxConcurrentCalls": 50, "streaming": {"enabled": True, "provider": "none"},
                           "tts": {"provider": "espeak"}, "responseModel": "offline", "mock": MOCK}
    if redis_url:
        raw["cluster"] = {"redisUrl": redis_url, "nodeId": node_id, "leaseSeconds": 30}
    return raw


# Commands that only run inside our Lua scripts (commandstats counts those too): not round trips.
IN_SCRIPTS = {"hget", "hset", "sadd", "srem", "sismember", "scard", "zadd"}


async def commands(url: str) -> dict[str, int]:
    client = aioredis.Redis.from_url(url)
    stats = await client.info("commandstats")
    await client.aclose()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}


def per(before: dict[str, int], after: dict[str, int], count: int) -> dict[str, Any]:
    """Round trips (client commands) per unit, and the per-command breakdown including script internals."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    # `set` is left out: in these windows it only runs inside the save script (the carrier-id index);
    # the top-level SETs (lease renewal, failover claims) are per node and per lease/3, not per call
    trips = sum(v for k, v in delta.items() if k not in IN_SCRIPTS and k != "set")
    return {"round_trips": round(max(trips, 0) / count, 1),
            "commands": {k: round(v / count, 2) for k, v in sorted(delta.items())}}


async def one_call(runtime: Any) -> tuple[str, str]:
    client = rpc_client(runtime)
    call_id = (await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
    call = runtime.manager.calls[call_id]
    await wait_for(lambda: call.answeredAt is not None, timeout=20)
    return call_id, str(call.providerCallId)


async def webhooks(port: int, provider_id: str, count: int, tag: str) -> list[float]:
    latencies: list[float] = []
    url = f"http://127.0.0.1:{port}/voice/webhook"
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            body = {"event": {"type": "call.dtmf", "providerCallId": provider_id, "digits": "1", "id": f"{tag}{i}"}}
            start = time.perf_counter()
            async with session.post(url, json=body) as response:
                await response.read()
                assert response.status == 200
            latencies.append((time.perf_counter() - start) * 1000)
    return latencies


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 2)}


async def main(calls: int, hooks: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with run_bridge(config(None, "solo"), root / "jsonl") as solo:
            _, provider_id = await one_call(solo)
            result["webhook_jsonl"] = summary(await webhooks(solo.port or 0, provider_id, hooks, "j"))
        (root / "redis").mkdir()
        redis = RedisServer(root / "redis")
        redis.start()
        try:
            async with run_bridge(config(redis.url, "n1"), root / "a") as a, \
                    run_bridge(config(redis.url, "n2"), root / "b") as b:
                before = await commands(redis.url)
                for _ in range(calls):
                    call_id, _ = await one_call(a)
                    await rpc_client(a).call("voicecall.end", {"callId": call_id})
                await a.shared.drain()  # type: ignore[union-attr]
                result["redis_per_call"] = per(before, await commands(redis.url), calls)
                _, provider_id = await one_call(a)
                await a.shared.drain()  # type: ignore[union-attr]
                before = await commands(redis.url)
                owner = await webhooks(a.port or 0, provider_id, hooks, "o")
                await a.shared.drain()  # type: ignore[union-attr]
                result["redis_per_webhook_on_owner"] = per(before, await commands(redis.url), hooks)
                result["webhook_redis_owner"] = summary(owner)
                before = await commands(redis.url)
                forwarded = await webhooks(b.port or 0, provider_id, hooks, "f")
                await a.shared.drain()  # type: ignore[union-attr]
                result["redis_per_webhook_forwarded"] = per(before, await commands(redis.url), hooks)
                result["webhook_redis_forwarded"] = summary(forwarded)
        finally:
            redis.stop()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--webhooks", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.calls, args.webhooks)), indent=2))
