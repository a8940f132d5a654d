"""Asterisk transfer and keys out against the fake ARI server (real HTTP, events WebSocket, RTP):
cold transfer by originating the person and joining them into the caller's bridge, its failures
(busy / no answer / declined: the call stays with the bridge), warm transfer's native join, the
bridge left behind being cleaned up when either side hangs up, and DTMF with duration and gap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from bridge.calls import CallState, EventType, TransferOutcome
from carriers.asterisk.carrier import AsteriskCarrier
from carriers.asterisk.protocol import transfer_outcome
from carriers.asterisk.settings import AsteriskSettings
from carriers.base import CarrierError, OutboundRequest
from tests.fakes.ari_server import FakeAsterisk
from tests.fakes.audio import fake_speech
from tests.harness import wait_for
from tests.peers.host import TestHost

PERSON = "+15550000006"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAsterisk]:
    async with FakeAsterisk() as server:
        yield server


@asynccontextmanager
async def running(fake: FakeAsterisk, **overrides: Any) -> AsyncIterator[tuple[TestHost, AsteriskCarrier]]:
    settings = AsteriskSettings(**fake.config(rtpPortStart=43400, rtpPortRange=200, **overrides))
    host = TestHost(policy="answer")
    carrier = AsteriskCarrier(settings)
    host.carrier = carrier
    await carrier.start(host)
    try:
        yield host, carrier
    finally:
        await carrier.close()


async def _caller(fake: FakeAsterisk, host: TestHost) -> str:
    phone = fake.inbound_call(caller="+15550009999", audio=fake_speech("I would like to talk to a person", 8000))
    await host.wait_for(EventType.ACTIVE, phone.id)
    return phone.id


@pytest.mark.parametrize(
    ("cause", "expected"),
    [(17, TransferOutcome.BUSY), (18, TransferOutcome.NO_ANSWER), (19, TransferOutcome.NO_ANSWER),
     (21, TransferOutcome.REFUSED), (1, TransferOutcome.REFUSED), (3, TransferOutcome.REFUSED),
     (34, TransferOutcome.FAILED), (16, TransferOutcome.FAILED), (None, TransferOutcome.FAILED)],
)
def test_the_persons_hangup_cause_maps_to_an_outcome(cause: int | None, expected: TransferOutcome) -> None:
    assert transfer_outcome(cause) is expected


async def test_cold_transfer_joins_the_person_into_the_callers_bridge(fake: FakeAsterisk) -> None:
    async with running(fake) as (host, carrier):
        pid = await _caller(fake, host)
        record = host.by_pid[pid]
        record_bridge = fake.bridge_of(pid)
        assert record_bridge is not None
        media_id = next(c for c in record_bridge.channels if c != pid)

        await carrier.transfer_cold(record, PERSON)
        person = fake.originated()[0]
        assert person.originate is not None
        assert {k: person.originate[k] for k in ("endpoint", "app", "appArgs", "callerId", "timeout")} == {
            "endpoint": f"PJSIP/{PERSON}@trunk", "app": "voicecall", "appArgs": f"voicecall,transfer,{pid}",
            "callerId": "+15550009999", "timeout": 30}
        with pytest.raises(CarrierError, match="already running"):
            await carrier.transfer_cold(record, PERSON)
        fake.ring(person.id)
        assert not host.of_type(EventType.TRANSFER)  # ringing is no outcome
        fake.answer(person.id)

        outcome = (await host.wait_for(EventType.TRANSFER, pid))[0]
        assert outcome.outcome == TransferOutcome.COMPLETED and outcome.call_id == record.callId
        assert host.detached == [record.callId]  # our audio leg is gone; ending the call is the manager's
        # Asterisk now connects the two; our ExternalMedia channel left, the caller's channel did not.
        await wait_for(lambda: media_id not in fake.channels)
        assert record_bridge.channels == [pid, person.id]
        assert fake.calls_to("POST", f"/ari/bridges/{record_bridge.id}/addChannel")[-1] == {"channel": person.id}
        await carrier.hangup_call(record, CallState.TRANSFERRED)  # the manager's hang-up must not cut them off
        assert not fake.calls_to("DELETE", f"/ari/channels/{pid}") and pid in fake.channels

        fake.hangup(person.id)  # the person hangs up: the caller is not left alone in a silent bridge
        await wait_for(lambda: not fake.channels and not fake.bridges)
        assert fake.calls_to("DELETE", f"/ari/channels/{pid}") == [{}]
        assert not host.of_type(EventType.ENDED)  # the call was over for us at the hand-off


@pytest.mark.parametrize(
    ("action", "expected", "detail"),
    [("busy", TransferOutcome.BUSY, "cause 17 User busy"),
     ("no_answer", TransferOutcome.NO_ANSWER, "cause 19 User alerting, no answer"),
     ("reject", TransferOutcome.REFUSED, "cause 21 Call Rejected")],
)
async def test_a_failed_transfer_keeps_the_call_with_the_bridge(fake: FakeAsterisk, action: str,
                                                                 expected: TransferOutcome, detail: str) -> None:
    async with running(fake) as (host, carrier):
        pid = await _caller(fake, host)
        record = host.by_pid[pid]
        await carrier.transfer_cold(record, PERSON)
        person = fake.originated()[0]
        getattr(fake, action)(person.id)
        outcome = (await host.wait_for(EventType.TRANSFER, pid))[0]
        assert (outcome.outcome, outcome.error) == (expected, detail)
        # the call goes on: caller audio still reaches the pipeline, nothing ended, media kept
        bridge = host.bridges[record.callId]
        frames = len(bridge.frames)
        await wait_for(lambda: len(bridge.frames) > frames + 10)
        assert not host.of_type(EventType.ENDED) and len(fake.bridge_of(pid).channels) == 2  # type: ignore[union-attr]

        await carrier.transfer_cold(record, "+15550000007")  # a second try may follow, and succeed
        second = fake.originated()[-1]
        fake.answer(second.id)
        outcomes = await host.wait_for(EventType.TRANSFER, pid, count=2)
        assert outcomes[1].outcome == TransferOutcome.COMPLETED and outcomes[0].key != outcomes[1].key
        await wait_for(lambda: record.callId in host.detached)


async def test_the_caller_hanging_up_cancels_the_persons_call(fake: FakeAsterisk) -> None:
    async with running(fake) as (host, carrier):
        pid = await _caller(fake, host)
        await carrier.transfer_cold(host.by_pid[pid], PERSON)
        person = fake.originated()[0]
        fake.ring(person.id)
        fake.hangup(pid)
        ended = (await host.wait_for(EventType.ENDED, pid))[0]
        assert ended.reason is CallState.HANGUP_USER
        await wait_for(lambda: not fake.channels and not fake.bridges)
        assert fake.calls_to("DELETE", f"/ari/channels/{person.id}") == [{}]
        assert not host.of_type(EventType.TRANSFER)


async def test_transfer_needs_an_answered_call_and_a_valid_destination(fake: FakeAsterisk) -> None:
    async with running(fake) as (host, carrier):
        with pytest.raises(CarrierError, match="no answered call"):
            await carrier.transfer_cold(host.outbound_record(PERSON), PERSON)
        pid = await _caller(fake, host)
        with pytest.raises(CarrierError, match="not a number"):
            await carrier.transfer_cold(host.by_pid[pid], "a b")
        assert not fake.originated()


async def test_warm_transfer_joins_the_two_calls_natively(fake: FakeAsterisk) -> None:
    async with running(fake) as (host, carrier):
        caller_id = await _caller(fake, host)
        caller = host.by_pid[caller_id]
        person = host.outbound_record(PERSON)  # the bridge called the person and told them the summary
        person_id = await carrier.initiate_call(person, OutboundRequest(PERSON, "+15550001234", "", "conversation", True))
        fake.answer(person_id)
        await host.wait_for(EventType.ACTIVE, person_id)
        caller_bridge, person_bridge = fake.bridge_of(caller_id), fake.bridge_of(person_id)
        assert caller_bridge is not None and person_bridge is not None and caller_bridge is not person_bridge
        bot_media = {c for b in (caller_bridge, person_bridge) for c in b.channels} - {caller_id, person_id}

        assert await carrier.join_legs(caller, person) is True

        await wait_for(lambda: caller_bridge.channels == [caller_id, person_id])  # the bot's media leaves
        assert fake.calls_to("POST", f"/ari/bridges/{person_bridge.id}/removeChannel") == [{"channel": person_id}]
        await carrier.hangup_call(caller, CallState.TRANSFERRED)  # the manager ends both calls: no-ops here
        await carrier.hangup_call(person, CallState.TRANSFERRED)
        await wait_for(lambda: not bot_media & set(fake.channels) and person_bridge.id not in fake.bridges)
        assert sorted(host.detached) == sorted([caller.callId, person.callId])

        assert caller_id in fake.channels and person_id in fake.channels and not host.of_type(EventType.ENDED)
        fake.hangup(caller_id)  # the caller hangs up first this time
        await wait_for(lambda: not fake.channels and not fake.bridges)


async def test_keys_out_with_duration_and_gap(fake: FakeAsterisk) -> None:
    async with running(fake, dtmfDurationMs=160, dtmfGapMs=80) as (host, carrier):
        pid = await _caller(fake, host)
        await carrier.send_dtmf(host.by_pid[pid], "12#")
        assert fake.channels[pid].dtmf_sent == [{"dtmf": "12#", "duration": 160, "between": 80}]


async def test_hang_ups_missed_while_the_events_socket_was_down_are_caught_up(fake: FakeAsterisk) -> None:
    """A joined pair whose person hung up, and a transfer whose person's phone vanished, while no
    events came: the check after reconnecting ends the other side / reports the transfer failed."""
    async with running(fake) as (host, carrier):
        joined_caller = await _caller(fake, host)
        await carrier.transfer_cold(host.by_pid[joined_caller], PERSON)
        joined_person = fake.originated()[0]
        fake.answer(joined_person.id)
        await host.wait_for(EventType.TRANSFER, joined_caller)
        waiting_caller = await _caller(fake, host)
        await carrier.transfer_cold(host.by_pid[waiting_caller], "+15550000007")
        ringing = fake.originated()[-1]
        fake.ring(ringing.id)
        fake.events_down = True
        await fake.drop_events()
        await asyncio.sleep(0.3)
        fake.hangup(joined_person.id)  # both lost: nobody listens
        fake.busy(ringing.id)
        fake.events_down = False
        outcome = (await host.wait_for(EventType.TRANSFER, waiting_caller, timeout=15))[0]
        assert outcome.outcome == TransferOutcome.FAILED and "events socket was down" in (outcome.error or "")
        await wait_for(lambda: joined_caller not in fake.channels, timeout=5)  # not left alone in the bridge
        assert waiting_caller in fake.channels and not host.of_type(EventType.ENDED, waiting_caller)


def test_keys_out_timing_is_checked_in_the_config() -> None:
    from bridge.config import ConfigError, build_settings

    base = {"provider": "asterisk", "asterisk": {"username": "u", "password": "p"}}
    assert build_settings(base, {}).asterisk.dtmfGapMs == 100
    for key, value in (("dtmfDurationMs", 10), ("dtmfGapMs", -1)):
        with pytest.raises(ConfigError, match=f"asterisk.{key}: Input should be greater than or equal to"):
            build_settings({**base, "asterisk": {**base["asterisk"], key: value}}, {})
