"""In-call tools (real HTTP to a local receiver, timeouts on the fake clock), the chat messages
rebuilt from a call record, and the `agent` config rules."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bridge.calls import (
    CallRecord,
    CallState,
    Direction,
    ToolCallEntry,
    TranscriptEntry,
)
from bridge.config import ConfigError, build_settings
from bridge.conversation.messages import chat_messages
from bridge.conversation.tools import (
    SIGNATURE_HEADER,
    CallToolbox,
    HttpToolConfig,
    ToolCall,
    ToolOutcome,
    ToolSettings,
    ToolSpec,
    sign,
    verify,
)
from media.clock import FakeClock
from tests.fakes.http_app import serve_local

ROOT = Path(__file__).resolve().parent.parent


class Host:
    def __init__(self) -> None:
        self.dtmf: list[tuple[str, str]] = []
        self.fillers: list[str] = []
        self.answer = "the agent's answer"

    async def send_dtmf(self, call_id: str, digits: str) -> None:
        self.dtmf.append((call_id, digits))

    async def consult(self, call_id: str, question: str) -> str:
        return f"{self.answer} to {question}"

    async def say_filler(self, call_id: str, text: str) -> None:
        self.fillers.append(text)


@pytest.fixture
async def receiver() -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"bodies": [], "headers": [], "hang": asyncio.Event(), "status": 200}

    async def handle(request: web.Request) -> web.Response:
        state["bodies"].append(await request.read())
        state["headers"].append(dict(request.headers))
        if request.path.endswith("/slow"):
            await state["hang"].wait()
        return web.Response(status=state["status"], text="x" * 5000 if request.path.endswith("/big") else "ok")

    app = web.Application()
    app.router.add_post("/{name}", handle)
    runner, port = await serve_local(app)
    state["base"] = f"http://127.0.0.1:{port}"
    yield state
    state["hang"].set()
    await runner.cleanup()


def http_tool(base: str, path: str, *, secret: str | None = "s3cret", timeout_ms: int = 3000,
              filler: str | None = None) -> HttpToolConfig:
    return HttpToolConfig(name=path, description="d", parameters={"type": "object", "properties": {}},
                          url=f"{base}/{path}", timeout_ms=timeout_ms, secret=secret, filler=filler)


async def test_builtins_and_declared_tools_are_offered_and_extensible() -> None:
    box = CallToolbox("c1", Host(), ToolSettings(http_tools=[http_tool("http://x", "lookup")]), clock=FakeClock())
    assert [s.name for s in box.specs()] == ["end_call", "send_dtmf", "consult_agent", "lookup"]

    async def transfer(call_id: str, args: dict[str, Any]) -> ToolOutcome:
        return ToolOutcome(f"transferring {call_id} to {args['to']}")

    box.register(ToolSpec("transfer_call", "Transfer", {"type": "object", "properties": {}}), transfer)
    assert (await box.run(ToolCall("1", "transfer_call", '{"to": "+15550100"}'))).content == \
        "transferring c1 to +15550100"
    no_consult = CallToolbox("c1", Host(), ToolSettings(consult_enabled=False), clock=FakeClock())
    assert "consult_agent" not in [s.name for s in no_consult.specs()]


async def test_bad_calls_go_back_to_the_model_as_errors() -> None:
    host = Host()
    box = CallToolbox("c1", host, ToolSettings(), clock=FakeClock())
    assert (await box.run(ToolCall("1", "nope", "{}"))).content == "error: there is no tool named 'nope'"
    assert (await box.run(ToolCall("2", "send_dtmf", "{not json"))).content.startswith("error: the arguments")
    assert (await box.run(ToolCall("3", "send_dtmf", '{"digits": "12x"}'))).content.startswith("error: `digits`")
    assert (await box.run(ToolCall("4", "send_dtmf", '{"digits": "1 2#"}'))).content == "Pressed 12#."
    assert host.dtmf == [("c1", "12#")]
    end = await box.run(ToolCall("5", "end_call", ""))
    assert end.end_call
    consult = await box.run(ToolCall("6", "consult_agent", '{"question": "why?"}'))
    assert consult.content == "the agent's answer to why?" and host.fillers == ["Let me check on that."]


async def test_declared_tool_posts_signed_json(receiver: dict[str, Any]) -> None:
    host = Host()
    box = CallToolbox("call-9", host, ToolSettings(http_tools=[http_tool(receiver["base"], "book", filler="Hold on.")]),
                      clock=FakeClock())
    outcome = await box.run(ToolCall("1", "book", '{"day": "Friday"}'))
    assert outcome.content == "ok" and outcome.filler == "Hold on." and host.fillers == ["Hold on."]
    body, headers = receiver["bodies"][0], receiver["headers"][0]
    assert json.loads(body) == {"tool": "book", "callId": "call-9", "arguments": {"day": "Friday"}}
    header = headers[SIGNATURE_HEADER]
    ts = int(header.split(",")[0][2:])
    assert verify("s3cret", header, body, now=ts) and header == sign("s3cret", body, ts)
    assert not verify("wrong", header, body, now=ts)
    assert not verify("s3cret", header, body + b" ", now=ts)
    assert not verify("s3cret", header, body, now=ts + 3600)  # stale
    await box.close()


async def test_declared_tool_times_out_on_the_clock(receiver: dict[str, Any]) -> None:
    clock = FakeClock()
    box = CallToolbox("c1", Host(), ToolSettings(http_tools=[http_tool(receiver["base"], "slow", timeout_ms=2500)],
                                                 tool_filler=None), clock=clock)
    run = asyncio.ensure_future(box.run(ToolCall("1", "slow", "{}")))
    async with asyncio.timeout(10):
        while not receiver["bodies"]:
            await asyncio.sleep(0.01)
    await clock.advance(2.4)
    assert not run.done()
    await clock.advance(0.2)
    assert (await asyncio.wait_for(run, 5)).content == "error: the tool did not answer within 2500 ms"
    await box.close()


async def test_declared_tool_errors_and_big_answers(receiver: dict[str, Any]) -> None:
    settings = ToolSettings(http_tools=[http_tool(receiver["base"], "big", secret=None),
                                        http_tool("http://127.0.0.1:9", "down")], tool_filler=None)
    box = CallToolbox("c1", Host(), settings, clock=FakeClock())
    try:
        assert len((await box.run(ToolCall("1", "big", "{}"))).content) == 4000
        assert SIGNATURE_HEADER not in receiver["headers"][0]
        receiver["status"] = 500
        assert (await box.run(ToolCall("2", "big", "{}"))).content == "error: the tool answered HTTP 500"
        assert (await box.run(ToolCall("3", "down", "{}"))).content.startswith("error: the tool could not be reached")
    finally:
        await box.close()


def record(*lines: tuple[str, str], tools: list[ToolCallEntry] | None = None) -> CallRecord:
    call = CallRecord("c", "mock", Direction.OUTBOUND, CallState.ACTIVE, "+1", "+2", 0.0)
    call.transcript = [TranscriptEntry(float(i), who, text) for i, (who, text) in enumerate(lines)]
    call.toolCalls = tools or []
    return call


def test_messages_carry_turns_tool_calls_and_results() -> None:
    call = record(("bot", "Hi."), ("user", "Press two"), ("user", "please."), ("bot", "Pressing."),
                  ("bot", ""), ("user", "Thanks"),
                  tools=[ToolCallEntry(1.0, "c1", "send_dtmf", '{"digits":"2"}', "Pressed 2.", 4, True),
                         ToolCallEntry(2.0, "c2", "lookup", "{}", "nothing", 5, False)])
    assert chat_messages(call, "SYS") == [
        {"role": "system", "content": "SYS"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Press two please."},
        {"role": "assistant", "content": "Pressing.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "send_dtmf", "arguments": '{"digits":"2"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Pressed 2."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "nothing"},
        {"role": "user", "content": "Thanks"},
    ]


def test_agent_config_rules_name_the_key_path() -> None:
    good = {"name": "lookup", "url": "https://tools.example/lookup", "secret": "abc"}
    settings = build_settings({"agent": {"tools": [good], "responseMode": "batch"}}, {})
    assert settings.agent.tools[0].timeoutMs == 5000 and settings.agent.responseMode == "batch"
    assert settings.masked()["agent"]["tools"][0]["secret"] == "********"
    assert build_settings({}, {}).agent.responseMode == "streaming"
    with pytest.raises(ConfigError) as info:
        build_settings({"agent": {"responseMode": "fast", "tools": [
            good, {**good}, {"name": "end_call", "url": "http://x"}, {"name": "bad name!", "url": "ftp://x"},
            {"name": "p", "url": "http://x", "parameters": {"type": "string"}}, {"name": "t", "url": "http://x",
                                                                                 "timeoutMs": 0}]}}, {})
    text = str(info.value)
    for expected in ("agent.responseMode:", "agent.tools[3].name:", "agent.tools[3].url:", "agent.tools[5].timeoutMs:"):
        assert expected in text, text
    with pytest.raises(ConfigError) as info:
        build_settings({"agent": {"tools": [good, {**good}, {"name": "end_call", "url": "http://x"},
                                            {"name": "p", "url": "http://x", "parameters": {"type": "string"}}]}}, {})
    assert str(info.value).splitlines() == [
        "agent.tools[1].name: 'lookup' is declared twice",
        "agent.tools[2].name: 'end_call' is a built-in tool; choose another name",
        'agent.tools[3].parameters: must be a JSON schema with "type": "object"']


def test_voicecall_check_reports_agent_problems(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("agent:\n  tools:\n    - name: send_dtmf\n      url: http://127.0.0.1/x\n")
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "check", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "agent.tools[0].name: 'send_dtmf' is a built-in tool" in proc.stdout + proc.stderr
