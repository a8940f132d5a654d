"""Per-number agents (`numbers:`) end to end on the mock carrier through the real server, with the fake
OpenAI as the model and the TTS (it records each request's system prompt and voice): two numbers
answer with their own greeting, prompt and voice; one keeps an allowlist while the other is open;
an outbound call `from` a number speaks as that number's agent; a bad entry is one config line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.calls import CallState
from bridge.client import RpcClientError
from bridge.config import ConfigError, build_settings
from tests.fakes.openai_server import FakeOpenAI
from tests.harness import rpc_client, run_bridge, wait_for

ROOT = Path(__file__).resolve().parents[1]
SALES = "+15550001111"
SUPPORT = "+15550002222"
FRIEND = "+15550009999"
STRANGER = "+15550004444"
MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0}


def config(fake: FakeOpenAI) -> dict[str, Any]:
    return {
        "provider": "mock", "fromNumber": SALES, "maxConcurrentCalls": 4,
        "inboundPolicy": "open",
        "inboundGreeting": "Hello from the main line.",
        "streaming": {"enabled": True, "provider": "none"},
        "tts": {"provider": "openai", "openai": {"apiKey": fake.api_key, "baseUrl": fake.base_url, "voice": "alloy"}},
        "responseModel": "openai/gpt-4o-mini", "responseBaseUrl": fake.base_url, "responseApiKey": fake.api_key,
        "responseSystemPrompt": "You are the main line.",
        "mock": {**MOCK, "calleeScript": ["I would like to know more."]},
        "numbers": {
            SALES: {"inboundGreeting": "Sales desk, how can I help?", "responseSystemPrompt": "You sell bikes."},
            SUPPORT: {"inboundGreeting": "Support here.", "responseSystemPrompt": "You fix bikes.",
                      "inboundPolicy": "allowlist", "allowFrom": [FRIEND], "tts": {"openai": {"voice": "nova"}},
                      "agent": {"consult": False}},
        },
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    yield server
    await server.stop()


def system_prompt(request: dict[str, Any]) -> str:
    return str(request["messages"][0]["content"])


def voices_for(fake: FakeOpenAI, text: str) -> list[str]:
    return [r["voice"] for r in fake.speech_requests if r["input"] == text]


async def inbound(runtime: Any, from_: str, to: str) -> Any:
    result = await rpc_client(runtime).call("mock.inject", {"from": from_, "to": to})
    return runtime.manager.find_call(None, result["providerCallId"]), result


async def test_two_numbers_answer_as_their_own_agents(tmp_path: Path, fake: FakeOpenAI) -> None:
    async with run_bridge(config(fake), tmp_path) as runtime:
        sales, _ = await inbound(runtime, STRANGER, SALES)
        support, _ = await inbound(runtime, FRIEND, SUPPORT)
        await wait_for(lambda: len(fake.chat_requests) == 2, timeout=30)
        assert sales.transcript[0].text == "Sales desk, how can I help?"
        assert support.transcript[0].text == "Support here."
        prompts = sorted(system_prompt(r) for r in fake.chat_requests)
        assert prompts[0].startswith("You fix bikes.") and prompts[1].startswith("You sell bikes.")
        assert voices_for(fake, "Sales desk, how can I help?") == ["alloy"]
        assert voices_for(fake, "Support here.") == ["nova"]
        tools = {system_prompt(r)[:14]: {t["function"]["name"] for t in r["tools"]} for r in fake.chat_requests}
        assert "consult_agent" in tools["You sell bikes"] and "consult_agent" not in tools["You fix bikes."]
        # a number without an entry answers as the top level
        main, _ = await inbound(runtime, STRANGER, "+15550003333")
        await wait_for(lambda: bool(main.transcript), timeout=20)
        assert main.transcript[0].text == "Hello from the main line."
        for call in (sales, support, main):
            await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})


async def test_allowlist_on_one_number_open_on_the_other(tmp_path: Path, fake: FakeOpenAI) -> None:
    async with run_bridge(config(fake), tmp_path) as runtime:
        refused, result = await inbound(runtime, STRANGER, SUPPORT)
        assert refused is None and result["accepted"] is False
        assert runtime.carrier.rejected == [result["providerCallId"]]
        taken, result = await inbound(runtime, STRANGER, SALES)
        assert taken is not None and result["accepted"] is True and not taken.terminal
        await rpc_client(runtime).call("voicecall.end", {"callId": taken.callId})


async def test_an_outbound_call_from_a_number_speaks_as_its_agent(tmp_path: Path, fake: FakeOpenAI) -> None:
    async with run_bridge(config(fake), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"to": "+15550007777", "from": SUPPORT, "mode": "conversation",
                                                            "message": "Hi, this is support calling back."}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: len(fake.chat_requests) == 1 and call.state == CallState.LISTENING, timeout=30)
        assert call.from_ == SUPPORT and system_prompt(fake.chat_requests[0]).startswith("You fix bikes.")
        assert voices_for(fake, "Hi, this is support calling back.") == ["nova"]
        await client.call("voicecall.end", {"callId": call_id})
        with pytest.raises(RpcClientError, match="`from` must be fromNumber or one of the `numbers` keys"):
            await client.call("voicecall.initiate", {"to": "+15550007777", "from": "+15550008888", "message": "Hi"})


def test_a_bad_numbers_entry_is_one_config_line_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_settings({"numbers": {SALES: {"inboundPolicy": "sometimes"}, "sales": {"inboundGreeting": "Hi"},
                                    SUPPORT: {"tts": {"provider": "robot"}}}}, {})
    lines = str(info.value).splitlines()
    assert lines == [
        f"numbers.{SALES}.inboundPolicy: Input should be 'disabled', 'allowlist', 'pairing' or 'open'"]
    with pytest.raises(ConfigError) as info:
        build_settings({"numbers": {"sales": {"inboundGreeting": "Hi"}, SUPPORT: {"tts": {"provider": "robot"}}}}, {})
    assert str(info.value).splitlines() == [
        "numbers.sales: the key must be an E.164 number like +15550001234, a sip: URI (got 'sales')",
        f"numbers.{SUPPORT}.tts.provider: must be one of espeak, openai, elevenlabs, edge (got 'robot')"]
    with pytest.raises(ConfigError) as info:  # carriers open streams per the top level's setting
        build_settings({"numbers": {SALES: {"realtime": {"enabled": True, "apiKey": "sk-x"}}}}, {})
    assert str(info.value) == f"numbers.{SALES}.realtime.enabled: needs streaming.enabled at the top level"
    # SIP users and Asterisk extensions are keys where the carrier has them
    sip = build_settings({"provider": "sip", "numbers": {"sales": {"inboundGreeting": "Sales."},
                                                         "1001": {"inboundGreeting": "Desk 1001."}}}, {})
    assert sip.for_number("sip:sales@192.0.2.1:5060").inboundGreeting == "Sales."
    assert sip.for_number("1001").inboundGreeting == "Desk 1001."
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f'numbers:\n  "{SALES}":\n    allowFrom: ["12"]\n')
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "check", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "numbers." in line]
    assert len(problems) == 1 and f"numbers.{SALES}.allowFrom[0]: must be an E.164 number" in problems[0]
