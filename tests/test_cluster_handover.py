"""A media stream moves its call to the node that accepts it: two in-process nodes, a real redis-server,
the Twilio fake and real Media Streams WebSockets (the three-process version is tests/test_cluster_lab.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.calls import CallState
from bridge.ownership import RELEASED
from bridge.runtime import Runtime
from media.clock import RealClock, TimerHandle
from tests.fakes.telnyx_server import FakeTelnyx
from tests.fakes.twilio_server import CallerScript, FakeTwilio, TwilioMediaStreamClient
from tests.harness import rpc_client, run_bridge, wait_for
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the fixture

GRACE_MS = 300


def config(fake: FakeTwilio, redis: RedisServer, node_id: str) -> dict[str, Any]:
    return {"provider": "twilio", "fromNumber": "+15550001234", "toNumber": "+15550005678", "maxConcurrentCalls": 2,
            "twilio": {"accountSid": fake.account_sid, "authToken": fake.auth_token, "apiBaseUrl": fake.api_base_url},
            "streaming": {"enabled": True, "provider": "none", "disconnectGraceMs": GRACE_MS},
            "tts": {"provider": "espeak"}, "responseModel": "offline",
            "cluster": {"redisUrl": redis.url, "nodeId": node_id, "leaseSeconds": 30}}


class GraceSpy(RealClock):
    """The real clock, counting the stream-lost grace timers that fired."""

    grace_fired = 0

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        if abs(delay - GRACE_MS / 1000) > 1e-9:
            return super().call_later(delay, callback)

        def fire() -> None:
            callback()
            self.grace_fired += 1

        return super().call_later(delay, fire)


def stream_to(node: Runtime, fake: FakeTwilio, call_id: str, sid: str, token: str) -> TwilioMediaStreamClient:
    return TwilioMediaStreamClient(f"ws://127.0.0.1:{node.port}/voice/stream", call_sid=sid,
                                   account_sid=fake.account_sid, parameters={"token": token, "callId": call_id})


async def owner(node: Runtime, call_id: str) -> str:
    assert node.shared is not None
    loaded = await node.shared.store.load(call_id)
    assert loaded is not None
    return str(loaded[0].metadata["node"])


async def test_a_stream_moves_its_call_only_with_its_token_and_only_when_no_node_has_its_media(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with FakeTwilio(say_chars_per_second=40) as fake:
        fake.default_script = CallerScript(utterances=[])
        clock = GraceSpy()  # tells when n1's stream-lost grace timer has fired
        async with run_bridge(config(fake, redis_server, "n1"), tmp_path / "a", clock=clock) as a, \
                run_bridge(config(fake, redis_server, "n2"), tmp_path / "b") as b:
            call_id = (await rpc_client(a).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))[
                "callId"]
            call = a.manager.calls[call_id]
            await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)  # greeted on n1's stream
            assert a.shared is not None and b.handover is not None
            await a.shared.drain()
            token, sid = str(call.metadata["streamToken"]), str(call.providerCallId)

            wrong = stream_to(b, fake, call_id, sid, "x" * len(token))
            await wrong.connect()
            assert await wrong.wait_closed(10) == 1008  # a wrong token moves nothing
            busy = stream_to(b, fake, call_id, sid, token)
            await busy.connect()
            assert await busy.wait_closed(10) == 1008  # n1 holds the call's media: it stays there
            assert await owner(b, call_id) == "n1" and call_id not in b.manager.calls

            # n1's stream drops (the carrier re-attaches to whichever node the balancer picks: here n2)
            a.manager.media_disconnected(call_id)
            # n1 has let the call go while Redis still names n1 (n2's owner write not made yet): a command
            # sent to n1 in that window waits for the new owner instead of answering "Call not found"
            assert a.manager.release(call_id) and await owner(a, call_id) == "n1"
            speak = asyncio.create_task(
                rpc_client(a).call("voicecall.speak", {"callId": call_id, "message": "Now from node two."}))
            moved = stream_to(b, fake, call_id, sid, token)
            await moved.connect()
            await wait_for(lambda: b.manager.voice(call_id) is not None, timeout=10)
            assert await owner(b, call_id) == "n2" and call_id not in a.manager.calls
            assert b.handover.taken == [(call_id, "n1")]
            await speak  # n1 routed it to n2
            assert len(moved.heard_ulaw()) > 4000
            bot = [t.text for t in b.manager.calls[call_id].transcript if t.speaker == "bot"]
            assert bot == ["Hi.", "Now from node two."], bot
            # n1's stream-lost timer fires on the object it let go: it sees an ended call and does nothing
            await wait_for(lambda: clock.grace_fired == 1, timeout=5)
            assert "streamLost" not in call.metadata and call.metadata["node"] == RELEASED
            assert fake.rest("POST", f"/Calls/{sid}.json") == []
            assert not b.manager.calls[call_id].terminal and await owner(b, call_id) == "n2"
            await rpc_client(a).call("voicecall.end", {"callId": call_id})
            assert b.manager.calls[call_id].state == "hangup-bot"
            await moved.aclose()


def telnyx_config(fake: FakeTelnyx, redis: RedisServer, node_id: str) -> dict[str, Any]:
    return {"provider": "telnyx", "fromNumber": "+15550001234", "toNumber": "+15550005678", "maxConcurrentCalls": 2,
            "telnyx": fake.config(), "streaming": {"enabled": True, "provider": "none", "disconnectGraceMs": 5000},
            "tts": {"provider": "espeak"}, "responseModel": "offline",
            "cluster": {"redisUrl": redis.url, "nodeId": node_id, "leaseSeconds": 1}}


async def test_a_dead_nodes_telnyx_call_gets_a_new_stream_from_a_survivor(redis_server: RedisServer,
                                                                        tmp_path: Path) -> None:
    async with FakeTelnyx() as fake, run_bridge(telnyx_config(fake, redis_server, "n2"), tmp_path / "b") as b:
        async with run_bridge(telnyx_config(fake, redis_server, "n1"), tmp_path / "a") as a:
            call_id = (await rpc_client(a).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))[
                "callId"]
            call = a.manager.calls[call_id]
            await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)  # greeted through n1's stream
            assert a.shared is not None
            await a.shared.drain()
            a.crashed = True  # its lease is left to expire, as after kill -9
        [twin] = fake.calls.values()
        first = twin.stream
        assert first is not None and twin.alive  # Telnyx keeps the call up when a stream drops
        assert b.failover is not None
        await wait_for(lambda: b.failover.reattached == [call_id], timeout=1 + 5)  # type: ignore[union-attr]
        await wait_for(lambda: b.manager.voice(call_id) is not None, timeout=10)
        assert twin.command_names().count("streaming_start") == 1 and twin.stream is not first
        await rpc_client(b).call("voicecall.speak", {"callId": call_id, "message": "Still here."})
        assert twin.stream is not None and len(twin.stream.heard_now()) > 4000
        assert [t.text for t in b.manager.calls[call_id].transcript if t.speaker == "bot"] == ["Hi.", "Still here."]
        await rpc_client(b).call("voicecall.end", {"callId": call_id})
        assert twin.command_names().count("hangup") == 1
        assert b.shared is not None
        await b.shared.drain()
        assert await b.shared.store.live_count() == 0
