"""provider: asterisk end to end: the real bridge (run_bridge: manager, voices, RPC) against the fake
Asterisk (ARI REST + events WebSocket + ExternalMedia RTP) and the fake OpenAI (TTS and STT)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr

from bridge.calls import CallState
from bridge.runtime import StartupError
from media.dtmf import DtmfDetector
from tests.fakes.ari_server import FakeAsterisk
from tests.fakes.audio import fake_speech
from tests.fakes.openai_server import FakeOpenAI
from tests.harness import rpc_client, run_bridge, wait_for
from tests.peers.audio import pcm16, windowed_alignment

CALLER = "+15550009999"
GREETING = "Hello from the bridge."


@pytest.fixture
async def fake() -> AsyncIterator[FakeAsterisk]:
    async with FakeAsterisk() as server:
        yield server


@pytest.fixture
async def openai() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI(transcripts=["I would like a table"]).start()
    yield server
    await server.stop()


def config(fake: FakeAsterisk, openai: FakeOpenAI, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "provider": "asterisk",
        "fromNumber": "+15550001234",
        "toNumber": "+15550005678",
        "inboundPolicy": "allowlist",
        "allowFrom": [CALLER],
        "inboundGreeting": GREETING,
        "outbound": {"notifyHangupDelaySec": 1},
        "maxConcurrentCalls": 3,
        "streaming": {"enabled": True, "provider": "openai", "providers": {
            "openai": {"apiKey": openai.api_key, "baseUrl": openai.base_url, "silenceDurationMs": 200}}},
        "tts": {"provider": "openai", "openai": {"apiKey": openai.api_key, "baseUrl": openai.base_url}},
        "responseModel": "offline",
        "asterisk": fake.config(rtpPortStart=43400, rtpPortRange=100),
    }
    cfg.update(overrides)
    return cfg


def tts_at_8k(text: str) -> np.ndarray:
    """What the fake OpenAI TTS says for `text`, as the phone gets it (8 kHz)."""
    return soxr.resample(pcm16(fake_speech(text, 24000)), 24000, 8000, quality="HQ")


def voiced(seconds_silence: float, text: str) -> bytes:
    return b"\x00" * int(seconds_silence * 16000) + fake_speech(text, 8000)


async def test_inbound_call_greets_hears_the_caller_and_takes_dtmf(tmp_path: Path, fake: FakeAsterisk,
                                                                   openai: FakeOpenAI) -> None:
    speech = voiced(2.0, "a table for two at eight please")  # silent while the greeting plays
    async with run_bridge(config(fake, openai), tmp_path) as runtime:
        phone = fake.inbound_call(caller=CALLER, exten="100", audio=speech)
        await wait_for(lambda: bool(runtime.manager.calls), timeout=5)
        call = next(iter(runtime.manager.calls.values()))
        assert (call.from_, call.to, call.providerCallId) == (CALLER, "100", phone.id)
        # the caller's words reach the pipeline: the STT engine transcribes them
        await wait_for(lambda: any(e.speaker == "user" for e in call.transcript), timeout=15)
        assert next(e.text for e in call.transcript if e.speaker == "user") == "I would like a table"
        session = openai.sessions[0]
        reference = pcm16(speech)
        if session.rate != 8000:
            reference = soxr.resample(reference, 8000, session.rate, quality="HQ")
        median, _ = windowed_alignment(reference, pcm16(bytes(session.audio)), session.rate)
        assert median > 0.9, f"the STT engine did not get the caller's audio (r={median:.3f})"
        # the greeting was heard by the phone
        heard = pcm16(phone.heard)
        median, low = windowed_alignment(tts_at_8k(GREETING), heard)
        assert median > 0.9 and low > 0.8, f"the phone did not hear the greeting (r={median:.3f}/{low:.3f})"
        # DTMF both ways: a key press on the phone; the bot's keys through ARI (Asterisk sends RFC 4733),
        # not as tones on the media leg
        fake.press(phone.id, "42")
        await wait_for(lambda: call.metadata.get("dtmf") == "42")
        client = rpc_client(runtime)
        before = len(phone.heard)
        await client.call("voicecall.dtmf", {"callId": call.callId, "digits": "7#"})
        assert phone.dtmf_sent == [{"dtmf": "7#", "duration": 100, "between": 100}]
        await wait_for(lambda: len(phone.heard) > before + 8000)
        assert DtmfDetector(8000).process(phone.heard[before:]) == []

        fake.hangup(phone.id)
        await wait_for(lambda: call.terminal)
        assert call.state == CallState.HANGUP_USER
        await wait_for(lambda: not fake.channels and not fake.bridges)


async def test_inbound_call_not_in_allowlist_is_rejected(tmp_path: Path, fake: FakeAsterisk, openai: FakeOpenAI) -> None:
    async with run_bridge(config(fake, openai), tmp_path) as runtime:
        phone = fake.inbound_call(caller="+15550004444")
        await wait_for(lambda: bool(fake.calls_to("DELETE", f"/ari/channels/{phone.id}")), timeout=5)
        assert fake.calls_to("DELETE", f"/ari/channels/{phone.id}") == [{"reason_code": "21"}]
        assert phone.id not in fake.channels and not fake.bridges
        assert not fake.calls_to("POST", f"/ari/channels/{phone.id}/answer")
        assert not runtime.manager.active_calls()


async def test_outbound_notify_rings_speaks_and_hangs_up(tmp_path: Path, fake: FakeAsterisk, openai: FakeOpenAI) -> None:
    message = "Your table is ready."
    async with run_bridge(config(fake, openai), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": message, "mode": "notify"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: bool(fake.originated()), timeout=5)
        channel = fake.originated()[0]
        assert channel.originate is not None and channel.originate["endpoint"] == "PJSIP/+15550005678@trunk"
        assert call.providerCallId == channel.id
        fake.ring(channel.id)
        await wait_for(lambda: call.state == CallState.RINGING)
        fake.answer(channel.id)
        await wait_for(lambda: call.terminal, timeout=15)
        assert call.state == CallState.HANGUP_BOT
        assert fake.calls_to("DELETE", f"/ari/channels/{channel.id}") == [{}]
        median, low = windowed_alignment(tts_at_8k(message), pcm16(channel.heard))
        assert median > 0.9 and low > 0.8, f"the callee did not hear the message (r={median:.3f}/{low:.3f})"
        await wait_for(lambda: not fake.channels and not fake.bridges)


async def test_wrong_ari_password_is_a_clear_startup_error(tmp_path: Path, fake: FakeAsterisk, openai: FakeOpenAI) -> None:
    cfg = config(fake, openai)
    cfg["asterisk"] = {**cfg["asterisk"], "password": "not-the-password"}
    with pytest.raises(StartupError) as info:
        async with run_bridge(cfg, tmp_path):
            pass
    assert "HTTP 401" in str(info.value) and "not-the-password" not in str(info.value)
