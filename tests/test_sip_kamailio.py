"""SIP on several bridge nodes behind a real Kamailio (docker/kamailio/kamailio.cfg, dispatcher module):
sipp places calls through Kamailio; they spread over two real `voicecall serve` processes; ACK and
BYE follow the record-route to the node that answered; kill -9 one node: Kamailio's OPTIONS probes
take it out of rotation and new calls all go to the survivor; restarted, it is back in rotation.

Routing needs no shared state: a SIP call lives wholly on the node that answered its INVITE (the
dialog in its pjsua2 user agent, RTP straight to it, in-dialog requests routed there by Kamailio), so
no other node ever handles one of its events. Redis (the first test, as in the lab's cluster profile)
adds what spans nodes: `maxConcurrentCalls` over all of them, every node's events to subscribers, RPC
on any node; the second test runs the nodes on their own JSONL logs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers.harness import skip_reason
from tests.peers.kamailio import KAMAILIO, KAMCMD, Kamailio
from tests.peers.ports import bridge_rtp, node_sip, proxy_sip, sipp_media, sipp_uac
from tests.peers.sipp import run_sipp
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the fixture
from tests.serve_node import ServeNode

_reason = skip_reason("sipp", "espeak-ng")
if _reason is None and (KAMAILIO is None or KAMCMD is None):
    _reason = "kamailio is not installed (apt-get install -y kamailio; scripts/system-deps.sh test)"
pytestmark = [pytest.mark.realpeer, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


class SipNode(ServeNode):
    """A bridge node with the SIP carrier (`sip_workers` 1: the user agent in the node's process)."""

    def __init__(self, name: str, directory: Path, redis_url: str | None, sip_workers: int = 1) -> None:
        self.sip_port = node_sip()
        self.uri = f"sip:127.0.0.1:{self.sip_port}"
        cluster = {"cluster": {"redisUrl": redis_url, "nodeId": name, "leaseSeconds": 5}} if redis_url else {}
        super().__init__(name, directory, {
            "provider": "sip", "inboundPolicy": "open", "inboundGreeting": "Hello.", "maxConcurrentCalls": 4,
            "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
            "responseModel": "offline",
            "sip": {"bindAddress": "127.0.0.1", "port": self.sip_port, "workers": sip_workers,
                    "rtpPortStart": bridge_rtp(), "rtpPortRange": 100},
            **cluster,
        })


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, *, ping_interval_s: int = 1,
                  redis_url: str | None = None) -> AsyncIterator[tuple[Kamailio, list[SipNode]]]:
    # Node A: the user agent in the node's process. Node B: its SIP front and 2 user-agent processes
    # (as config/cluster.yaml), so Kamailio's record-route meets the front's.
    nodes = [SipNode("node-a", tmp_path / "node-a", redis_url), SipNode("node-b", tmp_path / "node-b", redis_url, 2)]
    kam_dir = tmp_path / "kamailio"
    kam_dir.mkdir()
    kamailio = Kamailio(kam_dir, proxy_sip(), [("127.0.0.1", n.sip_port) for n in nodes],
                        ping_interval_s=ping_interval_s)
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        await kamailio.start()
        yield kamailio, nodes
    finally:
        await kamailio.stop()
        for node in nodes:
            node.stop()


async def _place(kamailio: Kamailio, workdir: Path, calls: int) -> None:
    """`calls` calls through Kamailio, at most 2 at a time (capacity is not what these tests are about)."""
    result = await run_sipp(
        "uac_via_proxy.xml", f"127.0.0.1:{kamailio.port}", workdir=workdir, local_port=sipp_uac(),
        media_port=sipp_media(), calls=calls, limit=2, rate=20, hold_ms=800, timeout_s=30,
    )
    assert result.ok, result.errors[-2000:] or result.output[-2000:] or kamailio.log.read_text()[-2000:]


async def _ended_by_caller(node: ServeNode, count: int) -> list[dict[str, Any]]:
    """The node's calls, once `count` of them ended on the caller's BYE (waits: BYE is async to sipp)."""
    async with asyncio.timeout(10):
        while True:
            calls = await node.calls()
            if sum(c["state"] == "hangup-user" for c in calls) >= count:
                return calls
            await asyncio.sleep(0.1)


def _routes(kamailio: Kamailio, what: str) -> dict[str, str]:
    """Call-ID -> the node address Kamailio sent `what` ("new INVITE", "in-dialog BYE") of that call to:
    the next Route hop when there is one (a node's SIP front), else the Request-URI."""
    routes = {}
    for line in kamailio.lines(f"{what} "):
        call_id, target = line.split(f"{what} ", 1)[1].split(" -> ")
        uri, _, hop = target.partition(" via ")
        routes[call_id] = (hop if hop and hop != "<null>" else uri).split("@")[-1].removeprefix("sip:").split(";")[0]
    return routes


async def test_calls_spread_over_nodes_and_a_dead_node_leaves_rotation(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The nodes as in the lab's cluster profile: with Redis, so capacity and events span them."""
    async with cluster(tmp_path, redis_url=redis_server.url) as (kamailio, (a, b)):
        await kamailio.wait_for_flags({a.uri: "AP", b.uri: "AP"})

        # Round-robin over both nodes; each call's ACK and BYE reach the node that answered it
        # (a BYE at the other node would get 481 and leave the call up: sipp would fail, the call
        # would not end `hangup-user`).
        await _place(kamailio, tmp_path / "spread", 4)
        on_a, on_b = await _ended_by_caller(a, 2), await _ended_by_caller(b, 2)
        assert (len(on_a), len(on_b)) == (2, 2)
        assert all(c["state"] == "hangup-user" and c["direction"] == "inbound" for c in on_a + on_b)
        # Redis shares the records: node B answers for a call A carried.
        status = await b.rpc().call("voicecall.status", {"callId": on_a[0]["callId"]})
        assert status["found"] and status["call"]["state"] == "hangup-user"
        invites, byes = _routes(kamailio, "new INVITE"), _routes(kamailio, "in-dialog BYE")
        assert len(invites) == 4 and byes == invites  # each BYE went through Kamailio to its INVITE's node

        # kill -9 node A: its probes time out, Kamailio marks it down; every new call goes to B.
        killed_at = time.monotonic()
        a.kill()
        await kamailio.wait_for_flags({a.uri: "IP", b.uri: "AP"})
        down_after = time.monotonic() - killed_at
        assert any(a.uri in line for line in kamailio.lines("bridge node down"))
        await _place(kamailio, tmp_path / "one-left", 4)
        assert len(await _ended_by_caller(b, 6)) == 6

        # A comes back (same ports): the probes see it answer and it rejoins the rotation.
        await a.start()
        await kamailio.wait_for_flags({a.uri: "AP", b.uri: "AP"})
        await _place(kamailio, tmp_path / "back", 2)
        assert len(await _ended_by_caller(a, 3)) == 3  # 2 from before its crash (call log) + 1 now
        assert len(await _ended_by_caller(b, 7)) == 7
        assert _routes(kamailio, "in-dialog BYE") == _routes(kamailio, "new INVITE")
    print(f"\n[kamailio] killed node out of rotation {down_after:.1f} s after kill -9 (probe every 1 s, timeout 1 s)")


async def test_a_node_that_dies_between_probes_costs_no_call(tmp_path: Path) -> None:
    """Probes every 30 s, so Kamailio has not noticed the kill yet: the INVITE sent to the dead node
    times out (fr_timer) and the failure route sends it to the next node, marking the dead one down."""
    async with cluster(tmp_path, ping_interval_s=30) as (kamailio, (a, b)):  # nodes without Redis: JSONL
        a.kill()
        await _place(kamailio, tmp_path / "failover", 2)
        assert len(await _ended_by_caller(b, 2)) == 2
        assert len(kamailio.lines("failover ")) == 1  # the first call; the second found A marked down
        assert (await kamailio.node_flags())[a.uri].startswith("I")
