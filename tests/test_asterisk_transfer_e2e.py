"""provider: asterisk transfer and keys out through the whole bridge (RPC, transfer controller,
manager, carrier) against the fake ARI server and the fake OpenAI TTS: cold to a person who answers
(the call ends `transferred`, Asterisk keeps caller and person bridged), cold to a busy line (the
caller is told and the call goes on), warm (the person hears the briefing, then Asterisk joins the
two: `joined: carrier`), and `voicecall.dtmf` as ARI DTMF rather than in-band tones."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bridge.calls import CallState
from tests import test_asterisk_e2e as e2e
from tests.fakes.ari_server import FakeAsterisk, FakeChannel
from tests.fakes.openai_server import FakeOpenAI
from tests.harness import rpc_client, run_bridge, wait_for
from tests.peers.audio import pcm16, windowed_alignment
from tests.test_asterisk_e2e import CALLER, tts_at_8k

PERSON = "+15550000006"
fake, openai = e2e.fake, e2e.openai  # the same fake Asterisk and OpenAI (its STT unused here)


def config(fake: FakeAsterisk, openai: FakeOpenAI) -> dict[str, Any]:
    return e2e.config(
        fake, openai, inboundPolicy="open", inboundGreeting="Hi.", streaming={"enabled": True, "provider": "none"},
        transfer={"holdMessage": "One moment.", "outcomeTimeoutMs": 10_000, "ringTimeoutMs": 10_000},
        asterisk=fake.config(rtpPortStart=43600, rtpPortRange=100, dtmfDurationMs=160, dtmfGapMs=80))


async def _live_call(runtime: Any, fake: FakeAsterisk) -> tuple[Any, FakeChannel]:
    phone = fake.inbound_call(caller=CALLER, exten="100")
    await wait_for(lambda: bool(runtime.manager.calls), timeout=5)
    call = next(iter(runtime.manager.calls.values()))
    await wait_for(lambda: call.state == CallState.LISTENING, timeout=10)
    return call, phone


async def _transfer(runtime: Any, fake: FakeAsterisk, call: Any, mode: str, *, answers: bool,
                    summary: str | None = None) -> tuple[dict[str, Any], FakeChannel]:
    """Transfer `call` to PERSON over RPC; the person's channel answers or is busy. (RPC result, person)"""
    params = {"callId": call.callId, "to": PERSON, "mode": mode, **({"summary": summary} if summary else {})}
    task = asyncio.ensure_future(rpc_client(runtime).call("voicecall.transfer", params))
    await wait_for(lambda: bool(fake.originated()), timeout=10)
    person = fake.originated()[-1]
    (fake.answer if answers else fake.busy)(person.id)
    return await task, person


async def _caller_and_person_talk(fake: FakeAsterisk, phone: FakeChannel, person: FakeChannel) -> None:
    """Asterisk holds the caller and the person in one bridge, the bot's media channel gone from it."""
    bridge = fake.bridge_of(phone.id)
    assert bridge is not None
    await wait_for(lambda: bridge.channels == [phone.id, person.id])


async def _hang_up(fake: FakeAsterisk, channel: FakeChannel) -> None:
    """`channel` hangs up: every channel and bridge goes with it."""
    fake.hangup(channel.id)
    await wait_for(lambda: not fake.channels and not fake.bridges)


async def test_cold_transfer_hands_the_caller_to_the_person(tmp_path: Path, fake: FakeAsterisk,
                                                            openai: FakeOpenAI) -> None:
    async with run_bridge(config(fake, openai), tmp_path) as runtime:
        call, phone = await _live_call(runtime, fake)
        result, person = await _transfer(runtime, fake, call, "cold", answers=True)
        assert person.originate is not None and person.originate["endpoint"] == f"PJSIP/{PERSON}@trunk"
        assert result["success"] and result["outcome"] == "completed", result
        assert call.state is CallState.TRANSFERRED and call.metadata["transferredTo"] == PERSON
        await _caller_and_person_talk(fake, phone, person)
        await _hang_up(fake, phone)


async def test_cold_transfer_to_a_busy_line_comes_back_to_the_caller(tmp_path: Path, fake: FakeAsterisk,
                                                                     openai: FakeOpenAI) -> None:
    async with run_bridge(config(fake, openai), tmp_path) as runtime:
        call, phone = await _live_call(runtime, fake)
        result, _ = await _transfer(runtime, fake, call, "cold", answers=False)
        assert not result["success"] and result["outcome"] == "busy", result
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=10)
        assert "busy" in call.transcript[-1].text and call.transcript[-1].speaker == "bot"
        failure = tts_at_8k(call.transcript[-1].text)
        await wait_for(lambda: len(phone.heard) >= len(failure) * 2, timeout=10)
        median, _ = windowed_alignment(failure, pcm16(phone.heard))
        assert median > 0.9, f"the caller did not hear why (r={median:.3f})"

        # keys out on the call that went on: ARI DTMF with the configured timing, not in-band tones
        await rpc_client(runtime).call("voicecall.dtmf", {"callId": call.callId, "digits": "7#"})
        assert fake.channels[phone.id].dtmf_sent == [{"dtmf": "7#", "duration": 160, "between": 80}]
        await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})
        assert call.state is CallState.HANGUP_BOT


async def test_warm_transfer_briefs_the_person_then_asterisk_joins_them(tmp_path: Path, fake: FakeAsterisk,
                                                                      openai: FakeOpenAI) -> None:
    summary = "Sam wants to move his Thursday appointment."
    async with run_bridge(config(fake, openai), tmp_path) as runtime:
        call, phone = await _live_call(runtime, fake)
        result, person = await _transfer(runtime, fake, call, "warm", answers=True, summary=summary)
        assert result["success"] and result["transfer"]["joined"] == "carrier", result
        briefing = runtime.settings.transfer.briefing.replace("{summary}", summary)
        median, _ = windowed_alignment(tts_at_8k(briefing), pcm16(person.heard))
        assert median > 0.9, f"the person did not hear the briefing (r={median:.3f})"
        person_call = runtime.manager.calls[call.transfer.personCallId]
        assert call.state is CallState.TRANSFERRED and person_call.state is CallState.TRANSFERRED
        await _caller_and_person_talk(fake, phone, person)
        assert not fake.calls_to("DELETE", f"/ari/channels/{phone.id}")
        assert not fake.calls_to("DELETE", f"/ari/channels/{person.id}")
        await _hang_up(fake, person)


async def test_warm_transfer_to_a_busy_person_comes_back_to_the_caller(tmp_path: Path, fake: FakeAsterisk,
                                                                       openai: FakeOpenAI) -> None:
    async with run_bridge(config(fake, openai), tmp_path) as runtime:
        call, phone = await _live_call(runtime, fake)
        result, _ = await _transfer(runtime, fake, call, "warm", answers=False, summary="A question.")
        assert not result["success"] and result["outcome"] == "busy", result
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=10)
        assert runtime.manager.calls[call.transfer.personCallId].state is CallState.BUSY
        bridge = fake.bridge_of(phone.id)
        assert bridge is not None and len(bridge.channels) == 2  # still the caller and the bot's media
        await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})
        await wait_for(lambda: not fake.channels and not fake.bridges)
