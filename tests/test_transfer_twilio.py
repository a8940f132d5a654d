"""Transfer on Twilio against the fake (signed webhooks, a TwiML interpreter that runs `<Dial>` and
`<Conference>`, real Media Streams): cold = the call's TwiML replaced by `<Dial>` (exact TwiML
checked), the person's answer completes it; a busy person brings the caller back on a new
`<Connect><Stream>` and the bridge speaks to them; warm = the bridge's own call to the person,
the briefing over that call's stream, then both calls moved into one conference."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from bridge.calls import CallState
from tests import test_twilio_e2e as e2e
from tests.carrier_transfer import TRANSFER, live_call, rms, warm_transfer
from tests.fakes.twilio_server import CallerScript, FakeCall, FakeTwilio
from tests.harness import rpc_client, run_bridge, wait_for
from tests.test_twilio_e2e import OUR_NUMBER

PERSON = "+15550009999"
fake = e2e.fake


def config(fake: FakeTwilio) -> dict[str, Any]:
    return e2e.config(fake, stream=True, maxConcurrentCalls=2, transfer=TRANSFER)


async def live_twilio_call(runtime: Any, fake: FakeTwilio) -> tuple[Any, FakeCall]:
    call = await live_call(runtime)
    return call, fake.calls[call.providerCallId]


def webhook(runtime: Any, **query: str) -> str:
    return runtime.manager.webhook_url(**query)


async def test_cold_transfer_dials_the_person_and_the_bridge_leaves(fake: FakeTwilio, tmp_path: Path) -> None:
    fake.scripts[PERSON] = CallerScript(hangup_after_ms=300)
    async with run_bridge(config(fake), tmp_path) as runtime:
        call, twilio_call = await live_twilio_call(runtime, fake)
        first_stream = twilio_call.stream
        result = await rpc_client(runtime).call("voicecall.transfer", {"callId": call.callId, "to": PERSON})
        assert result["outcome"] == "completed" and result["state"] == "transferred"
        assert call.state == CallState.TRANSFERRED and call.metadata["transferredTo"] == PERSON
        # exactly one REST update: the <Dial> TwiML
        [update] = twilio_call.rest_updates
        dial = ET.fromstring(update["Twiml"]).find("Dial")
        assert dial is not None and dial.attrib == {
            "action": webhook(runtime, callId=call.callId, type="dial"), "method": "POST", "timeout": "20",
            "answerOnBridge": "true", "callerId": OUR_NUMBER}
        number = dial.find("Number")
        assert number is not None and number.text == PERSON and number.attrib == {
            "statusCallback": webhook(runtime, callId=call.callId, type="xfer-leg"),
            "statusCallbackEvent": "answered", "statusCallbackMethod": "POST"}
        assert first_stream is not None and first_stream.closed.is_set(), "the <Dial> ended the media stream"
        # the person hangs up later: the Dial action gets <Hangup/>, the call record stays `transferred`
        await wait_for(lambda: bool(twilio_call.fetches("dial")), timeout=10)
        [action] = twilio_call.fetches("dial")
        assert action.params["DialCallStatus"] == "completed" and "<Hangup/>" in action.body
        assert call.state == CallState.TRANSFERRED and call.transfer.outcome == "completed"


async def test_cold_transfer_to_a_busy_person_restores_the_stream(fake: FakeTwilio, tmp_path: Path) -> None:
    fake.scripts[PERSON] = CallerScript(outcome="busy")
    async with run_bridge(config(fake), tmp_path) as runtime:
        call, twilio_call = await live_twilio_call(runtime, fake)
        result = await rpc_client(runtime).call("voicecall.transfer", {"callId": call.callId, "to": PERSON})
        assert result["outcome"] == "busy" and not result["success"]
        [action] = twilio_call.fetches("dial")
        assert action.params["DialCallStatus"] == "busy"
        stream = ET.fromstring(action.body).find("Connect/Stream")
        assert stream is not None, "the Dial action answers with the media stream again"
        await wait_for(lambda: call.state == CallState.LISTENING and len(twilio_call.streams) == 2, timeout=20)
        assert "busy" in call.transcript[-1].text
        await twilio_call.streams[-1].wait_quiet(0.3)
        heard = twilio_call.streams[-1].heard_pcm()
        assert len(heard) / 16000 > 0.5 and rms(heard) > 300, "the caller heard the failure message on the new stream"
        assert not call.terminal and call.transfer.outcome == "busy"
        await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})
        assert call.state == CallState.HANGUP_BOT


async def test_warm_transfer_briefs_the_person_then_joins_a_conference(fake: FakeTwilio, tmp_path: Path) -> None:
    fake.scripts[PERSON] = CallerScript()
    async with run_bridge(config(fake), tmp_path) as runtime:
        call, twilio_call = await live_twilio_call(runtime, fake)
        person_call = await warm_transfer(runtime, call, PERSON)
        person_twilio = fake.calls[person_call.providerCallId]
        create = [f for f in fake.rest("POST", "/Calls.json") if f["To"] == [PERSON]]
        assert len(create) == 1 and create[0]["From"] == [OUR_NUMBER]
        assert create[0]["Url"] == [webhook(runtime, callId=person_call.callId)]
        # the briefing went out over the person's own media stream
        heard = person_twilio.streams[0].heard_pcm()
        assert len(heard) / 16000 > 0.8 and rms(heard) > 300
        # then both calls into one conference: the person's first, then the caller's
        name = f"voicecall-{call.callId}"
        expected = {"startConferenceOnEnter": "true", "endConferenceOnExit": "true", "beep": "false", "waitUrl": ""}
        for leg in (person_twilio, twilio_call):
            [update] = leg.rest_updates
            conference = ET.fromstring(update["Twiml"]).find("Dial/Conference")
            assert conference is not None and conference.text == name and conference.attrib == expected
        await wait_for(lambda: len(fake.conferences.get(name, [])) == 2, timeout=10)
        assert call.state == CallState.TRANSFERRED and person_call.state == CallState.TRANSFERRED
        # the person hangs up: the conference ends for the caller too
        await person_twilio.hang_up()
        await wait_for(lambda: twilio_call.ended.is_set(), timeout=10)
