"""Faults over real processes and sockets, against the carrier fakes: kill -9 with live calls and a
restart (Twilio, Plivo and Telnyx fakes), carrier API failures on initiate / speak / hang-up, a media stream dropped and reconnected."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bridge.calls import CallState
from bridge.client import RpcClient, RpcClientError
from bridge.config import build_settings
from bridge.manager import CallError
from bridge.runtime import Runtime
from media.clock import FakeClock
from tests.fakes.carrier import SignedJsonCarrier
from tests.fakes.plivo_server import FakePlivo
from tests.fakes.telnyx_server import FakeTelnyx
from tests.fakes.twilio_server import CallerScript, FakeTwilio
from tests.harness import free_port, run_bridge, wait_for
from tests.test_plivo_e2e import config as plivo_config
from tests.test_stream_limits import inbound_call, stream_url
from tests.test_telnyx_e2e import config as telnyx_config
from tests.test_twilio_e2e import config as twilio_config

ROOT = Path(__file__).resolve().parents[1]
KILL_CALLS = 6


class Server:
    """`voicecall serve` as a child process."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.client = RpcClient(f"http://127.0.0.1:{port}/rpc", timeout_s=20)

    async def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "serve", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)

        async def up() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.port}/healthz") as r:
                    return r.status == 200 and (await r.json())["ok"] is True
            except aiohttp.ClientError:
                return False

        async with asyncio.timeout(30):
            while not await up():
                assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
                await asyncio.sleep(0.1)

    def kill(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    async def status(self, call_id: str) -> dict[str, Any]:
        return (await self.client.call("voicecall.status", {"callId": call_id}))["call"]


@asynccontextmanager
async def carrier_fake(name: str, port: int, store: Path) -> AsyncIterator[tuple[dict[str, Any], Callable[[], list[bool]]]]:
    """A carrier fake whose callers stay quiet through the outage; (bridge config, which calls are up)."""
    common = {"maxConcurrentCalls": KILL_CALLS + 2, "store": str(store), "serve": {"port": port},
              "publicUrl": f"http://127.0.0.1:{port}/voice/webhook", "maxDurationSeconds": 600}
    if name == "twilio":
        async with FakeTwilio(say_chars_per_second=200) as twilio:
            twilio.default_script = CallerScript(gather_timeout_s=60)
            yield ({**twilio_config(twilio, stream=False), **common},
                   lambda: [c.status == "in-progress" and not c.ended.is_set() for c in twilio.calls.values()])
    elif name == "telnyx":
        async with FakeTelnyx() as telnyx:
            yield ({**telnyx_config(telnyx, responseModel="none", streaming={"enabled": False, "provider": "none"}),
                    **common}, lambda: [c.alive for c in telnyx.calls.values()])
    else:
        plivo = await FakePlivo().start()
        try:
            yield ({**plivo_config(plivo, streaming=False), **common},
                   lambda: [c.live for c in plivo.calls.values()])
        finally:
            await plivo.stop()


@pytest.mark.parametrize("name", ["twilio", "plivo", "telnyx"])
async def test_kill_9_with_live_calls_then_restart_recovers_every_call(tmp_path: Path, name: str) -> None:
    port = free_port()
    async with carrier_fake(name, port, tmp_path) as (cfg, up):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        server = Server(tmp_path / "c.yaml", port)
        await server.start()
        try:
            ids = [(await server.client.call("voicecall.initiate", {"to": f"+1555000{7000 + i}", "message": "Hi.",
                                                                     "mode": "conversation"}))["callId"]
                   for i in range(KILL_CALLS)]

            async def all_listening() -> bool:
                return [(await server.status(i))["state"] for i in ids] == ["listening"] * len(ids)
            async with asyncio.timeout(30):
                while not await all_listening():
                    await asyncio.sleep(0.1)
            assert server.kill(signal.SIGKILL) == -signal.SIGKILL  # no drain, no goodbye: only the log is left
            assert up() == [True] * KILL_CALLS
            await server.start()
            for call_id in ids:  # every call is back, in the state it was in, still up at the carrier
                record = await server.status(call_id)
                assert record["state"] == "listening" and not record.get("endReason"), record
            assert up() == [True] * KILL_CALLS
            for call_id in ids:
                assert (await server.client.call("voicecall.end", {"callId": call_id})) == {"success": True}
            await wait_for(lambda: not any(up()), timeout=15)
            assert server.kill(signal.SIGTERM) == 0  # and a SIGTERM drains and exits cleanly
        finally:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(say_chars_per_second=200) as server:
        server.default_script = CallerScript(gather_timeout_s=0.3)
        yield server


async def test_carrier_api_failures_are_clear_and_leave_nothing_half_done(fake: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(twilio_config(fake, stream=False), tmp_path) as runtime:
        manager = runtime.manager
        fake.fail_next = 400  # initiate
        with pytest.raises(CallError, match="Call could not be placed: twilio POST .* answered HTTP 400"):
            await manager.initiate("+15550007001", "Hello", "conversation")
        assert [c.state for c in manager.calls.values()] == [CallState.FAILED] and not fake.calls
        call = await manager.initiate("+15550007002", "Hello", "conversation")
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        [twilio_call] = fake.calls.values()
        fake.fail_next = 400  # speak
        with pytest.raises(CallError, match="Could not speak on call"):
            await manager.speak(call.callId, "One moment")
        assert not call.terminal
        fake.fail_next = 400  # hang-up: the call is still up at Twilio, and we say so
        with pytest.raises(CallError, match="still up"):
            await manager.end(call.callId)
        assert not call.terminal and twilio_call.status == "in-progress"
        await wait_for(lambda: call.state == CallState.HANGUP_BOT, timeout=10)  # the background retry
        await wait_for(lambda: twilio_call.ended.is_set(), timeout=10)


async def test_media_stream_dropped_and_reconnected_keeps_the_call(tmp_path: Path) -> None:
    raw = {"provider": "mock", "inboundPolicy": "open", "maxConcurrentCalls": 5, "responseModel": "none",
           "store": str(tmp_path), "serve": {"port": free_port()},
           "streaming": {"enabled": True, "provider": "none", "disconnectGraceMs": 1500}}
    clock = FakeClock()  # the grace timer runs on it: no sleeping to prove the call survives
    runtime = Runtime(build_settings(raw, {}), clock=clock, carrier=SignedJsonCarrier())
    await runtime.start()
    try:
        async with aiohttp.ClientSession() as s:
            call, token = inbound_call(runtime, "P1")
            start = json.dumps({"event": "start", "callSid": "P1", "token": token})
            first = await s.ws_connect(stream_url(runtime))
            await first.send_str(start)
            await wait_for(lambda: runtime.manager.voice(call.callId) is not None)
            old = runtime.manager.voice(call.callId)
            await first.close()
            await wait_for(lambda: runtime.manager.voice(call.callId) is None)
            second = await s.ws_connect(stream_url(runtime))
            await second.send_str(start)
            await wait_for(lambda: runtime.manager.voice(call.callId) not in (None, old))
            bridge = runtime.manager.voice(call.callId).bridge
            await second.send_str(json.dumps({"event": "media", "payload": "ff" * 160}))
            await wait_for(lambda: bridge.stats.frames_in >= 1)
            await clock.advance(2.0)  # the first stream's grace has passed
            await runtime.manager.drain()
            assert not call.terminal and call.metadata.get("streamLost") is None
            await second.close()
            await wait_for(lambda: runtime.manager.voice(call.callId) is None)
            await clock.advance(2.0)  # no stream came back this time: the call ends
            await runtime.manager.drain()
            assert call.terminal and call.metadata.get("streamLost") is True
    finally:
        await runtime.stop()


async def test_tts_engine_failing_mid_call_is_a_clear_error(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from tests.fakes.openai_server import FakeOpenAI

    openai = await FakeOpenAI().start()
    try:
        cfg = {"provider": "mock", "fromNumber": "+15550001234", "responseModel": "none",
               "mock": {"ringDelayMs": 10, "answerDelayMs": 10, "calleeScript": [], "calleeHangupAfterMs": 0},
               "tts": {"provider": "openai", "openai": {"apiKey": "wrong-key", "baseUrl": openai.base_url}}}
        async with run_bridge(cfg, tmp_path) as runtime:
            client = RpcClient(f"http://127.0.0.1:{runtime.port}/rpc")
            call_id = (await client.call("voicecall.initiate", {"to": "+15550007777", "message": "Hello",
                                                                "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: call.answeredAt is not None)
            await runtime.manager.drain()  # the greeting failed in the engine
            with pytest.raises(RpcClientError, match="Could not speak on call .*: OpenAI TTS failed: HTTP 401"):
                await client.call("voicecall.speak", {"callId": call_id, "message": "Still there?"})
            assert not call.terminal  # the call stays up; the agent can end it or try again
    finally:
        await openai.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_stt_engine_lost_mid_call_says_so_and_hangs_up(tmp_path: Path) -> None:
    from bridge.manager import STT_LOST_MESSAGE
    from tests.fakes.deepgram_server import FakeDeepgram

    dg = await FakeDeepgram().start()
    try:
        cfg = {"provider": "mock", "fromNumber": "+15550001234", "responseModel": "none",
               "mock": {"ringDelayMs": 10, "answerDelayMs": 10, "calleeScript": [], "calleeHangupAfterMs": 0},
               "streaming": {"enabled": True, "provider": "deepgram",
                             "providers": {"deepgram": {"apiKey": dg.api_key, "baseUrl": dg.base_url}}}}
        async with run_bridge(cfg, tmp_path) as runtime:
            client = RpcClient(f"http://127.0.0.1:{runtime.port}/rpc")
            call_id = (await client.call("voicecall.initiate", {"to": "+15550007777", "message": "Hello.",
                                                                "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: call.state == CallState.LISTENING and bool(dg.sessions))
            callee = runtime.carrier.callee(call_id)  # type: ignore[attr-defined]
            heard_before = callee.frames_received
            dg.api_key = "revoked"  # the outage: the stream drops and the reconnect is refused
            await dg.drop()
            await wait_for(lambda: call.terminal, timeout=15)
            assert call.state == CallState.HANGUP_BOT
            assert "authentication failed" in call.metadata["sttLost"]
            assert call.transcript[-1].speaker == "bot" and call.transcript[-1].text == STT_LOST_MESSAGE
            assert callee.frames_received > heard_before  # the caller heard why, not silence
            assert len(dg.sessions) == 1
    finally:
        await dg.stop()
    lines = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    last = [r for r in lines if r["callId"] == call_id][-1]
    assert last["state"] == "hangup-bot" and "authentication failed" in last["metadata"]["sttLost"]
