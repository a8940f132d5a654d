"""Media-stream frames that are odd in type, depth or range, before and after a valid start, on the
real Twilio codec over real WebSockets: the stream closes 1008 with one log line, the server and
every other call go on. And the default pending caps let a burst of real calls through."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path

import aiohttp
import pytest

from bridge.server import STREAM_GATE_KEY
from tests.fakes.carrier import SignedJsonCarrier
from tests.harness import run_bridge, wait_for
from tests.test_stream_limits import closed_with, inbound_call, stream_url

TWILIO = {"provider": "twilio", "fromNumber": "+15550001234", "inboundPolicy": "open", "maxConcurrentCalls": 5,
          "twilio": {"accountSid": "AC" + "0" * 32, "authToken": "t" * 32, "apiBaseUrl": "http://127.0.0.1:9"},
          "streaming": {"enabled": True, "provider": "none"}, "responseModel": "none"}


def start_frame(call_sid: str, token: str) -> str:
    return json.dumps({"event": "start", "start": {"callSid": call_sid, "streamSid": "MZ1",
                                                   "customParameters": {"token": token}}})


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


BEFORE_START = [
    '{"event":"start","start":[]}',
    '{"event":"start","start":{"callSid":"CA1","streamSid":"MZ","mediaFormat":[1]}}',
    '{"event":"start","start":{"callSid":"CA1","streamSid":"MZ","customParameters":[1,2]}}',
    '{"event":"media","media":5}',
    "[" * 3000 + "]" * 3000,
    '{"event":' * 40 + "1" + "}" * 40,
]
AFTER_START = [
    '{"event":"media","media":{"payload":"/w==","timestamp":1e400}}',
    '{"event":"media","media":{"payload":"/w==","chunk":"abc"}}',
    '{"event":"media","media":{"payload":5}}',
    '{"event":"mark","mark":"x"}',
    '{"event":"dtmf","dtmf":[]}',
    "[" * 3000 + "]" * 3000,
]


@pytest.mark.parametrize("frame", BEFORE_START)
async def test_odd_frame_before_start_closes_1008(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  frame: str) -> None:
    async with run_bridge(TWILIO, tmp_path) as runtime, aiohttp.ClientSession() as s:
        ws = await s.ws_connect(stream_url(runtime))
        await ws.send_str(frame)
        assert (await closed_with(ws))[0] == 1008
        gate = runtime.app[STREAM_GATE_KEY]
        await wait_for(lambda: gate.open == 0 and gate.pending == 0)
    no_tracebacks(caplog)


@pytest.mark.parametrize("frame", AFTER_START)
async def test_odd_frame_after_start_closes_only_that_stream(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             frame: str) -> None:
    async with run_bridge(TWILIO, tmp_path) as runtime, aiohttp.ClientSession() as s:
        victim, victim_token = inbound_call(runtime, "CA1")
        control, control_token = inbound_call(runtime, "CA2")
        ws = await s.ws_connect(stream_url(runtime))
        await ws.send_str(start_frame("CA1", victim_token))
        good = await s.ws_connect(stream_url(runtime))
        await good.send_str(start_frame("CA2", control_token))
        await wait_for(lambda: runtime.manager.voice(victim.callId) and runtime.manager.voice(control.callId))
        await ws.send_str(frame)
        assert (await closed_with(ws))[0] == 1008
        # the control call keeps its stream: its media still flows in
        bridge = runtime.manager.voice(control.callId).bridge
        before = bridge.stats.frames_in
        payload = base64.b64encode(b"\xff" * 160).decode()
        await good.send_str(json.dumps({"event": "media", "media": {"payload": payload, "chunk": "1"}}))
        await wait_for(lambda: bridge.stats.frames_in > before)
        assert not control.terminal
        await good.close()
    no_tracebacks(caplog)


async def test_default_caps_let_a_burst_of_calls_from_one_address_through(tmp_path: Path) -> None:
    config = {"provider": "mock", "inboundPolicy": "open", "maxConcurrentCalls": 20,
              "streaming": {"enabled": True, "provider": "none"}, "responseModel": "none"}
    async with run_bridge(config, tmp_path, carrier=SignedJsonCarrier()) as runtime, aiohttp.ClientSession() as s:
        calls = [inbound_call(runtime, f"P{i}") for i in range(18)]
        sockets = await asyncio.gather(*(s.ws_connect(stream_url(runtime)) for _ in calls))
        gate = runtime.app[STREAM_GATE_KEY]
        await wait_for(lambda: gate.pending == 18)  # all 18 are waiting for their start at once
        for ws, (call, token) in zip(sockets, calls):
            await ws.send_str(json.dumps({"event": "start", "callSid": call.providerCallId, "token": token}))
        await wait_for(lambda: all(runtime.manager.voice(call.callId) for call, _ in calls))
        assert gate.open == 18 and gate.pending == 0
        for ws in sockets:
            await ws.close()
