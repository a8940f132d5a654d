"""The outbound media messages built from fixed templates are byte for byte what json.dumps gives
for the same message (Telnyx, Plivo) or the same JSON document (Twilio), for any payload."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from carriers.plivo.protocol import PlivoStreamCodec
from carriers.telnyx.protocol import TelnyxStreamCodec
from carriers.twilio.protocol import TwilioStreamCodec

payloads = st.binary(min_size=0, max_size=640)


@given(payloads)
def test_telnyx_media_message_is_json_dumps(payload: bytes) -> None:
    expected = json.dumps({"event": "media", "media": {"payload": base64.b64encode(payload).decode("ascii")}})
    assert TelnyxStreamCodec().encode_media(payload) == expected


@given(payloads)
def test_plivo_media_message_is_json_dumps(payload: bytes) -> None:
    expected = json.dumps({"event": "playAudio", "media": {
        "contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": base64.b64encode(payload).decode("ascii")}})
    assert PlivoStreamCodec().encode_media(payload) == expected


@given(payloads)
def test_twilio_media_message_decodes_to_the_payload(payload: bytes) -> None:
    codec = TwilioStreamCodec()
    codec.parse(json.dumps({"event": "start", "start": {"callSid": "CA1", "streamSid": 'MZ"1'}}))
    message = json.loads(codec.encode_media(payload))
    assert message == {"event": "media", "streamSid": 'MZ"1', "media": {"payload": base64.b64encode(payload).decode()}}
