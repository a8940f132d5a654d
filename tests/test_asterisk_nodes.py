"""Several bridge nodes on one Asterisk, against the fake Asterisk (real ARI wire: REST, events
WebSocket, ExternalMedia RTP).

Asterisk gives a Stasis application to ONE events WebSocket (a newer one takes it over: the older gets
`ApplicationReplaced`). So nodes do not share one application: each has its own `asterisk.app`, and
the dialplan spreads calls over them, moving on to the next application while Stasis() fails
(STASISSTATUS=FAILED: no node holds it). A call's events then reach only the node that carries it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bridge.calls import CallState, Direction
from bridge.runtime import Runtime
from tests.fakes.ari_server import FakeAsterisk
from tests.harness import run_bridge, wait_for
from tests.peers.ports import bridge_rtp
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the fixture
from tests.serve_node import ServeNode

APPS = ["voicecall-a", "voicecall-b"]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAsterisk]:
    async with FakeAsterisk() as server:
        yield server


def node_config(fake: FakeAsterisk, app: str) -> dict[str, Any]:
    return {
        "provider": "asterisk", "fromNumber": "+15550001234", "inboundPolicy": "open", "inboundGreeting": "",
        "maxConcurrentCalls": 4, "streaming": {"enabled": True, "provider": "none"},
        "tts": {"provider": "espeak"}, "responseModel": "offline",
        "asterisk": fake.config(app=app, rtpPortStart=bridge_rtp(), rtpPortRange=100),
    }


def inbound(runtime: Runtime) -> list[Any]:
    return [c for c in runtime.manager.calls.values() if c.direction is Direction.INBOUND]


def up(runtime: Runtime) -> list[Any]:
    """The node's answered inbound calls still going (media attached: the ExternalMedia leg is up)."""
    return [c for c in inbound(runtime) if c.answeredAt is not None and not c.terminal]


async def test_calls_spread_over_nodes_each_handled_by_its_own(fake: FakeAsterisk, tmp_path: Path) -> None:
    async with run_bridge(node_config(fake, APPS[0]), tmp_path / "a") as a, \
            run_bridge(node_config(fake, APPS[1]), tmp_path / "b") as b:
        channels = [fake.stasis(APPS) for _ in range(4)]
        assert all(c is not None for c in channels)
        assert [c.app for c in channels if c] == APPS * 2
        await wait_for(lambda: len(up(a) + up(b)) == 4)
        on_a = {c.providerCallId for c in inbound(a)}
        on_b = {c.providerCallId for c in inbound(b)}
        assert on_a == {c.id for c in channels if c and c.app == APPS[0]} and len(on_a) == 2
        assert on_b == {c.id for c in channels if c and c.app == APPS[1]} and len(on_b) == 2

        # A key press and a hang-up on one of A's calls reach A only.
        first = next(c for c in channels if c and c.app == APPS[0])
        fake.press(first.id, "7")
        fake.hangup(first.id)
        call = next(c for c in inbound(a) if c.providerCallId == first.id)
        await wait_for(lambda: call.terminal)
        assert call.state is CallState.HANGUP_USER and call.metadata.get("dtmf") == "7"
        assert all(c.providerCallId != first.id for c in inbound(b))
        assert not any(c.metadata.get("dtmf") for c in inbound(b))
        # Only A's application ever got the events of A's channel.
        apps_of_first = {e["application"] for e in fake.events_sent if e.get("channel", {}).get("id") == first.id}
        assert apps_of_first == {APPS[0]}

    # Both nodes stopped: their applications are gone, the dialplan finds no node.
    await wait_for(lambda: not any(fake.registered(app) for app in APPS))
    assert fake.stasis(APPS) is None


async def test_a_stopped_node_leaves_the_rotation(fake: FakeAsterisk, tmp_path: Path) -> None:
    async with run_bridge(node_config(fake, APPS[1]), tmp_path / "b") as b:
        async with run_bridge(node_config(fake, APPS[0]), tmp_path / "a"):
            assert fake.registered(APPS[0]) and fake.registered(APPS[1])
        await wait_for(lambda: not fake.registered(APPS[0]))
        channels = [fake.stasis(APPS) for _ in range(3)]
        assert [c.app for c in channels if c] == [APPS[1]] * 3
        await wait_for(lambda: len(up(b)) == 3)


async def test_two_nodes_with_one_application_do_not_fight_over_it(
    fake: FakeAsterisk, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A misconfiguration: the second node takes the application over; the first logs it once, says
    so in its status, and never reconnects to take it back (which would move the calls in turns)."""
    caplog.set_level(logging.WARNING, "voicecall.asterisk")
    async with run_bridge(node_config(fake, APPS[0]), tmp_path / "a") as a:
        async with run_bridge(node_config(fake, APPS[0]), tmp_path / "b") as b:
            await wait_for(lambda: a.carrier.describe()["applicationTaken"])
            assert not b.carrier.describe()["applicationTaken"]
            assert a.carrier.describe()["eventsConnected"] is False
            assert sum("another connection took over Stasis application" in r.getMessage()
                       for r in caplog.records) == 1
            channel = fake.stasis(APPS[:1])
            assert channel is not None
            await wait_for(lambda: len(up(b)) == 1)
            assert not inbound(a)

            await fake.drop_events()  # an Asterisk blip: B reconnects, A stays out
            await wait_for(lambda: fake.ws_connects == 3 and fake.registered(APPS[0]))
            events = a.carrier._events  # type: ignore[attr-defined]
            assert events is not None and events._task is not None
            await wait_for(lambda: events._task.done())
            assert fake.ws_connects == 3


async def test_a_killed_node_s_calls_are_ended_by_a_survivor(
    fake: FakeAsterisk, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two `voicecall serve` processes sharing Redis, one application each. kill -9 node A with two
    live calls: its application is gone (new calls go to B), and once A's lease expired B ends A's
    calls at Asterisk, once each (a DELETE per phone channel, and A's media channels and bridges),
    frees their capacity slots, and leaves its own calls alone."""
    lease_s = 1.5

    def cluster_node(name: str, app: str) -> ServeNode:
        return ServeNode(name, tmp_path / name, {
            **node_config(fake, app), "maxConcurrentCalls": 6,
            "cluster": {"redisUrl": redis_server.url, "nodeId": name, "leaseSeconds": lease_s}})

    a, b = cluster_node("ast-a", APPS[0]), cluster_node("ast-b", APPS[1])
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await asyncio.gather(a.start(), b.start())
        channels = [fake.stasis(APPS) for _ in range(4)]
        assert [c.app for c in channels if c] == APPS * 2
        await wait_for(lambda: all(c is not None and c.bridged_media is not None for c in channels), timeout=15)
        await wait_for_async(lambda: _live_count(redis, 4))
        of_a = [c.id for c in channels if c and c.app == APPS[0]]
        of_b = [c.id for c in channels if c and c.app == APPS[1]]
        media_of_a = {cid for cid, ch in fake.channels.items() if ch.kind == "media" and ch.app == APPS[0]}
        assert len(media_of_a) == 2

        killed_at = time.monotonic()
        a.kill()
        await wait_for(lambda: not fake.registered(APPS[0]))
        late = fake.stasis(APPS)
        assert late is not None and late.app == APPS[1]  # the dialplan skips A's application

        await wait_for(lambda: not any(cid in fake.channels for cid in of_a), timeout=lease_s + 5)
        ended_after = time.monotonic() - killed_at
        await wait_for(lambda: not media_of_a & set(fake.channels))
        assert [len(fake.calls_to("DELETE", f"/ari/channels/{cid}")) for cid in of_a] == [1, 1]
        # A's ExternalMedia channels and bridges went too, and nothing of B's
        await wait_for(lambda: not any(br.name.endswith(tuple(of_a)) for br in fake.bridges.values()))
        assert sum(br.name.endswith(tuple(of_b)) for br in fake.bridges.values()) == 2
        assert all(cid in fake.channels for cid in of_b)  # B's own calls carry on
        await wait_for_async(lambda: _live_count(redis, 3))  # A's two slots are free: B's 2 + the late one
    finally:
        a.stop()
        b.stop()
        await redis.aclose()
    print(f"\n[asterisk] node killed: its 2 calls ended at Asterisk by the survivor after {ended_after:.1f} s "
          f"(lease {lease_s} s)")


async def _live_count(redis: Redis, count: int) -> bool:
    return int(await redis.scard("voicecall:live")) == count


async def wait_for_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)
