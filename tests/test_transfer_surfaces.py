"""The transfer's other surfaces on the mock carrier: the conversation model's `transfer_call` tool
(through the fake OpenAI chat API), the CLI `voicecall transfer`, and the `voice_call` agent tool's
`transfer_call` action; plus the after-call report's `transfer` field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.calls import CallState
from bridge.tool import TOOL_SCHEMA, dispatch
from tests.fakes.openai_server import ChatReply, FakeOpenAI
from tests.fakes.report_receiver import SECRET, Receiver
from tests.harness import rpc_client, run_bridge, wait_for
from tests.test_rpc_cli_tool import cli

FAST_MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0}
TRANSFER = {"holdMessage": "One moment.", "briefing": "{summary}", "failureMessage": "Sorry, {reason}."}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    yield server
    await server.stop()


async def test_the_model_hands_the_caller_over_with_its_tool(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("Putting you through.", tool_calls=[("transfer_call", '{"to": "+15550009999"}')])]
    receiver = Receiver()
    config = {
        "provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678",
        "streaming": {"enabled": True, "provider": "none"},
        "tts": {"provider": "openai", "openai": {"apiKey": fake.api_key, "baseUrl": fake.base_url}},
        "responseModel": "openai/gpt-4o-mini", "responseBaseUrl": fake.base_url, "responseApiKey": fake.api_key,
        "mock": {**FAST_MOCK, "calleeScript": ["Put me through to sales, please."]}, "transfer": TRANSFER,
        "hooks": {"callEnded": {"url": await receiver.start(), "secret": SECRET}},
    }
    try:
        async with run_bridge(config, tmp_path) as runtime:
            result = await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"})
            call = runtime.manager.calls[result["callId"]]
            await wait_for(lambda: call.terminal, timeout=30)
            assert call.state == CallState.TRANSFERRED and call.metadata["transferredTo"] == "+15550009999"
            tools = [t["function"]["name"] for t in fake.chat_requests[0]["tools"]]
            assert "transfer_call" in tools
            await wait_for(lambda: bool(call.toolCalls), timeout=5)  # recorded once the tool returned
            assert [(t.name, t.result) for t in call.toolCalls] == [
                ("transfer_call", "The caller is now connected to +15550009999.")]
            assert runtime.carrier.transfers == [(call.callId, "+15550009999", "completed")]
            await wait_for(lambda: len(receiver.accepted) == 1, timeout=10)
            (report,) = receiver.accepted.values()
            assert report["endReason"] == "transferred"
            assert report["transfer"]["to"] == "+15550009999" and report["transfer"]["outcome"] == "completed"
    finally:
        await receiver.stop()


async def test_cli_and_agent_tool_transfer(tmp_path: Path) -> None:
    config = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678",
              "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
              "responseModel": "offline", "mock": {**FAST_MOCK, "calleeScript": []}, "transfer": TRANSFER}
    assert "transfer_call" in TOOL_SCHEMA["function"]["parameters"]["properties"]["action"]["enum"]
    async with run_bridge(config, tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/rpc"
        result = await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"})
        call = runtime.manager.calls[result["callId"]]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        proc = await asyncio.to_thread(cli, "transfer", "--call-id", call.callId, "--to", "+15550000002", url=url)
        assert proc.returncode == 1 and proc.stdout.startswith("transfer busy (call "), proc  # still on the line
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        proc = await asyncio.to_thread(cli, "transfer", "--call-id", call.callId, "--to", "nobody", url=url)
        assert proc.returncode == 1 and proc.stderr.strip().startswith("voicecall: `to` must be an E.164 number")
        # the agent tool: same RPC path
        missing = await dispatch(runtime.dispatcher.call, {"action": "transfer_call", "callId": call.callId})
        assert missing == {"error": "transfer_call needs to"}
        done = await dispatch(runtime.dispatcher.call, {"action": "transfer_call", "callId": call.callId,
                                                        "to": "+15550009999", "transferMode": "cold"})
        assert done["success"] and done["outcome"] == "completed" and done["state"] == "transferred"
        assert call.state == CallState.TRANSFERRED
        proc = await asyncio.to_thread(cli, "status", "--call-id", call.callId, "--json", url=url)
        assert json.loads(proc.stdout)["call"]["transfer"]["outcome"] == "completed"


async def test_the_model_asks_for_a_warm_transfer_and_writes_the_briefing(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("Let me get a nurse.", tool_calls=[("transfer_call",
                                                                     '{"to": "+15550000006", "mode": "warm"}')]),
                        ChatReply("Sam needs a nurse about a prescription.")]
    config = {
        "provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678",
        "streaming": {"enabled": True, "provider": "none"},
        "tts": {"provider": "openai", "openai": {"apiKey": fake.api_key, "baseUrl": fake.base_url}},
        "responseModel": "openai/gpt-4o-mini", "responseBaseUrl": fake.base_url, "responseApiKey": fake.api_key,
        "mock": {**FAST_MOCK, "calleeScript": ["I need a nurse about my prescription."]}, "transfer": TRANSFER,
    }
    async with run_bridge(config, tmp_path) as runtime:
        result = await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"})
        call = runtime.manager.calls[result["callId"]]
        await wait_for(lambda: call.transfer is not None and call.transfer.outcome == "completed", timeout=30)
        assert call.transfer.summary == "Sam needs a nurse about a prescription."
        summary_request = fake.chat_requests[1]["messages"]
        assert summary_request[0]["content"].startswith("You hand a phone caller over to a colleague")
        assert "Caller: I need a nurse about my prescription." in summary_request[1]["content"]
        person_call = runtime.manager.calls[call.transfer.personCallId]
        assert [t.text for t in person_call.transcript if t.speaker == "bot"] == [
            "Sam needs a nurse about a prescription."]
        assert call.state == CallState.TRANSFERRING and call.transfer.joined == "relay"
        assert len(fake.chat_requests) == 2, "the model stays quiet once the caller is with the person"
