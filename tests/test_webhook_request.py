"""WebhookRequest normalizes header names once; every carrier reads them through header()."""

from __future__ import annotations

import pytest

from carriers.base import WebhookRequest
from carriers.plivo.protocol import verify_request as verify_plivo
from carriers.signatures import plivo_v3_signature, twilio_signature
from carriers.twilio.protocol import verify_request as verify_twilio

URL = "https://voice.example.com/voice/webhook?callId=c1"
FORM = [("CallSid", "CA1"), ("CallStatus", "ringing")]


def test_names_are_lower_cased_once_and_the_first_of_repeated_ones_wins() -> None:
    request = WebhookRequest("POST", "/voice/webhook", URL, {"X-Twilio-Signature": "a", "x-twilio-signature": "b",
                                                             "Telnyx-Timestamp": "1"}, b"")
    assert request.headers == {"x-twilio-signature": "a", "telnyx-timestamp": "1"}
    assert request.header("X-TWILIO-SIGNATURE") == "a" and request.header("missing") is None


@pytest.mark.parametrize("spelling", ["X-Twilio-Signature", "x-twilio-signature", "X-TWILIO-SIGNATURE"])
def test_twilio_signature_header_in_any_case(spelling: str) -> None:
    signature = twilio_signature("token", URL, FORM)
    request = WebhookRequest("POST", "/voice/webhook", URL, {spelling: signature}, b"", form=FORM)
    assert verify_twilio("token", request).ok


@pytest.mark.parametrize("spelling", [str.title, str.lower, str.upper])
def test_plivo_signature_headers_in_any_case(spelling: object) -> None:
    signature = plivo_v3_signature("token", "POST", URL, FORM, "nonce1")
    headers = {spelling("X-Plivo-Signature-V3"): signature, spelling("X-Plivo-Signature-V3-Nonce"): "nonce1"}  # type: ignore[operator]
    request = WebhookRequest("POST", "/voice/webhook", URL, headers, b"", form=FORM)
    assert verify_plivo("token", request).ok
