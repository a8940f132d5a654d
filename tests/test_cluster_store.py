"""The Redis store against a real redis-server: atomic saves across clients, capacity, dedupe, bus, import."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from bridge.calls import CallRecord, CallState, Direction, TranscriptEntry
from bridge.cluster.redis_store import RedisStore, VersionConflict
from bridge.store import CallStore
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the fixture


def _call(call_id: str, state: CallState = CallState.ACTIVE) -> CallRecord:
    return CallRecord(callId=call_id, provider="twilio", direction=Direction.OUTBOUND, state=state,
                      from_="+15550001111", to="+15550002222", startedAt=1_700_000_000.0, providerCallId=f"CA{call_id}")


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two independent clients: two nodes."""
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    yield a, b
    await a.close()
    await b.close()


async def test_save_load_roundtrip_and_live_index(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    call = _call("c1")
    call.transcript.append(TranscriptEntry(1.0, "user", "héllo"))
    assert await a.save(call) == 1
    loaded = await b.load("c1")
    assert loaded is not None
    record, version = loaded
    assert version == 1 and record.to_json() == call.to_json()
    assert await b.live_count() == 0  # a slot is taken by reserve(), not by a save
    assert await b.reserve("c1", 1)
    assert await a.live_count() == 1
    call.state = CallState.COMPLETED
    assert await a.save(call) == 2
    assert await b.live_count() == 0
    assert (await b.replay()).calls["c1"].state == CallState.COMPLETED


async def test_stale_version_is_refused(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    await a.save(_call("c1"))
    await b.save(_call("c1"), expected_version=1)
    with pytest.raises(VersionConflict) as info:
        await a.save(_call("c1"), expected_version=1)
    assert info.value.current == 2


async def test_concurrent_updates_from_two_nodes_lose_nothing(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    await a.save(_call("c1"))

    def add(digit: str):  # type: ignore[no-untyped-def]
        def change(record: CallRecord) -> None:
            record.metadata["dtmf"] = record.metadata.get("dtmf", "") + digit
        return change

    jobs = [(a if i % 2 else b).update("c1", add(str(i % 10))) for i in range(40)]
    await asyncio.gather(*jobs)
    loaded = await a.load("c1")
    assert loaded is not None
    record, version = loaded
    assert len(record.metadata["dtmf"]) == 40
    assert sorted(record.metadata["dtmf"]) == sorted(str(i % 10) for i in range(40))
    assert version == 41


async def test_capacity_holds_under_a_burst_from_two_nodes(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    results = await asyncio.gather(*[(a if i % 2 else b).reserve(f"c{i}", 3) for i in range(20)])
    assert sum(results) == 3
    assert await a.live_count() == 3
    winner = next(f"c{i}" for i, ok in enumerate(results) if ok)
    assert await b.reserve(winner, 3)  # a holder asking again keeps its slot
    await a.release(winner)
    assert await b.reserve("late", 3)
    assert not await a.reserve("later", 3)


async def test_first_time_is_true_for_exactly_one_node(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    results = await asyncio.gather(*[(a if i % 2 else b).first_time("twilio:CA1:completed") for i in range(10)])
    assert results.count(True) == 1
    assert await a.redis.ttl(a.keys.seen("twilio:CA1:completed")) > 0


async def test_turn_tokens(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    assert await b.get_turn("c1") is None
    await a.set_turn("c1", "tok-1")
    assert await b.get_turn("c1") == "tok-1"
    await b.clear_turn("c1")
    assert await a.get_turn("c1") is None


async def test_events_reach_every_subscribed_node(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    received: list[dict[str, object]] = []
    subscribed = asyncio.Event()

    async def listen() -> None:
        stream = await b.subscribe()
        subscribed.set()
        received.append(await stream.__anext__())
        received.append(await stream.__anext__())
        await stream.aclose()  # type: ignore[attr-defined]

    task = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 5)
    await a.publish({"type": "call.state", "callId": "c1", "state": "active"})
    await a.publish({"type": "call.ended", "callId": "c1", "state": "completed"})
    await asyncio.wait_for(task, 5)
    assert [m["type"] for m in received] == ["call.state", "call.ended"]


async def test_import_copies_a_jsonl_log(stores: tuple[RedisStore, RedisStore], tmp_path: Path) -> None:
    a, _ = stores
    log = CallStore(tmp_path / "store")
    log.open()
    log.append(_call("c1", CallState.RINGING))
    log.append(_call("c1", CallState.COMPLETED))
    log.append(_call("c2"))
    log.close()
    with open(log.path, "a", encoding="utf-8") as fh:
        fh.write('{"torn": \n')
    assert await a.import_log(log.path) == (2, 1)
    replay = await a.replay()
    assert {k: v.state for k, v in replay.calls.items()} == {"c1": CallState.COMPLETED, "c2": CallState.ACTIVE}
    assert await a.live_count() == 1
    stored = json.loads(await a.redis.hget(a.keys.call("c2"), "json"))
    assert stored["from"] == "+15550001111"


async def test_commands_ride_over_a_redis_restart(stores: tuple[RedisStore, RedisStore], redis_server: RedisServer) -> None:
    a, b = stores
    await a.save(_call("c1"))
    await a.reserve("c1", 5)
    await asyncio.to_thread(redis_server.restart)
    loaded = await b.load("c1")  # the connection was dropped; the client reconnects
    assert loaded is not None and loaded[1] == 1
    assert await a.live_count() == 1
    assert await a.save(_call("c2")) == 1


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True, timeout=60)


async def test_cli_store_import(redis_server: RedisServer, tmp_path: Path) -> None:
    log = CallStore(tmp_path / "store")
    log.open()
    log.append(_call("c1", CallState.COMPLETED))
    log.close()
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"store": str(tmp_path / "store"), "cluster": {"redisUrl": redis_server.url}}))
    result = await asyncio.to_thread(_cli, "store", "import", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["imported"] == 1
    reader = RedisStore(redis_server.url)
    assert (await reader.replay()).calls["c1"].state == CallState.COMPLETED
    await reader.close()

    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"store": str(tmp_path / "store")}))
    result = await asyncio.to_thread(_cli, "store", "import", "--config", str(plain))
    assert result.returncode == 1 and "set cluster.redisUrl" in result.stderr and "Traceback" not in result.stderr

    down = tmp_path / "down.yaml"
    down.write_text(yaml.safe_dump({"store": str(tmp_path / "store"),
                                    "cluster": {"redisUrl": "redis://:hunter2@127.0.0.1:1/0"}}))
    result = await asyncio.to_thread(_cli, "store", "import", "--config", str(down))
    assert result.returncode == 1 and "cannot reach Redis at 127.0.0.1:1" in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_cluster_config_is_validated_with_key_paths() -> None:
    from bridge.config import ConfigError, build_settings

    cases = {"serve.workers: 2 processes need a shared store: set cluster.redisUrl": {"serve": {"workers": 2}},
             "cluster.redisUrl": {"cluster": {"redisUrl": "http://127.0.0.1:6379"}},
             "cluster.leaseSeconds": {"cluster": {"redisUrl": "redis://127.0.0.1:6379", "leaseSeconds": 0}}}
    for expected, raw in cases.items():
        with pytest.raises(ConfigError) as info:
            build_settings(raw, env={})
        assert expected in str(info.value)
    settings = build_settings({"serve": {"workers": 2}, "cluster": {"redisUrl": "redis://127.0.0.1:6379"}}, env={})
    assert settings.serve.worker_count == 2 and settings.cluster is not None and settings.cluster.node_id
