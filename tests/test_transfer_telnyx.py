"""Transfer on Telnyx against the fake (REST, Ed25519-signed webhooks, media streams): cold =
`actions/transfer` with the exact body recorded, leg B's answer completes it; a busy leg B hangs up
and the caller's call goes on (the failure message is heard on its stream); warm = the bridge dials
the person with `link_to`, briefs them over that call's stream, then `actions/bridge` and stops its
streams."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from bridge.calls import CallState
from tests import test_telnyx_e2e as e2e
from tests.carrier_transfer import TRANSFER, live_call, rms, warm_transfer
from tests.fakes.telnyx_server import FakeCall, FakeTelnyx
from tests.harness import rpc_client, run_bridge, wait_for
from tests.test_telnyx_e2e import OUR_NUMBER

PERSON = "+15550009999"
fake = e2e.fake


def config(fake: FakeTelnyx) -> dict[str, Any]:
    return e2e.config(fake, maxConcurrentCalls=2, transfer=TRANSFER)


async def live_telnyx_call(runtime: Any, fake: FakeTelnyx) -> tuple[Any, FakeCall]:
    call = await live_call(runtime)
    return call, fake.calls[call.providerCallId]


def actions(fake: FakeTelnyx, ccid: str, command: str) -> list[dict[str, Any]]:
    return [body for method, path, body in fake.requests if path == f"/v2/calls/{ccid}/actions/{command}"]


async def test_cold_transfer_is_actions_transfer_and_leg_b_answer_completes_it(fake: FakeTelnyx,
                                                                               tmp_path: Path) -> None:
    async with run_bridge(config(fake), tmp_path) as runtime:
        call, telnyx_call = await live_telnyx_call(runtime, fake)
        result = await rpc_client(runtime).call("voicecall.transfer", {"callId": call.callId, "to": PERSON})
        assert result["outcome"] == "completed" and call.state == CallState.TRANSFERRED
        [body] = actions(fake, telnyx_call.ccid, "transfer")
        assert body.pop("command_id")
        assert body == {"to": PERSON, "from": OUR_NUMBER, "timeout_secs": 20,
                        "target_leg_client_state": base64.b64encode(f"{call.callId} xfer".encode()).decode(),
                        "webhook_url": runtime.manager.webhook_url(callId=call.callId), "webhook_url_method": "POST"}
        [(_, leg_b, to)] = fake.transfers
        assert to == PERSON and fake.bridges == [(telnyx_call.ccid, leg_b)]
        assert call.providerCallId == telnyx_call.ccid, "leg B's webhooks never re-linked the caller's call"
        assert "hangup" not in telnyx_call.command_names(), "the bridge left without hanging up the caller"


async def test_cold_transfer_to_a_busy_person_keeps_the_call(fake: FakeTelnyx, tmp_path: Path) -> None:
    async with run_bridge(config(fake), tmp_path) as runtime:
        call, telnyx_call = await live_telnyx_call(runtime, fake)
        stream = telnyx_call.stream
        assert stream is not None
        before = len(stream.heard_now())
        result = await rpc_client(runtime).call("voicecall.transfer", {"callId": call.callId, "to": "+15550000002"})
        assert result["outcome"] == "busy"
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        assert "busy" in call.transcript[-1].text
        heard = stream.heard_now()[before:]
        assert len(heard) / 16000 > 0.5 and rms(heard) > 300, "the caller heard why, on the same stream"
        assert telnyx_call.alive and not call.terminal


async def test_warm_transfer_dials_with_link_to_briefs_then_bridges(fake: FakeTelnyx, tmp_path: Path) -> None:
    async with run_bridge(config(fake), tmp_path) as runtime:
        call, telnyx_call = await live_telnyx_call(runtime, fake)
        person_call = await warm_transfer(runtime, call, PERSON)
        person = fake.calls[person_call.providerCallId]
        assert person.dial["link_to"] == telnyx_call.ccid and person.dial["to"] == PERSON
        assert person.stream is not None
        heard = person.stream.heard_now()
        assert len(heard) / 16000 > 0.8 and rms(heard) > 300, "the person heard the briefing on their call's stream"
        [bridge] = actions(fake, telnyx_call.ccid, "bridge")
        assert bridge["call_control_id"] == person.ccid
        assert fake.bridges == [(telnyx_call.ccid, person.ccid)]
        assert actions(fake, telnyx_call.ccid, "streaming_stop") and actions(fake, person.ccid, "streaming_stop")
        assert call.state == CallState.TRANSFERRED and person_call.state == CallState.TRANSFERRED
        assert "hangup" not in telnyx_call.command_names() + person.command_names()
