"""Seed-compatible RPC additions: asynchronous continue (start + poll), status without a callId,
`dtmfSequence` after answer (pauses on the fake clock; tones heard by the mock callee), and clear
errors for bad call-control parameters."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from bridge.calls import CallEvent, CallRecord, CallState, EventType
from bridge.config import ConfigError, build_settings
from bridge.manager import CallManager
from bridge.store import CallStore
from bridge.tool import dispatch
from media.clock import FakeClock
from media.dtmf import DtmfDetector
from tests.fakes.carrier import RecordingCarrier
from tests.harness import rpc_client, run_bridge, wait_for

FAST_MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0}
BASE = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "maxConcurrentCalls": 3,
        "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
        "responseModel": "offline", "mock": FAST_MOCK, "outbound": {"notifyHangupDelaySec": 1}}


class KeysCarrier(RecordingCarrier):
    """Records each send_dtmf with the fake clock's time."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.keys: list[tuple[float, str]] = []

    async def send_dtmf(self, call: CallRecord, digits: str) -> None:
        self.keys.append((self.clock.monotonic(), digits))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_dtmf_sequence_is_sent_after_answer_with_w_pauses_on_the_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    carrier = KeysCarrier(clock)
    settings = build_settings({"provider": "mock", "fromNumber": "+15550001234", "store": str(tmp_path)}, {})
    manager = CallManager(settings, carrier, clock=clock, store=CallStore(tmp_path))
    await manager.start()
    call = await manager.initiate("+15550007777", "You are through to the bridge.", "conversation",
                                  dtmf_sequence="1ww23W#")
    await settle()
    assert carrier.keys == [], "nothing before the answer"
    manager.process_event(CallEvent(EventType.ANSWERED, call_id=call.callId))
    await settle()
    assert carrier.keys == [(0.0, "1")] and carrier.spoken == []
    await clock.advance(0.99)
    assert len(carrier.keys) == 1
    await clock.advance(0.01)
    await settle()
    assert carrier.keys[1] == (1.0, "23")
    await clock.advance(1.0)
    await settle()
    assert carrier.keys == [(0.0, "1"), (1.0, "23"), (2.0, "#")]
    assert carrier.spoken == [(call.callId, "You are through to the bridge.")], "the message follows the keys"
    assert call.metadata["dtmfSequenceSent"] is True
    await manager.stop()


async def test_dtmf_sequence_tones_reach_the_mock_callee(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": []}}, tmp_path) as runtime:
        result = await rpc_client(runtime).call("voicecall.initiate", {
            "to": "+15550007777", "message": "Hi.", "mode": "notify", "dtmfSequence": "42w9"})
        call = runtime.manager.calls[result["callId"]]
        await wait_for(lambda: call.terminal, timeout=20)
        heard = bytes(runtime.carrier.callee(call.callId).heard)
        detector = DtmfDetector(8000)
        digits = [d for offset in range(0, len(heard), 320) for d in detector.process(heard[offset:offset + 320])]
        assert "".join(digits) == "429"


async def test_bad_call_control_parameters_are_one_line_errors(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        for params, text in [({"message": "x", "machineDetection": "maybe"}, "`machineDetection` must be one of"),
                             ({"message": "x", "dtmfSequence": "12x"}, "`dtmfSequence` must be 1-64 of"),
                             ({"message": "x", "dtmfSequence": 5}, "parameter `dtmfSequence` must be a string")]:
            status, body = await post(runtime.port, "voicecall.initiate", params)
            assert status == 200 and text in body["error"]["message"] and "\n" not in body["error"]["message"]
        assert runtime.manager.calls == {}, "a refused request changes nothing"


async def post(port: int, method: str, params: dict) -> tuple[int, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}/rpc", json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}) as r:
        return r.status, await r.json()


async def test_continue_start_returns_at_once_and_result_polls_the_transcript(tmp_path: Path) -> None:
    config = {**BASE, "mock": {**FAST_MOCK, "calleeScript": []}}
    async with run_bridge(config, tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hi!", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        runtime.carrier.callee(call_id).script.append("Three o'clock, please.")  # the answer to the next turn
        started = await client.call("voicecall.continue.start", {"callId": call_id, "message": "What time?"})
        assert started["started"] is True and started["callId"] == call_id
        first = await client.call("voicecall.continue.result", {"continueId": started["continueId"]})
        assert first["status"] == "pending", "start returned before the turn finished"
        results: list[dict] = []

        async def poll() -> bool:
            results.append(await client.call("voicecall.continue.result", {"continueId": started["continueId"]}))
            return results[-1]["status"] != "pending"

        async with asyncio.timeout(20):
            while not await poll():
                await asyncio.sleep(0.1)
        assert results[-1] == {"continueId": started["continueId"], "callId": call_id, "status": "done",
                               "success": True, "transcript": "Three o'clock, please."}
        _, body = await post(runtime.port, "voicecall.continue.result", {"continueId": "nope"})
        assert body["error"] == {"code": -32602, "message": "unknown or expired `continueId`"}
        _, body = await post(runtime.port, "voicecall.continue.start", {"callId": "nope", "message": "x"})
        assert body["error"]["message"] == "Call not found: nope"


async def test_status_without_call_id_lists_calls_and_start_stays_an_alias(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": []}}, tmp_path) as runtime:
        client = rpc_client(runtime)
        assert await client.call("voicecall.status", {}) == {"calls": []}
        legacy = await client.call("voicecall.start", {"to": "+15550000002", "machineDetection": "detect"})
        await wait_for(lambda: runtime.manager.calls[legacy["callId"]].terminal, timeout=10)
        listed = await client.call("voicecall.status", {})
        assert [c["callId"] for c in listed["calls"]] == [legacy["callId"]]
        assert listed["calls"][0]["state"] == "busy" and listed["calls"][0]["metadata"]["machineDetection"] == "detect"
        assert listed["calls"][0]["transcript"] == []


async def test_mock_0006_is_a_person_who_speaks_a_line_and_hears_the_caller(tmp_path: Path) -> None:
    mock = {**FAST_MOCK, "calleeScript": ["not used by this persona"], "transferLine": "Front desk."}
    async with run_bridge({**BASE, "mock": mock}, tmp_path) as runtime:
        result = await rpc_client(runtime).call("voicecall.initiate", {
            "to": "+15550000006", "message": "Hi Jordan.", "mode": "conversation"})
        call = runtime.manager.calls[result["callId"]]
        line = "Front desk."
        await wait_for(lambda: ("user", line) in [(t.speaker, t.text) for t in call.transcript], timeout=20)
        callee = runtime.carrier.callee(call.callId)
        # the bridge answers the person's line; once that reply has played, the person heard it
        await wait_for(lambda: call.transcript[-1].speaker == "bot" and call.state == CallState.LISTENING,
                       timeout=20)
        assert len(callee.heard) / 16000 > 1.0, "the person heard the bridge"
        assert callee.said == [line] and list(callee.script) == []
        await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})


async def test_cli_and_tool_pass_machine_detection_and_keys(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "mock": {**FAST_MOCK, "calleeScript": []}}, tmp_path) as runtime:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", "call", "--to", "+15550000002", "-m", "Hi", "--machine-detection",
            "hangup", "--dtmf", "12w#", "--json", env={**os.environ, "VOICECALL_URL": rpc_client(runtime).url},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        by_cli = runtime.manager.calls[json.loads(out)["callId"]]
        assert by_cli.metadata["machineDetection"] == "hangup" and by_cli.metadata["dtmfSequence"] == "12w#"
        result = await dispatch(rpc_client(runtime).call, {"action": "initiate_call", "to": "+15550000002",
                                                           "message": "Hi", "machineDetection": "detect",
                                                           "dtmfSequence": "9"})
        by_tool = runtime.manager.calls[result["callId"]]
        assert by_tool.metadata["machineDetection"] == "detect" and by_tool.metadata["dtmfSequence"] == "9"


def test_machine_detection_config_accepts_yaml_off_and_names_bad_values() -> None:
    settings = build_settings(yaml.safe_load("outbound: {machineDetection: off}"), {})
    assert settings.outbound.machineDetection == "off"
    with pytest.raises(ConfigError) as err:
        build_settings({"outbound": {"machineDetection": "sometimes"}, "amd": {"greeting": 0}}, {})
    assert any(line.startswith("outbound.machineDetection:") for line in err.value.problems)
    assert any(line.startswith("amd.greeting:") for line in err.value.problems)
