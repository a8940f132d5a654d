"""Several bridge nodes on one Asterisk, against the fake Asterisk (real ARI wire: REST, events
WebSocket, ExternalMedia RTP).

Asterisk gives a Stasis application to ONE events WebSocket (a newer one takes it over: the older gets
`ApplicationReplaced`). So nodes do not share one application: each has its own `asterisk.app`, and
the dialplan spreads calls over them, moving on to the next application while Stasis() fails
(STASISSTATUS=FAILED: no node holds it). A call's events then reach only the node that carries it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.calls import CallState, Direction
from bridge.runtime import Runtime
from tests.fakes.ari_server import FakeAsterisk
from tests.harness import run_bridge, wait_for
from tests.peers.ports import bridge_rtp

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
