"""Redis operation metrics against a real redis-server: counted by operation, failures apart, on /metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.exceptions import ResponseError

from bridge.calls import CallState
from bridge.cluster.redis_store import RedisStore
from bridge.metrics import Metrics
from tests.harness import rpc_client, run_bridge, wait_for
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the fixture
from tests.test_cluster_nodes import node
from tests.test_cluster_store import _call as _call_record
from tests.test_metrics import scrape, value


async def test_store_operations_and_failures_are_counted(redis_server: RedisServer) -> None:
    metrics = Metrics()
    store = RedisStore(redis_server.url, prefix="m")
    store.observe(metrics.observe_redis)
    try:
        record = _call_record("c1")
        assert await store.save(record) == 1 and await store.save(record) == 2
        assert await store.load("c1") is not None
        assert await store.reserve("c1", 5)
        # the live-call set clobbered by a string: the reservation script fails on the server
        await store.redis.set(store.keys.live, "not a set")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await store.reserve("c2", 5)
    finally:
        await store.close()
    ops = "voicecall_redis_operations_total"
    assert metrics.value(ops, op="save_call") == 2  # the Lua script by name, its first-run load not an error
    assert metrics.value(ops, op="hgetall") == 1
    assert metrics.value(ops, op="reserve_slot") == 2 and metrics.value(ops, op="set") == 1
    assert metrics.value("voicecall_redis_errors_total", op="reserve_slot") == 1
    assert metrics.value("voicecall_redis_errors_total", op="save_call") == 0
    assert metrics.value("voicecall_redis_operation_duration_seconds_count", op="save_call") == 2
    assert 0 < metrics.value("voicecall_redis_operation_duration_seconds_sum", op="save_call") < 5


async def test_a_cluster_nodes_redis_traffic_shows_on_metrics(redis_server: RedisServer, tmp_path: Path) -> None:
    async with run_bridge(node(redis_server, "n1"), tmp_path / "a") as runtime:
        before = await scrape(runtime.port)
        call_id = (await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.",
                                                                         "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.answeredAt is not None, timeout=15)
        await rpc_client(runtime).call("voicecall.end", {"callId": call_id})
        assert call.state == CallState.HANGUP_BOT
        await runtime.manager.drain()
        await wait_for(lambda: runtime.metrics.value("voicecall_redis_operations_total", op="publish") > 0, 10)
        after = await scrape(runtime.port)
    ops = "voicecall_redis_operations_total"
    assert value(after, ops, op="reserve_slot") == value(before, ops, op="reserve_slot") + 1
    assert value(after, ops, op="save_call") > value(before, ops, op="save_call")
    assert value(after, "voicecall_redis_operation_duration_seconds_count", op="save_call") == value(
        after, ops, op="save_call")
    assert not [k for k in after if k[0] == "voicecall_redis_errors_total" and after[k] > 0]
