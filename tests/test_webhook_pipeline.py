"""The webhook pipeline over real sockets: path, method, pre-auth gate, in-flight cap, body limits,
Host validation, signature, replay. Each case checks the exact status."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiohttp

from bridge.server import WEBHOOK_KEY
from tests.fakes.carrier import SignedJsonCarrier
from tests.harness import run_bridge, wait_for

CONFIG = {"provider": "mock", "inboundPolicy": "open", "maxConcurrentCalls": 5,
          "webhookSecurity": {"maxBodyBytes": 2048, "bodyTimeoutMs": 300, "maxInFlightPerIp": 1}}


def event(**fields: object) -> bytes:
    return json.dumps({"id": uuid.uuid4().hex, **fields}).encode()


async def send(runtime, body: bytes, *, sign: bool = True, url_path: str = "/voice/webhook",  # type: ignore[no-untyped-def]
               method: str = "POST", headers: dict[str, str] | None = None) -> tuple[int, str]:
    carrier: SignedJsonCarrier = runtime.carrier
    public = f"https://127.0.0.1:{runtime.port}{url_path}"  # as reconstructed from Host (no publicUrl)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if sign:
        hdrs["X-Test-Signature"] = carrier.sign(public, body)
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{runtime.port}{url_path}", data=body,
                                   headers=hdrs) as resp:
            return resp.status, await resp.text()


async def raw_request(port: int, head: str, body_parts: list[bytes], delay: float) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode())
    for part in body_parts:
        await asyncio.sleep(delay)
        writer.write(part)
        await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(200), 5)
    finally:
        writer.close()


async def test_inbound_webhook_is_processed_and_answered(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        status, text = await send(runtime, event(type="call.initiated", providerCallId="P1", direction="inbound",
                                                  **{"from": "+15550001111"}))
        assert status == 200
        call_id = json.loads(text)["callId"]
        assert runtime.manager.calls[call_id].providerCallId == "P1"


async def test_wrong_path_and_method(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        assert (await send(runtime, b"{}", url_path="/voice/webhookx"))[0] == 404
        assert (await send(runtime, b"", method="GET"))[0] == 405
        assert (await send(runtime, b"", method="PUT"))[0] == 405


async def test_missing_signature_header_is_refused_before_the_body_is_read(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        # far over the body limit: a 401 (not 413) proves the body was never read
        assert (await send(runtime, b"x" * 100_000, sign=False))[0] == 401


async def test_bad_signature_is_401_and_changes_nothing(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        body = event(type="call.initiated", providerCallId="P2", direction="inbound", **{"from": "+15550001111"})
        status, _ = await send(runtime, body, sign=False, headers={"X-Test-Signature": "00" * 32})
        assert status == 401 and runtime.manager.calls == {}


async def test_oversized_body_is_413(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        assert (await send(runtime, b"x" * 5000))[0] == 413
        # chunked upload without Content-Length, still over the limit
        head = (f"POST /voice/webhook HTTP/1.1\r\nHost: 127.0.0.1:{runtime.port}\r\nX-Test-Signature: x\r\n"
                "Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"800\r\n" + b"y" * 0x800 + b"\r\n"
        reply = await raw_request(runtime.port, head, [chunk, chunk, b"0\r\n\r\n"], 0.01)
        assert reply.startswith(b"HTTP/1.1 413")


async def test_slow_body_is_408(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        head = (f"POST /voice/webhook HTTP/1.1\r\nHost: 127.0.0.1:{runtime.port}\r\nX-Test-Signature: x\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        reply = await raw_request(runtime.port, head, [b"{" * 10], 0.05)  # then nothing more
        assert reply.startswith(b"HTTP/1.1 408")


async def test_in_flight_cap_per_ip_counts_only_uploads_still_arriving(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        head = (f"POST /voice/webhook HTTP/1.1\r\nHost: 127.0.0.1:{runtime.port}\r\nX-Test-Signature: x\r\n"
                "Content-Type: application/json\r\nContent-Length: 50\r\n\r\n")
        slow = asyncio.ensure_future(raw_request(runtime.port, head, [b" " * 10] * 2, 0.1))
        await wait_for(lambda: runtime.app[WEBHOOK_KEY].uploading == 1)
        # a second slow upload from the same address finds the slot taken
        reply = await raw_request(runtime.port, head, [], 0)
        assert reply.startswith(b"HTTP/1.1 429")
        # a signed callback that arrives whole is never counted against the uploads
        assert (await send(runtime, event(type="call.ringing", providerCallId="x")))[0] == 200
        await slow
        assert runtime.app[WEBHOOK_KEY].uploading == 0


async def test_slow_junk_uploads_do_not_starve_signed_callbacks_from_the_same_address(tmp_path: Path) -> None:
    config = {**CONFIG, "webhookSecurity": {**CONFIG["webhookSecurity"], "maxInFlightPerIp": 8,
                                            "bodyTimeoutMs": 5000}}
    async with run_bridge(config, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        head = (f"POST /voice/webhook HTTP/1.1\r\nHost: 127.0.0.1:{runtime.port}\r\nX-Test-Signature: junk\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        slow = [asyncio.ensure_future(raw_request(runtime.port, head, [b" "] * 4, 0.5)) for _ in range(10)]
        await wait_for(lambda: runtime.app[WEBHOOK_KEY].uploading == 8)
        statuses = await asyncio.gather(*(send(runtime, event(type="call.ringing", providerCallId=f"x{i}"))
                                          for i in range(15)))
        assert [status for status, _ in statuses] == [200] * 15
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)


async def test_host_header_injection_is_refused(tmp_path: Path) -> None:
    config = {**CONFIG, "webhookSecurity": {**CONFIG["webhookSecurity"], "allowedHosts": ["voice.example.com"]}}
    async with run_bridge(config, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        body = event(type="call.initiated", providerCallId="P3", direction="inbound", **{"from": "+15550001111"})
        carrier: SignedJsonCarrier = runtime.carrier
        # an attacker signs for a host they control and sends it in Host: refused before verification
        evil = {"Host": "evil.example.net", "X-Test-Signature": carrier.sign("https://evil.example.net/voice/webhook", body),
                "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{runtime.port}/voice/webhook", data=body, headers=evil) as resp:
                assert resp.status == 400
            # forwarded headers from an untrusted setup are ignored; the listed Host is accepted
            good = {"Host": "voice.example.com", "X-Forwarded-Host": "evil.example.net",
                    "X-Test-Signature": carrier.sign("https://voice.example.com/voice/webhook", body),
                    "Content-Type": "application/json"}
            async with session.post(f"http://127.0.0.1:{runtime.port}/voice/webhook", data=body, headers=good) as resp:
                assert resp.status == 200
        assert runtime.manager.find_call(None, "P3") is not None


async def test_replayed_webhook_is_acknowledged_without_side_effect(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        status, text = await send(runtime, event(type="call.initiated", providerCallId="P4", direction="inbound",
                                                  **{"from": "+15550001111"}))
        call = runtime.manager.calls[json.loads(text)["callId"]]
        dtmf = event(type="call.dtmf", providerCallId="P4", digits="7")
        assert (await send(runtime, dtmf))[0] == 200
        status, text = await send(runtime, dtmf)  # the same delivery again
        assert status == 200 and json.loads(text)["callId"] == call.callId
        assert call.metadata["dtmf"] == "7"
        assert runtime.metrics.value("voicecall_webhook_replays_total", carrier="fake") == 1


async def test_effects_run_once_per_new_event_never_for_a_replay_or_a_redelivery(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        carrier: SignedJsonCarrier = runtime.carrier
        status, text = await send(runtime, event(type="call.initiated", providerCallId="P5", direction="inbound",
                                                  **{"from": "+15550001111"}))
        call = runtime.manager.calls[json.loads(text)["callId"]]
        first = {"id": uuid.uuid4().hex, "type": "call.dtmf", "providerCallId": "P5", "digits": "5",
                 "eventKey": "ev-1", "effects": ["hang-up"]}
        body = json.dumps({**first, "attempt": 1}).encode()
        assert (await send(runtime, body))[0] == 200
        assert (await send(runtime, body))[0] == 200  # a replay: the same delivery, the same signature
        # a redelivery: a new delivery (new body, new signature) of the same event
        assert (await send(runtime, json.dumps({**first, "attempt": 2}).encode()))[0] == 200
        assert carrier.applied == ["hang-up"]
        assert call.metadata["dtmf"] == "5"
        # a new event with the same effect runs it again
        assert (await send(runtime, json.dumps({**first, "eventKey": "ev-2"}).encode()))[0] == 200
        assert carrier.applied == ["hang-up", "hang-up"]


async def test_late_inbound_initiated_after_its_hangup_is_dropped(tmp_path: Path) -> None:
    """Out of order: the hang-up of a call we never saw, then its call.initiated."""
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        assert (await send(runtime, event(type="call.ended", providerCallId="P6")))[0] == 200
        status, text = await send(runtime, event(type="call.initiated", providerCallId="P6", direction="inbound",
                                                  **{"from": "+15550001111"}))
        assert status == 200 and json.loads(text)["callId"] is None
        assert runtime.manager.calls == {}
        # another call is still taken
        await send(runtime, event(type="call.initiated", providerCallId="P7", direction="inbound",
                                  **{"from": "+15550001111"}))
        assert runtime.manager.find_call(None, "P7") is not None


async def test_health_and_metrics(tmp_path: Path) -> None:
    async with run_bridge(CONFIG, tmp_path, carrier=SignedJsonCarrier()) as runtime:
        await send(runtime, b"{}", method="GET")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{runtime.port}/healthz") as resp:
                assert resp.status == 200 and await resp.json() == {"ok": True, "provider": "fake", "activeCalls": 0}
            async with session.get(f"http://127.0.0.1:{runtime.port}/metrics") as resp:
                text = await resp.text()
        assert 'voicecall_webhooks_total{carrier="fake",status="405"} 1.0' in text
        assert 'voicecall_webhook_duration_seconds_count{carrier="fake"} 1.0' in text
        assert "# TYPE voicecall_calls_active gauge\n" in text and "voicecall_calls_active{" not in text
