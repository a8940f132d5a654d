"""Two bridge nodes (real servers on 127.0.0.1, mock carrier) sharing one real redis-server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.calls import CallState
from bridge.client import RpcClientError
from tests.harness import rpc_client, run_bridge, wait_for
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the fixture

MOCK = {"ringDelayMs": 20, "answerDelayMs": 40, "replyDelayMs": 50, "calleeHangupAfterMs": 0, "calleeScript": []}


def node(redis: RedisServer, node_id: str, limit: int = 2, lease_s: float = 30) -> dict[str, Any]:
    return {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "maxConcurrentCalls": limit,
            "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
            "responseModel": "offline", "mock": MOCK,
            "cluster": {"redisUrl": redis.url, "nodeId": node_id, "leaseSeconds": lease_s}}


async def _initiate(runtime: Any) -> str | None:
    try:
        result = await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"})
    except RpcClientError as exc:
        assert "Maximum concurrent calls (2) reached" in str(exc)
        return None
    return str(result["callId"])


async def test_capacity_and_events_span_the_nodes(redis_server: RedisServer, tmp_path: Path) -> None:
    async with run_bridge(node(redis_server, "n1"), tmp_path / "a") as a, \
            run_bridge(node(redis_server, "n2"), tmp_path / "b") as b:
        url_b = f"http://127.0.0.1:{b.port}/rpc"
        async with aiohttp.ClientSession() as session, session.ws_connect(url_b) as ws:
            await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "voicecall.subscribe"})
            assert (await ws.receive_json())["result"] == {"subscribed": True}

            placed = await asyncio.gather(*[_initiate(a if i % 2 else b) for i in range(8)])
            ids = [call_id for call_id in placed if call_id]
            assert len(ids) == 2, placed  # the limit holds across both nodes
            owner = {call_id: (a if call_id in a.manager.calls else b) for call_id in ids}
            on_a = [call_id for call_id in ids if owner[call_id] is a]

            for call_id in ids:
                await wait_for(lambda c=call_id: owner[c].manager.calls[c].answeredAt is not None, timeout=20)
                other = b if owner[call_id] is a else a
                assert call_id not in other.manager.calls
                # RPC on the node that does not carry the call: routed to the owner through Redis
                status = await rpc_client(other).call("voicecall.status", {"callId": call_id})
                assert status["found"] and status["call"]["callId"] == call_id
                await rpc_client(other).call("voicecall.speak", {"callId": call_id, "message": "One moment."})
                await rpc_client(other).call("voicecall.end", {"callId": call_id})
                assert owner[call_id].manager.calls[call_id].state == CallState.HANGUP_BOT
                with pytest.raises(RpcClientError, match="has ended"):
                    await rpc_client(other).call("voicecall.speak", {"callId": call_id, "message": "Hello?"})
            assert await _initiate(a) is not None  # ending released the slots on Redis

            ended: set[str] = set()
            async with asyncio.timeout(20):
                while not set(ids) <= ended:
                    msg = await ws.receive_json()
                    if msg.get("method") == "voicecall.event" and msg["params"]["type"] == "call.ended":
                        ended.add(msg["params"]["callId"])
            # node b's subscriber saw the end of node a's calls (when there were any) through the bus
            assert set(on_a) <= ended


async def test_records_survive_a_redis_restart_and_a_node_restart(redis_server: RedisServer, tmp_path: Path) -> None:
    config = node(redis_server, "n1")
    async with run_bridge(config, tmp_path / "a") as a:
        first = await _initiate(a)
        assert first is not None
        await wait_for(lambda: a.manager.calls[first].answeredAt is not None, timeout=20)
        await asyncio.to_thread(redis_server.restart)  # AOF, appendfsync always: nothing acknowledged is lost
        await rpc_client(a).call("voicecall.end", {"callId": first})
        assert a.shared is not None
        await a.shared.drain()  # the writer retried across the restart
        second = await _initiate(a)
        assert second is not None
        await a.shared.drain()
    await asyncio.to_thread(redis_server.restart)
    async with run_bridge(config, tmp_path / "fresh-dir") as again:  # no JSONL here: records come from Redis
        status = await rpc_client(again).call("voicecall.status", {"callId": first})
        assert status["found"] and status["call"]["state"] == CallState.HANGUP_BOT.value
        assert second in again.manager.calls
    async with run_bridge(node(redis_server, "n2"), tmp_path / "other") as other:
        assert first not in other.manager.calls  # another node's calls stay that node's (see README: Scaling)


async def test_a_command_for_a_stopped_nodes_call_gets_a_clear_error(redis_server: RedisServer, tmp_path: Path) -> None:
    async with run_bridge(node(redis_server, "n2"), tmp_path / "b") as b:
        async with run_bridge(node(redis_server, "n1"), tmp_path / "a") as a:
            call_id = await _initiate(a)
            assert call_id is not None
            await wait_for(lambda: a.manager.calls[call_id].answeredAt is not None, timeout=20)
            assert a.shared is not None
            await a.shared.drain()
            a.crashed = True  # its lease (30 s) outlives the test: the call stays n1's
        with pytest.raises(RpcClientError, match="carried by node n1, which is not reachable"):
            await rpc_client(b).call("voicecall.end", {"callId": call_id})
        missing = await rpc_client(b).call("voicecall.status", {"callId": "no-such-call"})
        assert missing["found"] is False


async def test_a_dead_nodes_calls_are_ended_once_by_a_survivor(redis_server: RedisServer, tmp_path: Path) -> None:
    lease_s = 1.0
    async with run_bridge(node(redis_server, "n2", 5, lease_s), tmp_path / "b") as b, \
            run_bridge(node(redis_server, "n3", 5, lease_s), tmp_path / "c") as c:
        async with run_bridge(node(redis_server, "n1", 5, lease_s), tmp_path / "a") as a:
            ids = [await _initiate(a) for _ in range(3)]
            for call_id in ids:
                assert call_id is not None
                await wait_for(lambda c=call_id: a.manager.calls[c].answeredAt is not None, timeout=20)
            assert a.shared is not None
            await a.shared.drain()
            a.crashed = True  # stops like kill -9 as far as the cluster sees: the lease is left to expire
        died = asyncio.get_running_loop().time()
        assert b.shared is not None
        store = b.shared.store
        await wait_for(lambda: len(b.failover.taken_over) + len(c.failover.taken_over) == 3,  # type: ignore[union-attr]
                       timeout=lease_s + 5)
        assert asyncio.get_running_loop().time() - died < lease_s + 3
        hangups = [call_id for call_id, _ in b.carrier.hangups + c.carrier.hangups]  # type: ignore[attr-defined]
        assert sorted(hangups) == sorted(ids)  # exactly one hang-up per call, by one survivor
        assert c.shared is not None
        await b.shared.drain()
        await c.shared.drain()  # the survivors' writers sent the ended records
        assert await store.live_count() == 0  # the slots are free again
        for call_id in ids:
            loaded = await store.load(call_id)
            assert loaded is not None and loaded[0].terminal and loaded[0].metadata["failover"]["from"] == "n1"
        assert b.failover is not None and c.failover is not None
        assert await b.failover.sweep() == [] and await c.failover.sweep() == []  # nothing is ended twice
        assert len(b.carrier.hangups) + len(c.carrier.hangups) == 3  # type: ignore[attr-defined]


async def test_a_webhook_on_another_node_is_applied_by_the_owner(redis_server: RedisServer, tmp_path: Path) -> None:
    async with run_bridge(node(redis_server, "n1"), tmp_path / "a") as a, \
            run_bridge(node(redis_server, "n2"), tmp_path / "b") as b:
        call_id = await _initiate(a)
        assert call_id is not None
        call = a.manager.calls[call_id]
        await wait_for(lambda: call.answeredAt is not None, timeout=20)
        assert a.shared is not None
        await a.shared.drain()
        provider_id = call.providerCallId
        assert provider_id
        hook = f"http://127.0.0.1:{b.port}/voice/webhook"
        async with aiohttp.ClientSession() as session:
            for digits in ("4", "2"):  # by the carrier's call id only, as a carrier's webhook names it
                event = {"event": {"type": "call.dtmf", "providerCallId": provider_id, "digits": digits, "id": f"d{digits}"}}
                async with session.post(hook, json=event) as response:
                    assert response.status == 200
            async with session.post(hook, json={"event": {"type": "call.dtmf", "providerCallId": provider_id,
                                                          "digits": "9", "id": "d4"}}) as response:
                assert response.status == 200  # a redelivery (same id): applied once, by the owner
        assert call.metadata["dtmf"] == "42"
        assert call_id not in b.manager.calls  # node b did not make a second record of it


async def test_sigterm_style_stop_hands_live_calls_over_before_the_lease_expires(redis_server: RedisServer,
                                                                                tmp_path: Path) -> None:
    lease_s = 6.0  # survivors sweep every lease/3 = 2 s; a crashed node's calls would wait the full 6 s
    async with run_bridge(node(redis_server, "n2", 5, lease_s), tmp_path / "b") as b:
        async with run_bridge(node(redis_server, "n1", 5, lease_s), tmp_path / "a") as a:
            call_id = await _initiate(a)
            assert call_id is not None
            await wait_for(lambda: a.manager.calls[call_id].answeredAt is not None, timeout=20)
        stopped = asyncio.get_running_loop().time()  # a graceful stop released n1's lease
        assert b.failover is not None
        await wait_for(lambda: call_id in b.failover.taken_over, timeout=lease_s)  # type: ignore[union-attr]
        assert asyncio.get_running_loop().time() - stopped < lease_s - 1
        assert [c for c, _ in b.carrier.hangups] == [call_id]  # type: ignore[attr-defined]


async def test_the_event_bus_resubscribes_after_a_redis_restart(redis_server: RedisServer, tmp_path: Path) -> None:
    async with run_bridge(node(redis_server, "n1"), tmp_path / "a") as a, \
            run_bridge(node(redis_server, "n2"), tmp_path / "b") as b:
        assert a.shared is not None
        redis = a.shared.store.redis
        channel = a.shared.store.keys.events

        assert a.dispatcher.router is not None
        node_channels = [a.dispatcher.router.channel("n1"), a.dispatcher.router.channel("n2")]

        async def listeners() -> int:
            try:
                counts = dict(await redis.pubsub_numsub(channel, *node_channels))
            except Exception:  # noqa: BLE001 - Redis still coming back
                return 0
            return min(int(counts[channel]) // 2, *(int(counts[c]) for c in node_channels))

        assert await listeners() == 1
        await asyncio.to_thread(redis_server.restart)
        async with asyncio.timeout(15):
            while await listeners() < 1:  # both nodes' relays and command channels subscribed again
                await asyncio.sleep(0.05)
        queue = b.manager.subscribe()
        call_id = await _initiate(a)
        async with asyncio.timeout(10):
            while (await queue.get())["callId"] != call_id:
                pass
        assert call_id is not None
        status = await rpc_client(b).call("voicecall.status", {"callId": call_id})  # routed to n1 again
        assert status["found"] and status["call"]["callId"] == call_id


async def test_consult_reply_on_another_node_reaches_the_owner(redis_server: RedisServer, tmp_path: Path) -> None:
    async with run_bridge(node(redis_server, "n1"), tmp_path / "a") as a, \
            run_bridge(node(redis_server, "n2"), tmp_path / "b") as b:
        call_id = await _initiate(a)
        assert call_id is not None
        await wait_for(lambda: a.manager.calls[call_id].answeredAt is not None, timeout=20)
        events = a.manager.subscribe()  # the agent listening on the owner (the model asks through it)
        asking = asyncio.ensure_future(a.manager.consult(call_id, "Which table?"))
        async with asyncio.timeout(10):
            while (event := await events.get())["type"] != "call.consult":
                pass
        with pytest.raises(RpcClientError, match="No open consult"):
            await rpc_client(b).call("voicecall.consult.reply",
                                     {"callId": call_id, "consultId": "not-asked", "answer": "x"})
        await rpc_client(b).call("voicecall.consult.reply",
                                 {"callId": call_id, "consultId": event["consultId"], "answer": "By the window."})
        assert await asyncio.wait_for(asking, 5) == "By the window."
        await rpc_client(b).call("voicecall.end", {"callId": call_id})
