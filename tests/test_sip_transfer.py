"""SIP cold transfer: REFER with sipp as the far end (202, then NOTIFYs with message/sipfrag bodies, or a
refused REFER), the pure mapping of pjsua's transfer reports to outcomes, and the call's fate: ended
`transferred` after a 2xx sipfrag (the bridge sends BYE), still up after a failure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.calls import CallRecord, CallState, EventType, TransferOutcome
from carriers.base import CarrierError, OutboundRequest
from carriers.sip.carrier import SipCarrier
from carriers.sip.protocol import transfer_outcome
from carriers.sip.settings import SipSettings
from tests.peers.harness import running_carrier, skip_reason
from tests.peers.host import RecordingBridge, TestHost
from tests.peers.ports import bridge_rtp, bridge_sip, sipp_media, sipp_uas
from tests.peers.sipp import SippResult, run_sipp

_reason = skip_reason("sipp")
TARGET = "sip:agent@pbx.example.com"


# ------------------------------------------------------------------ pure: pjsua reports -> outcome


@pytest.mark.parametrize(
    ("code", "accepted", "final", "expected"),
    [
        (100, False, False, None),  # pjsua's "100 Accepted" for the 202
        (100, True, False, None),  # NOTIFY "SIP/2.0 100 Trying"
        (180, True, False, None),
        (200, True, True, TransferOutcome.COMPLETED),
        (200, True, False, TransferOutcome.COMPLETED),  # a 2xx sipfrag decides even if not final
        (200, False, True, TransferOutcome.COMPLETED),  # REFER answered with Refer-Sub: false
        (486, True, True, TransferOutcome.BUSY),
        (600, True, True, TransferOutcome.BUSY),
        (408, True, True, TransferOutcome.NO_ANSWER),
        (480, True, True, TransferOutcome.NO_ANSWER),
        (487, True, True, TransferOutcome.NO_ANSWER),
        (403, True, True, TransferOutcome.REFUSED),
        (404, True, True, TransferOutcome.REFUSED),
        (603, True, True, TransferOutcome.REFUSED),
        (603, False, True, TransferOutcome.REFUSED),  # the REFER itself declined
        (405, False, True, TransferOutcome.REFUSED),
        (501, False, True, TransferOutcome.REFUSED),
        (486, False, True, TransferOutcome.REFUSED),  # a busy answer to the REFER is a refusal of it
        (408, False, True, TransferOutcome.FAILED),  # nobody answered the REFER
        (500, True, True, TransferOutcome.FAILED),  # pjsua: the subscription ended with no NOTIFY
        (503, False, True, TransferOutcome.FAILED),
        (180, True, True, TransferOutcome.FAILED),  # terminated while the person's phone still rang
    ],
)
def test_transfer_reports_map_to_outcomes(code: int, accepted: bool, final: bool,
                                          expected: TransferOutcome | None) -> None:
    assert transfer_outcome(code, accepted=accepted, final=final) == expected


# ------------------------------------------------------------------ REFER on the wire, sipp as the transferee

realpeer = [pytest.mark.realpeer, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


def _settings(workers: int) -> SipSettings:
    return SipSettings(port=bridge_sip(), rtpPortStart=bridge_rtp(), rtpPortRange=100, workers=workers)


async def _answered_call(host: TestHost, carrier: SipCarrier, scenario: str, tmp_path: Path, frag: str = "200 OK"
                         ) -> tuple[asyncio.Task[SippResult], CallRecord, str]:
    """The bridge calls a sipp callee running `scenario`; returns (sipp task, the call record, its pid)."""
    port = sipp_uas()
    sipp = asyncio.create_task(run_sipp(scenario, None, workdir=tmp_path / "uas", local_port=port,
                                        media_port=sipp_media(), timeout_s=15, keys={"frag": frag}))
    await asyncio.sleep(0.3)  # let sipp bind
    uri = f"sip:callee@127.0.0.1:{port}"
    record = host.outbound_record(uri)
    pid = await carrier.initiate_call(record, OutboundRequest(uri, "", "hi", "notify", True))
    record.providerCallId = pid
    await host.wait_for(EventType.ACTIVE, pid)
    return sipp, record, pid


async def test_refer_accepted_and_notified_200_ends_the_call_transferred(tmp_path: Path) -> None:
    if _reason:
        pytest.skip(_reason)
    async with running_carrier(_settings(1)) as (host, carrier):
        sipp, record, pid = await _answered_call(host, carrier, "uas_refer.xml", tmp_path)
        await carrier.transfer_cold(record, TARGET)
        outcome = (await host.wait_for(EventType.TRANSFER, pid))[0]
        assert outcome.outcome == TransferOutcome.COMPLETED and outcome.call_id == record.callId
        ended = (await host.wait_for(EventType.ENDED, pid))[0]
        assert ended.reason is CallState.TRANSFERRED
        await carrier.hangup_call(record, CallState.TRANSFERRED)  # what the manager may do next: a no-op
        result = await sipp  # it checked the Refer-To, sent both NOTIFYs and got the bridge's BYE
        assert result.ok, result.errors[-2000:] or result.output[-2000:]
    assert len(host.of_type(EventType.TRANSFER)) == 1


@pytest.mark.parametrize(
    ("frag", "expected"),
    [("486 Busy Here", TransferOutcome.BUSY), ("480 Temporarily Unavailable", TransferOutcome.NO_ANSWER)],
)
async def test_a_failed_transfer_leaves_the_call_up(tmp_path: Path, frag: str, expected: TransferOutcome) -> None:
    if _reason:
        pytest.skip(_reason)
    async with running_carrier(_settings(1)) as (host, carrier):
        sipp, record, pid = await _answered_call(host, carrier, "uas_refer.xml", tmp_path, frag)
        await carrier.transfer_cold(record, TARGET)
        outcome = (await host.wait_for(EventType.TRANSFER, pid))[0]
        assert outcome.outcome == expected and outcome.error == f"SIP {frag}"
        await _still_up(host, carrier, record, pid)
        result = await sipp
        assert result.ok, result.errors[-2000:] or result.output[-2000:]


async def test_a_refused_refer_leaves_the_call_up(tmp_path: Path) -> None:
    """With worker processes: the REFER and pjsua's reports cross the worker wire (op xfer, note transfer)."""
    if _reason:
        pytest.skip(_reason)
    async with running_carrier(_settings(2)) as (host, carrier):
        sipp, record, pid = await _answered_call(host, carrier, "uas_refer_refused.xml", tmp_path)
        await carrier.transfer_cold(record, TARGET)
        outcome = (await host.wait_for(EventType.TRANSFER, pid))[0]
        assert outcome.outcome == TransferOutcome.REFUSED and outcome.error == "SIP 603 Decline"
        await _still_up(host, carrier, record, pid)
        result = await sipp
        assert result.ok, result.errors[-2000:] or result.output[-2000:]


async def _still_up(host: TestHost, carrier: SipCarrier, record: CallRecord, pid: str) -> None:
    """After a failed transfer the dialog carries on: the far end's audio still arrives, nothing ended;
    a second transfer may start, and the bridge's hang-up ends the call as usual."""
    bridge = host.bridges[record.callId]
    before = len(bridge.frames)
    await asyncio.wait_for(_frames_beyond(bridge, before + 10), 5)
    assert not host.of_type(EventType.ENDED, pid)
    await carrier.hangup_call(record, CallState.HANGUP_BOT)
    ended = (await host.wait_for(EventType.ENDED, pid))[0]
    assert ended.reason is CallState.HANGUP_BOT


async def _frames_beyond(bridge: RecordingBridge, count: int) -> None:
    while len(bridge.frames) < count:
        await asyncio.sleep(0.02)


async def test_transfer_needs_an_answered_call() -> None:
    if _reason:
        pytest.skip(_reason)
    async with running_carrier(_settings(1)) as (host, carrier):
        record = host.outbound_record("sip:nobody@127.0.0.1:9")
        with pytest.raises(CarrierError, match="no answered call"):
            await carrier.transfer_cold(record, TARGET)
