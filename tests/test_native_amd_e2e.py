"""Carrier-native answering-machine detection end to end, over real sockets against the carrier fakes:
Twilio AsyncAmd (the async callback with AnsweredBy), Telnyx `answering_machine_detection`
(`call.machine.*` webhooks), Plivo `machine_detection` (its callback; a person gets none). Each in
detect, hangup and leave-message: the fake records what the bridge asked for on the dial, sends the
carrier's callbacks with their real field names, and records what the callee heard and when."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.calls import CallState
from media import g711
from media.formats import AudioEncoding
from tests.fakes.amd_set import MACHINE_TEXTS, machine
from tests.fakes.plivo_server import FakePlivo
from tests.fakes.telnyx_server import FakeTelnyx
from tests.fakes.twilio_server import CallerScript, FakeTwilio
from tests.harness import run_bridge, wait_for

OUR_NUMBER = "+15550001234"
PERSON = "+15550007777"
MACHINE = "+15550000005"  # Telnyx's fake: a machine with a beep
MESSAGE = "This is the pharmacy: your order is ready."


def loud_ms(ulaw: bytes) -> float:
    """How much of what the callee heard was sound (not line silence), in ms."""
    pcm = np.frombuffer(g711.decode(ulaw, AudioEncoding.PCMU), dtype="<i2").astype(np.float64)
    frames = pcm[: len(pcm) // 160 * 160].reshape(-1, 160)
    return float((np.sqrt((frames**2).mean(axis=1)) > 300).sum() * 20)


def common(mode: str) -> dict[str, Any]:
    return {"fromNumber": OUR_NUMBER, "outbound": {"notifyHangupDelaySec": 0, "machineDetection": mode},
            "maxConcurrentCalls": 3, "tts": {"provider": "espeak"}, "responseModel": "none",
            "streaming": {"enabled": True, "provider": "none", "disconnectGraceMs": 500}}


# ====================================================================== Twilio


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(say_chars_per_second=40) as server:
        yield server


def twilio_config(fake: FakeTwilio, mode: str) -> dict[str, Any]:
    return {"provider": "twilio", **common(mode),
            "twilio": {"accountSid": fake.account_sid, "authToken": fake.auth_token, "apiBaseUrl": fake.api_base_url}}


async def test_twilio_detect_a_person_gets_the_message_after_the_async_verdict(twilio: FakeTwilio,
                                                                               tmp_path: Path) -> None:
    twilio.scripts[PERSON] = CallerScript(amd_ms=600)
    async with run_bridge(twilio_config(twilio, "detect"), tmp_path) as runtime:
        call = await runtime.manager.initiate(PERSON, MESSAGE, "notify")
        await wait_for(lambda: call.terminal, timeout=20)
        [form] = twilio.rest("POST", "/Calls.json")
        assert (form["MachineDetection"], form["AsyncAmd"]) == (["Enable"], ["true"])
        assert form["AsyncAmdStatusCallback"] == [runtime.manager.webhook_url(callId=call.callId, type="amd")]
        meta = call.metadata
        assert (meta["answeredBy"], meta["amdCause"], meta["amdDecisionMs"]) == ("human", "twilio:human", 600)
        assert call.state == CallState.HANGUP_BOT and [e.text for e in call.transcript] == [MESSAGE]
        stream = twilio.calls[call.providerCallId or ""].streams[0]
        [amd] = [h for h in twilio.calls[call.providerCallId or ""].webhooks if "type=amd" in h.url]
        assert amd.params["AnsweredBy"] == "human" and amd.status == 200
        assert loud_ms(stream.heard_ulaw()) > 1000, "the person heard the message"


async def test_twilio_hangup_ends_a_machine_at_once_without_a_word(twilio: FakeTwilio, tmp_path: Path) -> None:
    twilio.scripts[MACHINE] = CallerScript(machine=True, amd_ms=400)
    async with run_bridge(twilio_config(twilio, "hangup"), tmp_path) as runtime:
        call = await runtime.manager.initiate(MACHINE, MESSAGE, "notify")
        await wait_for(lambda: call.terminal, timeout=20)
        assert call.state == CallState.HANGUP_BOT
        assert (call.metadata["answeredBy"], call.metadata["amdCause"]) == ("machine", "twilio:machine_start")
        fake_call = twilio.calls[call.providerCallId or ""]
        assert {"Status": ["completed"]} in twilio.rest("POST", f"/Calls/{fake_call.sid}.json")
        assert call.transcript == [] and loud_ms(fake_call.streams[0].heard_ulaw()) == 0


async def test_twilio_leave_message_speaks_after_machine_end_beep_and_ends_voicemail(twilio: FakeTwilio,
                                                                                     tmp_path: Path) -> None:
    twilio.scripts[MACHINE] = CallerScript(machine=True, amd_ms=1500)
    async with run_bridge(twilio_config(twilio, "leave-message"), tmp_path) as runtime:
        call = await runtime.manager.initiate(MACHINE, MESSAGE, "conversation")
        await wait_for(lambda: call.terminal, timeout=25)
        [form] = twilio.rest("POST", "/Calls.json")
        assert form["MachineDetection"] == ["DetectMessageEnd"]
        assert call.state == CallState.VOICEMAIL and call.metadata["voicemailAfter"] == "beep"
        assert call.metadata["amdCause"] == "twilio:machine_end_beep"
        fake_call = twilio.calls[call.providerCallId or ""]
        [amd] = [h for h in fake_call.webhooks if "type=amd" in h.url]
        stream = fake_call.streams[0]
        first_sound = next(t for t, payload in stream.received if loud_ms(payload))
        callback_at = stream.sent_at[0] + 1.5  # the stream started at the answer; the callback 1.5 s later
        assert first_sound >= callback_at - 0.2, "nothing was said before the beep"
        assert amd.params["AnsweredBy"] == "machine_end_beep" and [e.text for e in call.transcript] == [MESSAGE]


async def test_twilio_local_detector_asks_twilio_for_nothing(twilio: FakeTwilio, tmp_path: Path) -> None:
    """amd.detector: local — the bridge's own detector listens to the stream (a silent line: NOAUDIO... no,
    Twilio streams silence, so a person who never speaks is `unknown` after amd.totalAnalysisTime)."""
    cfg = twilio_config(twilio, "detect")
    cfg["amd"] = {"detector": "local", "totalAnalysisTime": 1500}
    async with run_bridge(cfg, tmp_path) as runtime:
        call = await runtime.manager.initiate(PERSON, MESSAGE, "notify")
        await wait_for(lambda: "answeredBy" in call.metadata, timeout=20)
        [form] = twilio.rest("POST", "/Calls.json")
        assert not [k for k in form if "MachineDetection" in k or "Amd" in k]
        assert call.metadata["answeredBy"] == "unknown" and not call.metadata["amdCause"].startswith("twilio:")
        await wait_for(lambda: call.terminal, timeout=20)


# ====================================================================== Telnyx


@pytest.fixture
async def telnyx() -> AsyncIterator[FakeTelnyx]:
    async with FakeTelnyx() as server:
        yield server


def telnyx_config(fake: FakeTelnyx, mode: str) -> dict[str, Any]:
    return {"provider": "telnyx", **common(mode), "telnyx": fake.config()}


async def test_telnyx_detect_a_person(telnyx: FakeTelnyx, tmp_path: Path) -> None:
    async with run_bridge(telnyx_config(telnyx, "detect"), tmp_path) as runtime:
        call = await runtime.manager.initiate(PERSON, MESSAGE, "notify")
        await wait_for(lambda: call.terminal, timeout=20)
        tx = telnyx.calls[call.providerCallId or ""]
        assert tx.dial["answering_machine_detection"] == "detect"
        assert (call.metadata["answeredBy"], call.metadata["amdCause"]) == ("human", "telnyx:detection:human")
        assert call.state == CallState.HANGUP_BOT and [e.text for e in call.transcript] == [MESSAGE]


async def test_telnyx_hangup_a_machine_once_however_often_delivered(telnyx: FakeTelnyx, tmp_path: Path) -> None:
    telnyx.redeliver = 1  # every webhook twice: same data.id, new signature
    async with run_bridge(telnyx_config(telnyx, "hangup"), tmp_path) as runtime:
        call = await runtime.manager.initiate(MACHINE, MESSAGE, "notify")
        await wait_for(lambda: call.terminal, timeout=20)
        tx = telnyx.calls[call.providerCallId or ""]
        await wait_for(lambda: sum(1 for e, _ in tx.webhooks if e == "call.machine.detection.ended") == 2)
        assert call.state == CallState.HANGUP_BOT and call.metadata["answeredBy"] == "machine"
        assert tx.received.count("hangup") == 1 and call.transcript == []


async def test_telnyx_leave_message_after_greeting_ended(telnyx: FakeTelnyx, tmp_path: Path) -> None:
    telnyx.amd_s = 0.6
    async with run_bridge(telnyx_config(telnyx, "leave-message"), tmp_path) as runtime:
        call = await runtime.manager.initiate(MACHINE, MESSAGE, "conversation")
        await wait_for(lambda: call.terminal, timeout=25)
        tx = telnyx.calls[call.providerCallId or ""]
        assert tx.dial["answering_machine_detection"] == "greeting_end"
        assert call.state == CallState.VOICEMAIL and call.metadata["voicemailAfter"] == "beep"
        assert [e for e, _ in tx.webhooks if e.startswith("call.machine")] == [
            "call.machine.detection.ended", "call.machine.greeting.ended"]
        assert [e.text for e in call.transcript] == [MESSAGE]


# ====================================================================== Plivo


@pytest.fixture
async def plivo() -> AsyncIterator[FakePlivo]:
    async with FakePlivo() as fake:
        yield fake


def plivo_config(fake: FakePlivo, mode: str) -> dict[str, Any]:
    return {"provider": "plivo", **common(mode), "ringTimeoutMs": 5000,
            "plivo": {"authId": fake.auth_id, "authToken": fake.auth_token, "apiBaseUrl": fake.base_url,
                      "machineDetectionTime": 2000}}


async def test_plivo_detect_no_callback_means_a_person(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(plivo_config(plivo, "detect"), tmp_path) as runtime:
        call = await runtime.manager.initiate(PERSON, MESSAGE, "notify")
        await wait_for(lambda: call.terminal, timeout=20)
        [create] = plivo.rest("POST", "/Call/")
        assert (create.body["machine_detection"], create.body["machine_detection_time"]) == ("true", 2000)
        assert call.metadata["answeredBy"] == "human" and call.metadata["amdCause"].startswith("NOCALLBACK-")
        assert 4000 <= call.metadata["amdDecisionMs"] < 6000  # machine_detection_time + 2 s of slack
        assert [e.text for e in call.transcript] == [MESSAGE] and plivo.callbacks_for("machine") == []


async def test_plivo_hangup_a_machine(plivo: FakePlivo, tmp_path: Path) -> None:
    plivo.machine_numbers.add(MACHINE)
    async with run_bridge(plivo_config(plivo, "hangup"), tmp_path) as runtime:
        call = await runtime.manager.initiate(MACHINE, MESSAGE, "notify")
        await wait_for(lambda: call.terminal, timeout=20)
        assert call.state == CallState.HANGUP_BOT
        assert (call.metadata["answeredBy"], call.metadata["amdCause"]) == ("machine", "plivo:Machine=true")
        [callback] = plivo.callbacks_for("machine")
        assert callback.params["Machine"] == "true" and callback.params["Event"] == "MachineDetection"
        await wait_for(lambda: bool(plivo.rest("DELETE", f"/Call/{plivo.call().uuid}/")), 5)
        assert call.transcript == []


async def test_plivo_leave_message_finds_the_beep_in_the_stream(plivo: FakePlivo, tmp_path: Path) -> None:
    """Plivo says machine but not when the greeting ends: the local end-of-greeting detector hears the beep."""
    greeting = machine(MACHINE_TEXTS[0], "en-us", 165, beep_hz=1000.0, snr_db=None, seed=2, lead_ms=200, tail_ms=1500)
    plivo.machine_numbers.add(MACHINE)
    plivo.machine_audio = g711.encode(greeting.pcm, AudioEncoding.PCMU)
    async with run_bridge(plivo_config(plivo, "leave-message"), tmp_path) as runtime:
        call = await runtime.manager.initiate(MACHINE, MESSAGE, "conversation")
        await wait_for(lambda: call.terminal, timeout=30)
        assert call.state == CallState.VOICEMAIL and call.metadata["voicemailAfter"] == "beep"
        assert call.metadata["answeredBy"] == "machine"
        stream = plivo.call().stream
        assert stream is not None and stream.play_audio_frames > 0
        assert [e.text for e in call.transcript] == [MESSAGE]
        # the message began right after the beep ended (the greeting started with the stream)
        assert greeting.beep_end_ms is not None and stream.opened_at is not None and stream.first_play_at is not None
        after_beep_ms = (stream.first_play_at - stream.opened_at) * 1000 - greeting.beep_end_ms
        assert -50 <= after_beep_ms <= 1500, after_beep_ms
