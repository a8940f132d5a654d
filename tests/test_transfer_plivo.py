"""Transfer on Plivo against the fake (REST, signed callbacks, an XML interpreter that runs `<Dial>`
and `<Conference>`, the bidirectional Audio Stream): cold = the Transfer API to our `<Dial>` XML
(exact request and XML checked), the Dial callback's answer completes it; a busy person brings the
caller back on a new `<Stream>` and the bridge speaks to them; warm = the bridge's own call to the
person, the briefing over its stream, then both legs transferred into one conference."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from bridge.calls import CallState
from tests import test_plivo_e2e as e2e
from tests.carrier_transfer import TRANSFER, live_call, rms, warm_transfer
from tests.fakes.plivo_server import FakeCall, FakePlivo
from tests.harness import rpc_client, run_bridge, wait_for
from tests.test_plivo_e2e import CALLEE, FRIEND, OUR_NUMBER

PERSON = FRIEND
plivo = e2e.plivo


def config(plivo: FakePlivo) -> dict[str, Any]:
    return e2e.config(plivo, toNumber=CALLEE, maxConcurrentCalls=2, responseModel="offline", ringTimeoutMs=30_000,
                      tts={"provider": "espeak"}, transfer=TRANSFER)


async def live_plivo_call(runtime: Any, plivo: FakePlivo) -> tuple[Any, FakeCall]:
    call = await live_call(runtime)
    plivo_call = plivo.find(call.providerCallId)
    assert plivo_call is not None
    return call, plivo_call


async def test_cold_transfer_redirects_to_dial_xml_and_the_bridge_leaves(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        call, plivo_call = await live_plivo_call(runtime, plivo)
        result = await rpc_client(runtime).call("voicecall.transfer", {"callId": call.callId, "to": PERSON})
        assert result["outcome"] == "completed" and call.state == CallState.TRANSFERRED
        [transfer] = plivo.rest("POST", f"/Call/{plivo_call.uuid}/")
        assert transfer.body == {"legs": "aleg", "aleg_method": "POST",
                                 "aleg_url": runtime.manager.webhook_url(callId=call.callId, flow="xfer-dial",
                                                                         to=PERSON)}
        dial = ET.fromstring(plivo_call.xml[-1]).find("Dial")
        assert dial is not None and dial.attrib == {
            "action": runtime.manager.webhook_url(callId=call.callId, flow="xfer-done"), "method": "POST",
            "timeout": "20", "callerId": OUR_NUMBER.lstrip("+"),
            "callbackUrl": runtime.manager.webhook_url(callId=call.callId, flow="xfer-leg"), "callbackMethod": "POST"}
        number = dial.find("Number")
        assert number is not None and number.text == PERSON.lstrip("+")
        # the person hangs up later: the Dial action is answered with <Hangup/>
        await wait_for(lambda: bool(plivo.callbacks_for("xfer-done")), timeout=10)
        [done] = plivo.callbacks_for("xfer-done")
        assert done.params["DialStatus"] == "completed" and "<Hangup" in done.body
        assert call.state == CallState.TRANSFERRED and call.providerCallId == plivo_call.uuid


async def test_cold_transfer_to_a_busy_person_restores_the_stream(plivo: FakePlivo, tmp_path: Path) -> None:
    plivo.busy_numbers.add(PERSON)
    async with run_bridge(config(plivo), tmp_path) as runtime:
        call, plivo_call = await live_plivo_call(runtime, plivo)
        result = await rpc_client(runtime).call("voicecall.transfer", {"callId": call.callId, "to": PERSON})
        assert result["outcome"] == "busy"
        [done] = plivo.callbacks_for("xfer-done")
        assert done.params["DialStatus"] == "busy" and ET.fromstring(done.body).find("Stream") is not None
        await wait_for(lambda: call.state == CallState.LISTENING and len(plivo_call.streams) == 2, timeout=20)
        assert "busy" in call.transcript[-1].text
        await wait_for(lambda: len(plivo_call.streams[-1].heard_pcm()) / 16000 > 0.5, timeout=10)
        assert rms(plivo_call.streams[-1].heard_pcm()) > 300, "the caller heard why on the new stream"
        assert plivo_call.live and not call.terminal


async def test_warm_transfer_briefs_the_person_then_joins_a_conference(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        call, plivo_call = await live_plivo_call(runtime, plivo)
        person_call = await warm_transfer(runtime, call, PERSON)
        person = plivo.find(person_call.providerCallId)
        assert person is not None and person.to == PERSON
        heard = person.streams[0].heard_pcm()
        assert len(heard) / 16000 > 0.8 and rms(heard) > 300, "the person heard the briefing on their stream"
        room = f"voicecall-{call.callId}"
        for leg, record in ((person, person_call), (plivo_call, call)):
            [move] = plivo.rest("POST", f"/Call/{leg.uuid}/")
            assert move.body["aleg_url"] == runtime.manager.webhook_url(callId=record.callId, flow="conference",
                                                                        room=room)
        await wait_for(lambda: len(plivo.conferences.get(room, [])) == 2, timeout=10)
        conference = ET.fromstring(plivo_call.xml[-1]).find("Conference")
        assert conference is not None and conference.text == room
        assert conference.get("endConferenceOnExit") == "true"
        assert call.state == CallState.TRANSFERRED and person_call.state == CallState.TRANSFERRED
        await person.hang_up()
        await wait_for(lambda: not plivo_call.live, timeout=10)
