"""Ids that reach a file path, mock webhooks with wrong types, and the mock carrier's memory per call."""

from __future__ import annotations

import json
import logging
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.calls import CallEvent, CallRecord, CallState, Direction
from bridge.store import child_path
from carriers.base import OutboundRequest
from carriers.mock import MockCarrier
from carriers.mock.settings import MockSettings
from tests.fakes.carrier import SignedJsonCarrier
from tests.harness import run_bridge, wait_for
from tests.test_webhook_pipeline import event, send

MOCK = {"provider": "mock", "inboundPolicy": "open", "maxConcurrentCalls": 5, "responseModel": "none",
        "recording": {"enabled": True}, "streaming": {"enabled": True, "provider": "none"},
        "mock": {"calleeScript": [], "calleeHangupAfterMs": 0}}


async def post_mock(runtime: Any, body: bytes | str) -> int:
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{runtime.port}/voice/webhook", data=body) as resp:
        return resp.status


def test_child_path_stays_in_its_folder(tmp_path: Path) -> None:
    assert child_path(tmp_path, "abc-123_X", ".wav") == tmp_path / "abc-123_X.wav"
    for bad in ("../x", "..", ".hidden", "a/b", "a\\b", "", "x" * 65, "a.b", "/etc/passwd", "é"):
        with pytest.raises(ValueError):
            child_path(tmp_path, bad, ".wav")


async def test_call_id_from_the_network_never_names_a_file_outside_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with run_bridge(MOCK, store) as runtime:
        body = {"event": {"type": "call.initiated", "callId": "../../escaped-x", "providerCallId": "P1",
                          "direction": "inbound", "from": "+15550001111"}}
        assert await post_mock(runtime, json.dumps(body)) == 400
        assert runtime.manager.calls == {}
    async with run_bridge({**MOCK, "provider": "mock"}, store, carrier=SignedJsonCarrier()) as runtime:
        # a carrier that passes a network-chosen id through: the call gets an id of ours instead
        status, text = await send(runtime, event(type="call.initiated", callId="../../escaped-y", providerCallId="P2",
                                                 direction="inbound", **{"from": "+15550001111"}))
        call_id = json.loads(text)["callId"]
        assert status == 200 and uuid.UUID(call_id)
    assert not list(tmp_path.glob("escaped*")) and not list(tmp_path.glob("**/escaped*"))


@pytest.mark.parametrize("body", [
    {"event": {"type": "call.initiated", "callId": [1], "direction": "inbound", "from": "+15550001111"}},
    {"event": {"type": "call.initiated", "providerCallId": {"a": 1}, "direction": "inbound"}},
    {"event": {"type": "call.speech", "providerCallId": "LIVE", "transcript": 5}},
    {"event": {"type": "call.speech", "providerCallId": "LIVE", "isFinal": "yes", "transcript": "x"}},
    {"event": {"type": ["call.speech"]}},
    {"event": {"type": "call.ended", "providerCallId": "LIVE", "reason": 7}},
    {"event": {"type": "call.dtmf", "providerCallId": "LIVE", "digits": {"1": 1}}},
    {"events": {"a": 1}},
    {"events": [1, 2]},
    {"events": [{"type": "call.ringing"}] * 101},
    [1],
    "[" * 3000 + "]" * 3000,
    "not json",
    "\xff\xfe",
])
async def test_mock_webhook_with_wrong_types_is_400_and_changes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, body: Any) -> None:
    async with run_bridge(MOCK, tmp_path) as runtime:
        live = {"event": {"type": "call.initiated", "providerCallId": "LIVE", "direction": "inbound",
                          "from": "+15550001111"}}
        assert await post_mock(runtime, json.dumps(live)) == 200
        [call] = runtime.manager.calls.values()
        before = (call.state, list(call.transcript), dict(call.metadata))
        assert await post_mock(runtime, body if isinstance(body, str) else json.dumps(body)) == 400
        assert list(runtime.manager.calls) == [call.callId]
        assert (call.state, list(call.transcript), dict(call.metadata)) == before
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


class _Host:
    """Just enough of the manager for the mock carrier on its own."""

    def __init__(self) -> None:
        self.calls: dict[str, CallRecord] = {}
        self.events: list[CallEvent] = []

    def emit(self, event: CallEvent) -> None:
        self.events.append(event)
        del self.events[:-10]

    def get_call(self, call_id: str) -> CallRecord | None:
        return self.calls.get(call_id)

    def attach_media(self, call_id: str, transport: Any) -> None:
        return None


async def test_mock_carrier_memory_is_flat_over_300_calls() -> None:
    carrier = MockCarrier(MockSettings(ringDelayMs=0, answerDelayMs=0, calleeHangupAfterMs=0), lambda: None)  # type: ignore[arg-type,return-value]
    host = _Host()
    await carrier.start(host)  # type: ignore[arg-type]
    frame = b"\xff" * 160

    async def one_call() -> None:
        call = CallRecord(callId=str(uuid.uuid4()), provider="mock", direction=Direction.OUTBOUND,
                          state=CallState.INITIATED, from_="+15550001234", to="+15550005678", startedAt=0.0)
        host.calls[call.callId] = call
        await carrier.initiate_call(call, OutboundRequest(to=call.to, from_number=call.from_, message="hi",
                                                          mode="notify", stream=True))
        await wait_for(lambda: call.callId in carrier.callees, timeout=5, interval=0.001)
        callee = carrier.callees[call.callId]
        for _ in range(250):  # 5 s of bot audio reaches the callee's ear
            await callee.send_media(frame)
        await carrier.hangup_call(call, CallState.HANGUP_BOT)
        del host.calls[call.callId]

    tracemalloc.start()
    try:
        for _ in range(20):  # warm-up: bounded histories fill, caches settle
            await one_call()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            await one_call()
        per_call = (tracemalloc.get_traced_memory()[0] - before) / 300
    finally:
        tracemalloc.stop()
    assert carrier.callees == {} and len(carrier.ended) == 8 and not carrier._timers  # noqa: SLF001
    print(f"mock carrier memory per call over 300 calls: {per_call:.0f} B")
    assert per_call < 2048
    await carrier.close()
