"""Carrier-internal hardening against the carrier fakes over real sockets: Plivo needs V3 (V2 only
by opt-in, each nonce once), Plivo input callbacks are applied once however often redelivered,
and a Telnyx dial is never sent twice."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.calls import CallState
from bridge.manager import CallError
from tests.fakes.plivo_server import FakePlivo, sign_v2, sign_v3
from tests.fakes.telnyx_server import FakeTelnyx
from tests.harness import free_port, run_bridge, wait_for
from tests.test_plivo_e2e import FRIEND, OUR_NUMBER, config, webhook


@pytest.fixture
async def plivo() -> AsyncIterator[FakePlivo]:
    async with FakePlivo() as fake:
        yield fake


async def live_inbound_call(plivo: FakePlivo, runtime: Any) -> tuple[Any, Any]:
    fake_call = await plivo.inbound_call(FRIEND, OUR_NUMBER, webhook(runtime, flow="answer"),
                                         webhook(runtime, flow="hangup"))
    await wait_for(lambda: len(runtime.manager.calls) == 1 and fake_call.live)
    [call] = runtime.manager.calls.values()
    await wait_for(lambda: call.answeredAt is not None)
    return call, fake_call


async def post(url: str, headers: dict[str, str], form: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session, session.post(url, data=form, headers=headers) as resp:
        return resp.status


async def test_plivo_forged_v2_callback_is_refused(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo, streaming=False), tmp_path) as runtime:
        victim, _ = await live_inbound_call(plivo, runtime)
        # a V2 signature covers the URL without its query, and a nonce: one copied from any callback
        nonce = "12345678901234567890"
        base = webhook(runtime).split("?", 1)[0]
        forged = {"X-Plivo-Signature-V2": sign_v2(plivo.auth_token, base, nonce), "X-Plivo-Signature-V2-Nonce": nonce}
        url = webhook(runtime, callId=victim.callId, flow="hangup")
        assert await post(url, forged, {"CallUUID": victim.providerCallId, "CallStatus": "completed"}) == 401
        assert not victim.terminal


async def test_plivo_v2_opt_in_accepts_each_nonce_once(plivo: FakePlivo, tmp_path: Path) -> None:
    cfg = config(plivo, streaming=False)
    cfg["plivo"] = {**cfg["plivo"], "allowV2Signatures": True}
    async with run_bridge(cfg, tmp_path) as runtime:
        victim, _ = await live_inbound_call(plivo, runtime)
        nonce = "98765432109876543210"
        base = webhook(runtime).split("?", 1)[0]
        headers = {"X-Plivo-Signature-V2": sign_v2(plivo.auth_token, base, nonce), "X-Plivo-Signature-V2-Nonce": nonce}
        ring = webhook(runtime, callId=victim.callId, flow="ring")
        assert await post(ring, headers, {"CallUUID": victim.providerCallId, "CallStatus": "ringing"}) == 200
        hangup = webhook(runtime, callId=victim.callId, flow="hangup")
        assert await post(hangup, headers, {"CallUUID": victim.providerCallId, "CallStatus": "completed"}) == 401
        assert not victim.terminal


async def test_plivo_input_redelivered_with_a_fresh_nonce_is_applied_once(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo, streaming=False), tmp_path) as runtime:
        call, _ = await live_inbound_call(plivo, runtime)
        url = webhook(runtime, callId=call.callId, flow="getinput", turnToken="turn-1")
        params = {"CallUUID": call.providerCallId, "Digits": "7", "InputType": "dtmf"}
        for _ in range(2):  # Plivo's retry: same callback, new V3 nonce, so a new replay key
            nonce = str(secrets.randbelow(10**20)).zfill(20)
            headers = {"X-Plivo-Signature-V3": sign_v3(plivo.auth_token, url, params, nonce),
                       "X-Plivo-Signature-V3-Nonce": nonce}
            assert await post(url, headers, params) == 200
        speech = {"CallUUID": call.providerCallId, "Speech": "book a table", "InputType": "speech"}
        for _ in range(2):
            nonce = str(secrets.randbelow(10**20)).zfill(20)
            headers = {"X-Plivo-Signature-V3": sign_v3(plivo.auth_token, url, speech, nonce),
                       "X-Plivo-Signature-V3-Nonce": nonce}
            assert await post(url, headers, speech) == 200
        assert call.metadata["dtmf"] == "7"
        assert [t.text for t in call.transcript if t.speaker == "user"] == ["book a table"]


@pytest.mark.parametrize("failure", ["http-500", "dropped"])
async def test_telnyx_dial_is_sent_once(tmp_path: Path, failure: str) -> None:
    dials: list[dict[str, Any]] = []

    async def calls(request: web.Request) -> web.StreamResponse:
        dials.append(await request.json())
        if failure == "dropped":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        return web.json_response({"errors": [{"title": "Internal error"}]}, status=500)

    app = web.Application()
    app.router.add_post("/v2/calls", calls)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    telnyx = FakeTelnyx()
    cfg = {"provider": "telnyx", "fromNumber": "+15550001234", "responseModel": "none",
           "telnyx": {**telnyx.config(), "apiBaseUrl": f"http://127.0.0.1:{port}/v2"}}
    try:
        async with run_bridge(cfg, tmp_path) as runtime:
            with pytest.raises(CallError, match="Call could not be placed"):
                await runtime.manager.initiate("+15550007777", "Hello", "notify")
            [call] = runtime.manager.calls.values()
            assert call.state == CallState.FAILED
        assert len(dials) == 1
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("data, status", [
    ({"event_type": "call.machine.detection.ended", "id": "e1",
      "payload": {"call_control_id": "v3:x", "result": {"a": 1}}}, 200),
    ({"event_type": "call.transcription", "id": "e2",
      "payload": {"call_control_id": "v3:x", "transcription_data": {"transcript": ["x"], "confidence": "high"}}}, 200),
    ({"event_type": "call.hangup", "id": "e3", "payload": {"call_control_id": ["v3:x"], "client_state": {"a": 1}}},
     200),
    ({"event_type": "call.initiated", "id": "e4", "payload": {"nested": json.loads("[" * 40 + "]" * 40)}}, 400),
])
async def test_telnyx_signed_webhook_with_odd_types_is_never_a_500(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                   data: dict[str, Any], status: int) -> None:
    telnyx = FakeTelnyx()
    cfg = {"provider": "telnyx", "fromNumber": "+15550001234", "responseModel": "none", "telnyx": telnyx.config()}
    async with run_bridge(cfg, tmp_path) as runtime:
        body = json.dumps({"data": data, "meta": {"attempt": 1}}).encode()
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "telnyx-timestamp": stamp,
                   "telnyx-signature-ed25519": telnyx.sign(body, stamp)}
        async with aiohttp.ClientSession() as session, session.post(webhook(runtime), data=body,
                                                                    headers=headers) as resp:
            assert resp.status == status
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info
                or "could not use it" in r.getMessage()]
