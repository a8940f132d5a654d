"""The carriers' pure transfer wire pieces: Twilio's `<Dial>` TwiML (numbers and SIP URIs, escaping)
and DialCallStatus mapping, Telnyx leg-B webhooks (tagged by `target_leg_client_state`) to outcomes,
Plivo's `<Dial>` XML and DialStatus mapping."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from bridge.calls import CallRecord, EventType, TransferOutcome
from carriers.plivo.protocol import FLOW_XFER_DONE, FLOW_XFER_LEG, transfer_event, xml_dial
from carriers.telnyx.protocol import TelnyxEvent, encode_state, translate
from carriers.twilio.protocol import dial_outcome, dial_verb, twiml


class NoCalls:
    def find_call(self, call_id: str | None = None, provider_call_id: str | None = None) -> CallRecord | None:
        return None


def test_twilio_dial_twiml_for_numbers_and_sip_uris() -> None:
    action = "https://bridge.example/voice/webhook?callId=c1&type=dial"
    doc = twiml(dial_verb("sip:agent@pbx.example.com;transport=tls", action=action,
                          leg_callback="https://bridge.example/voice/webhook?callId=c1&type=xfer-leg",
                          timeout_s=30, caller_id="+15550100"))
    dial = ET.fromstring(doc).find("Dial")
    assert dial is not None and dial.get("action") == action and "callerId" not in dial.attrib
    sip = dial.find("Sip")
    assert sip is not None and sip.text == "sip:agent@pbx.example.com;transport=tls"
    assert "&amp;type=dial" in doc, "the query's & is escaped in the attribute"
    number = ET.fromstring(twiml(dial_verb("+15550199", action=action, leg_callback=action, timeout_s=30,
                                           caller_id="+15550100"))).find("Dial/Number")
    assert number is not None and number.text == "+15550199"
    assert [dial_outcome(s) for s in ("completed", "answered", "busy", "no-answer", "failed", "canceled", None)] == [
        TransferOutcome.COMPLETED, TransferOutcome.COMPLETED, TransferOutcome.BUSY, TransferOutcome.NO_ANSWER,
        TransferOutcome.FAILED, TransferOutcome.FAILED, TransferOutcome.FAILED]


def hook(event_type: str, **payload: object) -> TelnyxEvent:
    return TelnyxEvent(event_type, f"id-{event_type}-{payload.get('hangup_cause', '')}",
                       {"call_control_id": "v3:leg-b", "client_state": encode_state("c1", "xfer"), **payload})


def test_telnyx_leg_b_webhooks_become_transfer_outcomes_of_the_caller() -> None:
    answered, _ = translate(hook("call.answered"), None, NoCalls())
    bridged, _ = translate(hook("call.bridged"), None, NoCalls())
    assert answered is not None and bridged is not None
    assert (answered.type, answered.call_id, answered.outcome) == (EventType.TRANSFER, "c1", "completed")
    assert answered.provider_call_id is None, "leg B's id never becomes the caller's"
    assert answered.key == bridged.key, "answered and bridged are one outcome"
    for cause, outcome in (("user_busy", "busy"), ("timeout", "no-answer"), ("call_rejected", "refused"),
                           ("unspecified", "failed")):
        event, effects = translate(hook("call.hangup", hangup_cause=cause), None, NoCalls())
        assert event is not None and event.outcome == outcome and effects == []
    initiated, _ = translate(hook("call.initiated", direction="outgoing"), None, NoCalls())
    assert initiated is None


def test_plivo_dial_xml_and_outcomes() -> None:
    reply = xml_dial("+15559990000", action="https://b.example/w?flow=xfer-done", callback="https://b.example/w?flow=xfer-leg",
                     timeout_s=25, caller_id="+15550001111")
    dial = ET.fromstring(reply.body).find("Dial")
    assert dial is not None and dial.get("callerId") == "15550001111" and dial.get("timeout") == "25"
    number = dial.find("Number")
    assert number is not None and number.text == "15559990000"
    user = ET.fromstring(xml_dial("sip:agent@pbx.example.com", action="a", callback="b", timeout_s=25,
                                  caller_id=None).body).find("Dial/User")
    assert user is not None and user.text == "sip:agent@pbx.example.com"
    answer = transfer_event(FLOW_XFER_LEG, "c1", {"DialAction": "answer", "DialALegUUID": "a", "DialBLegUUID": "b"})
    assert answer is not None and answer.outcome == "completed" and answer.provider_call_id is None
    assert transfer_event(FLOW_XFER_LEG, "c1", {"DialAction": "hangup"}) is None
    for status, outcome in (("busy", "busy"), ("no-answer", "no-answer"), ("timeout", "no-answer"),
                            ("failed", "failed"), ("completed", "completed"), ("", "failed")):
        event = transfer_event(FLOW_XFER_DONE, "c1", {"DialStatus": status, "DialALegUUID": "a"})
        assert event is not None and event.outcome == outcome
