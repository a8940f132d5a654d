"""Keys out on every HTTP carrier and the mock, end to end over real sockets: RPC `voicecall.dtmf`, the
agent tool's `send_dtmf` and `dtmfSequence` on `voicecall.initiate`. Twilio: `<Play digits>` replaces
the TwiML and ends the media stream, so the bridge sends a fresh `<Connect><Stream>` after it and the
call goes on over the new stream (no hang-up, same transcript, the bot still heard). Telnyx
`actions/send_dtmf`, Plivo `POST …/DTMF/`, as the fakes record them. The mock: tones in the call's
audio, decoded by the callee like an IVR would."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from bridge.calls import CallState
from bridge.tool import dispatch
from tests.fakes.plivo_server import FakePlivo
from tests.fakes.telnyx_server import FakeTelnyx
from tests.fakes.twilio_server import FakeTwilio
from tests.harness import rpc_client, run_bridge, wait_for

OUR_NUMBER = "+15550001234"
PERSON = "+15550007777"


def common(**extra: Any) -> dict[str, Any]:
    return {"fromNumber": OUR_NUMBER, "outbound": {"notifyHangupDelaySec": 0}, "maxConcurrentCalls": 3,
            "tts": {"provider": "espeak"}, "responseModel": "none",
            "streaming": {"enabled": True, "provider": "none", "disconnectGraceMs": 0}, **extra}


# ====================================================================== Twilio


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(say_chars_per_second=40) as server:
        yield server


def twilio_config(fake: FakeTwilio) -> dict[str, Any]:
    return {"provider": "twilio", **common(),
            "twilio": {"accountSid": fake.account_sid, "authToken": fake.auth_token, "apiBaseUrl": fake.api_base_url}}


async def test_twilio_keys_restart_the_stream_and_the_call_goes_on(twilio: FakeTwilio, tmp_path: Path) -> None:
    """disconnectGraceMs is 0: only the expected restart keeps the call up while Twilio swaps streams."""
    async with run_bridge(twilio_config(twilio), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"to": PERSON, "message": "Connecting you now.",
                                                            "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        fake_call = twilio.calls[call.providerCallId or ""]
        first = fake_call.streams[0]
        assert await client.call("voicecall.dtmf", {"callId": call_id, "digits": "1234#"}) == {"success": True}
        await wait_for(lambda: len(fake_call.streams) == 2 and runtime.manager.voice(call_id) is not None
                       and call.media_attached, timeout=10)
        [update] = [f["Twiml"][0] for f in twilio.rest("POST", f"/Calls/{fake_call.sid}.json") if "Twiml" in f]
        doc = ET.fromstring(update)
        assert [el.tag for el in doc] == ["Play", "Connect"] and doc[0].get("digits") == "1234#"
        params = {p.get("name"): p.get("value") for p in doc.iter("Parameter")}
        assert params == {"token": call.metadata["streamToken"], "callId": call_id}
        assert fake_call.played_digits == ["1234#"] and first.closed.is_set()
        # the call goes on over the new stream: same record, the bot speaks and is heard
        await client.call("voicecall.speak", {"callId": call_id, "message": "Thanks, one moment."})
        second = fake_call.streams[1]
        assert second.ms_received > 500 and not call.terminal
        assert [e.text for e in call.transcript] == ["Connecting you now.", "Thanks, one moment."]
        # the agent tool's send_dtmf takes the same path
        assert await dispatch(runtime.dispatcher.call, {"action": "send_dtmf", "callId": call_id,
                                                        "digits": "9"}) == {"success": True}
        await wait_for(lambda: len(fake_call.streams) == 3 and call.media_attached, timeout=10)
        assert fake_call.played_digits == ["1234#", "9"] and not call.terminal
        await client.call("voicecall.end", {"callId": call_id})


async def test_twilio_keys_out_keeps_the_recording_from_before_the_new_stream(twilio: FakeTwilio,
                                                                             tmp_path: Path) -> None:
    """The new stream gets a new recorder for the same file: it appends, the first part stays."""
    config = twilio_config(twilio) | {"recording": {"enabled": True}}
    async with run_bridge(config, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"to": PERSON, "message": "Connecting you now.",
                                                            "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        fake_call = twilio.calls[call.providerCallId or ""]
        await client.call("voicecall.dtmf", {"callId": call_id, "digits": "5"})
        await wait_for(lambda: len(fake_call.streams) == 2 and call.media_attached, timeout=10)
        await client.call("voicecall.speak", {"callId": call_id, "message": "Thanks, one moment."})
        await client.call("voicecall.end", {"callId": call_id})
        await wait_for(lambda: call.terminal, timeout=10)
        path = runtime.settings.store_dir / "recordings" / f"{call_id}.wav"
    heard_ms = [stream.ms_received for stream in fake_call.streams]
    assert heard_ms[0] > 500 and heard_ms[1] > 500
    data, rate = sf.read(path, dtype="int16")
    frame = rate // 50
    bot = data[: len(data) // frame * frame, 1].reshape(-1, frame)
    recorded_ms = int(np.count_nonzero(np.abs(bot).max(axis=1))) * 20
    # what the caller heard on both streams is in the one file (only the second part without the append)
    assert recorded_ms >= 0.9 * sum(heard_ms), (recorded_ms, heard_ms)


async def test_twilio_dtmf_sequence_is_one_play_with_its_pauses(twilio: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(twilio_config(twilio), tmp_path) as runtime:
        call = await runtime.manager.initiate(PERSON, "You are through.", "notify", dtmf_sequence="12w3#")
        await wait_for(lambda: call.terminal, timeout=20)
        fake_call = twilio.calls[call.providerCallId or ""]
        assert fake_call.played_digits == ["12w3#"] and call.state == CallState.HANGUP_BOT
        assert [e.text for e in call.transcript] == ["You are through."], "the message follows the keys"


# ====================================================================== Telnyx


@pytest.fixture
async def telnyx() -> AsyncIterator[FakeTelnyx]:
    async with FakeTelnyx() as server:
        yield server


async def test_telnyx_keys_are_send_dtmf_commands(telnyx: FakeTelnyx, tmp_path: Path) -> None:
    async with run_bridge({"provider": "telnyx", **common(), "telnyx": telnyx.config()}, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"to": PERSON, "message": "Hello.", "mode": "conversation",
                                                            "dtmfSequence": "1w2"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        assert await client.call("voicecall.dtmf", {"callId": call_id, "digits": "*9A"}) == {"success": True}
        tx = telnyx.calls[call.providerCallId or ""]
        assert tx.dtmf_sent == ["1w2", "*9A"]
        body = next(b for name, b in tx.commands if name == "send_dtmf")
        assert body["duration_millis"] == 250 and body["command_id"]
        assert call.media_attached and not call.terminal, "the stream is untouched"
        await client.call("voicecall.end", {"callId": call_id})


# ====================================================================== Plivo


@pytest.fixture
async def plivo() -> AsyncIterator[FakePlivo]:
    async with FakePlivo() as fake:
        yield fake


async def test_plivo_keys_are_dtmf_requests(plivo: FakePlivo, tmp_path: Path) -> None:
    cfg = {"provider": "plivo", **common(),
           "plivo": {"authId": plivo.auth_id, "authToken": plivo.auth_token, "apiBaseUrl": plivo.base_url}}
    async with run_bridge(cfg, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"to": PERSON, "message": "Hello.", "mode": "conversation",
                                                            "dtmfSequence": "1w2"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        assert await client.call("voicecall.dtmf", {"callId": call_id, "digits": "#0"}) == {"success": True}
        uuid = plivo.call().uuid
        assert plivo.dtmf_sent == [(uuid, "1"), (uuid, "2"), (uuid, "#0")]
        assert [r.body for r in plivo.rest("POST", f"/Call/{uuid}/DTMF/")][-1] == {"digits": "#0", "leg": "aleg"}
        await client.call("voicecall.end", {"callId": call_id})


# ====================================================================== mock


async def test_mock_keys_reach_the_callee_as_tones(tmp_path: Path) -> None:
    mock = {"ringDelayMs": 50, "answerDelayMs": 100, "calleeScript": [], "calleeHangupAfterMs": 0}
    async with run_bridge({"provider": "mock", **common(), "mock": mock}, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"to": PERSON, "message": "Hi.",
                                                            "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        await client.call("voicecall.dtmf", {"callId": call_id, "digits": "159#"})
        callee = runtime.carrier.callee(call_id)
        await wait_for(lambda: callee.keys_heard == "159#", timeout=10)
        assert await dispatch(runtime.dispatcher.call, {"action": "send_dtmf", "callId": call_id,
                                                        "digits": "0"}) == {"success": True}
        await wait_for(lambda: callee.keys_heard == "159#0", timeout=10)
        await client.call("voicecall.end", {"callId": call_id})
