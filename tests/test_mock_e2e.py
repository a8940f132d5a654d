"""End to end on the mock carrier through the real server: RPC over HTTP, audio through the MediaPipeline."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from bridge.calls import CallState
from tests.harness import rpc_client, run_bridge, wait_for

FAST_MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0}
BASE = {
    "provider": "mock",
    "fromNumber": "+15550001234",
    "toNumber": "+15550005678",
    "inboundPolicy": "allowlist",
    "allowFrom": ["+15550009999"],
    "outbound": {"notifyHangupDelaySec": 1},
    "maxConcurrentCalls": 3,
    "streaming": {"enabled": True, "provider": "none"},
    "tts": {"provider": "espeak"},
    "responseModel": "offline",
    "mock": FAST_MOCK,
}


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(bytes(pcm), dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


async def test_notify_call_speaks_then_hangs_up_after_playback(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": []}}, tmp_path) as runtime:
        client = rpc_client(runtime)
        result = await client.call("voicecall.initiate", {"message": "Your table is ready.", "mode": "notify"})
        assert result["initiated"] is True
        call_id = result["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.terminal, timeout=20)
        callee = runtime.carrier.callee(call_id)
        assert call.state == CallState.HANGUP_BOT
        heard_s = len(callee.heard) / 2 / 8000
        assert heard_s > 0.8 and rms(callee.heard) > 500, "the callee heard the message"
        # hang-up came notifyHangupDelaySec after the audio ended, not while it played
        spoken_for = call.endedAt - call.answeredAt
        assert spoken_for >= heard_s + 0.9
        status = await client.call("voicecall.status", {"callId": call_id})
        assert status["found"] and status["call"]["transcript"][0]["text"] == "Your table is ready."


async def test_conversation_auto_replies_until_goodbye(tmp_path: Path) -> None:
    script = ["I would like a table for two.", "No thanks, goodbye."]
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": script}}, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hello, how can I help?",
                                                            "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.terminal, timeout=40)
        texts = [(t.speaker, t.text) for t in call.transcript]
        assert texts[0] == ("bot", "Hello, how can I help?")
        assert ("user", script[0]) in texts and ("user", script[1]) in texts
        assert texts[-1] == ("bot", "Thank you for your time. Goodbye!")
        assert call.state == CallState.HANGUP_BOT


async def test_continue_returns_what_the_callee_said(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": ["Blue, definitely."]}}, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hi!", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING and call.answeredAt is not None, timeout=15)
        # the callee answers the greeting with its first line; clear the script so continue gets a fresh one
        await wait_for(lambda: any(t.speaker == "user" for t in call.transcript), timeout=15)
        runtime.carrier.callee(call_id).script.append("Green is my second choice.")
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        reply = await client.call("voicecall.continue", {"callId": call_id, "message": "And your second choice?"})
        assert reply == {"success": True, "transcript": "Green is my second choice."}
        assert call.metadata["turnCount"] == 1 and call.metadata["lastTurnLatencyMs"] > 0
        assert (await client.call("voicecall.end", {"callId": call_id})) == {"success": True}
        assert call.state == CallState.HANGUP_BOT


async def test_inbound_allowlisted_call_is_greeted(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": []}}, tmp_path) as runtime:
        client = rpc_client(runtime)
        result = await client.call("mock.inject", {"from": "+15550009999", "script": []})
        assert result["accepted"] is True
        call = runtime.manager.calls[result["callId"]]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        callee = runtime.carrier.callee(call.callId)
        assert call.transcript[0].text == runtime.settings.inboundGreeting
        assert len(callee.heard) / 16000 > 1.0 and rms(callee.heard) > 500


async def test_inbound_rejected_call_is_hung_up_once(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        client = rpc_client(runtime)
        result = await client.call("mock.inject", {"from": "+15550001111"})
        assert result == {"providerCallId": result["providerCallId"], "accepted": False, "callId": None}
        await wait_for(lambda: runtime.carrier.rejected == [result["providerCallId"]])
        assert runtime.manager.active_calls() == []


@pytest.mark.parametrize(("suffix", "state"), [("0002", CallState.BUSY), ("0004", CallState.FAILED)])
async def test_busy_and_failed_numbers(tmp_path: Path, suffix: str, state: CallState) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        call_id = (await rpc_client(runtime).call("voicecall.initiate",
                                                  {"to": f"+1555000{suffix}", "message": "Hi"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.terminal, timeout=10)
        assert call.state == state


async def test_barge_in_clears_playback_and_transcript_keeps_what_was_heard(tmp_path: Path) -> None:
    long_message = ("This is a rather long announcement about the many opening hours of our store, "
                    "which we will now read out to you in great and loving detail, day by day.")
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": []}}, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        callee = runtime.carrier.callee(call_id)
        speak = asyncio.ensure_future(client.call("voicecall.speak", {"callId": call_id, "message": long_message}))
        await asyncio.sleep(1.5)
        callee.say("Wait, stop please.")
        await asyncio.wait_for(speak, 15)
        assert callee.clears >= 1, "the carrier buffer was cleared"
        bot_line = [t.text for t in call.transcript if t.speaker == "bot"][-1]
        assert bot_line != long_message and long_message.startswith(bot_line.rstrip("…").strip())
        assert 0 < len(bot_line.split()) < len(long_message.split())


async def test_dtmf_from_callee_arrives_as_event(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": []}}, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Press one.", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        await client.call("mock.callee", {"callId": call_id, "action": "press", "digits": "42#"})
        await wait_for(lambda: call.metadata.get("dtmf") == "42#", timeout=5)


async def test_callee_hangs_up(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": []}}, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        await client.call("mock.callee", {"callId": call_id, "action": "hangup"})
        await wait_for(lambda: call.terminal)
        assert call.state == CallState.HANGUP_USER
        lines = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
        assert lines[-1]["callId"] == call_id and lines[-1]["state"] == "hangup-user"
