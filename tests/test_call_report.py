"""After-call report: payload and HMAC signature, retries with backoff on the fake clock, delivery
from a real call through the server, and kill -9 of the server between the end of a call and the
delivery (receiver down at first): delivered exactly once after the restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bridge.calls import CallRecord, CallState, Direction, TranscriptEntry
from bridge.config import CallEndedHook
from bridge.hooks import ReportSender
from bridge.outbox import Outbox, Pending
from bridge.report import build_report, signature, verify
from media.clock import FakeClock
from tests.fakes.report_receiver import SECRET, Receiver
from tests.harness import free_port, rpc_client, run_bridge, wait_for

ROOT = Path(__file__).resolve().parent.parent


def ended_call() -> CallRecord:
    return CallRecord(callId="c-1", provider="mock", direction=Direction.OUTBOUND, state=CallState.VOICEMAIL,
                      from_="+15550001234", to="+15550000005", startedAt=100.0, answeredAt=102.0, endedAt=130.5,
                      endReason="voicemail", transcript=[TranscriptEntry(110.0, "bot", "Please call back.")],
                      metadata={"answeredBy": "machine", "streamToken": "do-not-leak", "turnLatenciesMs": [812.5]})


def test_report_payload_and_signature() -> None:
    report = build_report(ended_call(), delivery_id="d-1", recording="/store/recordings/c-1.wav")
    assert report["event"] == "call.ended" and report["deliveryId"] == "d-1"
    assert (report["endReason"], report["answeredBy"], report["durationSec"]) == ("voicemail", "machine", 28.5)
    assert report["transcript"] == [{"timestamp": 110.0, "speaker": "bot", "text": "Please call back.",
                                     "isFinal": True}]
    assert report["latencies"] == {"turnLatenciesMs": [812.5]} and report["transfer"] is None
    assert report["recording"] == "/store/recordings/c-1.wav"
    assert "do-not-leak" not in json.dumps(report)
    body = json.dumps(report).encode()
    header = signature(SECRET, 1_800_000_000, body)
    assert header.startswith("t=1800000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body, 1_800_000_100)
    assert not verify(SECRET, header, body + b" ", 1_800_000_100), "the body is signed"
    assert not verify("other-secret", header, body, 1_800_000_100)
    assert not verify(SECRET, header, body, 1_800_000_301), "stale timestamps are refused"
    assert not verify(SECRET, "v1=abc", body, 1_800_000_000)


def hook(url: str, **kw: Any) -> CallEndedHook:
    return CallEndedHook.model_validate({"url": url, "secret": SECRET, "retryBaseMs": 1000, **kw})


async def test_failing_receiver_is_retried_with_exponential_backoff(tmp_path: Path) -> None:
    clock = FakeClock()
    receiver = Receiver([503, 500], now=clock.time)
    sender = ReportSender(hook(await receiver.start()), tmp_path, clock)
    try:
        await sender.start()
        sender.submit(build_report(ended_call(), delivery_id="d-7"))
        await wait_for(lambda: len(receiver.received) == 1)
        await wait_for(lambda: sender.failures == 1)
        await clock.advance(0.99)
        assert sender.attempts == 1, "not before the first backoff (1 s)"
        await clock.advance(0.02)
        await wait_for(lambda: sender.failures == 2)
        await clock.advance(1.99)
        assert sender.attempts == 2, "the second backoff doubles (2 s)"
        await clock.advance(0.02)
        await wait_for(lambda: sender.delivered == 1)
        await sender.drain()
        assert [r["delivery"] for r in receiver.received] == ["d-7"] * 3
        assert all(r["valid"] and r["event"] == "call.ended" for r in receiver.received)
        gaps = [r["at"] - receiver.received[0]["at"] for r in receiver.received]
        assert [round(g, 1) for g in gaps] == [0.0, 1.0, 3.0]  # (+0.01: the request runs after the advance)
        assert list(receiver.accepted) == ["d-7"] and Outbox(tmp_path).pending() == []
    finally:
        await sender.close()
        await receiver.stop()


async def test_a_receiver_that_never_recovers_is_given_up_after_max_attempts(tmp_path: Path) -> None:
    clock = FakeClock()
    receiver = Receiver([500] * 10, now=clock.time)
    sender = ReportSender(hook(await receiver.start(), maxAttempts=3, retryMaxMs=1500), tmp_path, clock)
    try:
        await sender.start()
        sender.submit(build_report(ended_call(), delivery_id="d-9"))
        for attempt in range(1, 3):
            await wait_for(lambda a=attempt: sender.failures == a)
            await clock.advance(1.5)
        await wait_for(lambda: sender.failures == 3)
        await sender.drain()
        assert len(receiver.received) == 3 and Outbox(tmp_path).pending() == []
        assert '"op":"dead","id":"d-9"' in (tmp_path / "outbox.jsonl").read_text()
    finally:
        await sender.close()
        await receiver.stop()


def test_outbox_survives_a_torn_last_line(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.add(Pending("a", "{}", 1.0))
    with open(outbox.path, "a") as fh:
        fh.write('{"op":"done","id":"a"')  # crash mid-write
    outbox.repair()
    outbox.done("zzz")
    assert [p.id for p in outbox.pending()] == ["a"], "the torn 'done' did not count, the next line is whole"


BASE = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "maxConcurrentCalls": 3,
        "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
        "responseModel": "offline", "outbound": {"notifyHangupDelaySec": 0},
        "mock": {"ringDelayMs": 50, "answerDelayMs": 100, "calleeHangupAfterMs": 0, "calleeScript": []}}


async def test_a_finished_call_is_reported_to_the_hook_and_to_subscribers(tmp_path: Path) -> None:
    receiver = Receiver()
    url = await receiver.start()
    config = {**BASE, "hooks": {"callEnded": {"url": url, "secret": SECRET}}}
    try:
        async with run_bridge(config, tmp_path) as runtime, aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"http://127.0.0.1:{runtime.port}/rpc")
            await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "voicecall.subscribe"})
            await ws.receive_json()
            result = await rpc_client(runtime).call("voicecall.initiate", {"message": "Your order shipped.",
                                                                           "mode": "notify"})
            await wait_for(lambda: len(receiver.accepted) == 1, timeout=30)
            (report,) = receiver.accepted.values()
            assert report["callId"] == result["callId"] and report["endReason"] == "hangup-bot"
            assert report["transcript"][0]["text"] == "Your order shipped." and report["answeredBy"] is None
            assert receiver.received[0]["valid"]
            while True:
                msg = await asyncio.wait_for(ws.receive_json(), 10)
                if msg.get("params", {}).get("type") == "call.report":
                    break
            assert msg["params"]["report"]["deliveryId"] == report["deliveryId"]
            await ws.close()
    finally:
        await receiver.stop()


async def test_kill_9_between_call_end_and_delivery_delivers_exactly_once_after_restart(tmp_path: Path) -> None:
    hook_port, port = free_port(), free_port()
    receiver = Receiver()
    url = f"http://127.0.0.1:{hook_port}/hooks/call-ended"  # nobody listens there yet
    config = tmp_path / "bridge.yaml"
    config.write_text(yaml.safe_dump({**BASE, "store": str(tmp_path / "store"), "serve": {"port": port},
                                      "hooks": {"callEnded": {"url": url, "secret": SECRET, "retryBaseMs": 200,
                                                              "retryMaxMs": 400}}}))

    def serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "bridge.cli", "serve", "--config", str(config)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    async def up(session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    outbox = tmp_path / "store" / "outbox.jsonl"
    server = serve()
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(20):
                while not await up(session):
                    await asyncio.sleep(0.1)
            async with session.post(f"http://127.0.0.1:{port}/rpc", json={
                    "jsonrpc": "2.0", "id": 1, "method": "voicecall.initiate",
                    "params": {"message": "Dentist at nine.", "mode": "notify"}}) as resp:
                call_id = (await resp.json())["result"]["callId"]
            # the call ends; the report is in the outbox and its first attempts failed
            await wait_for(lambda: outbox.exists() and outbox.read_text().count('"op":"try"') >= 2, timeout=30)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
            assert len(Outbox(outbox.parent).pending()) == 1
            await receiver.start(hook_port)
            server = serve()
            await wait_for(lambda: '"op":"done"' in outbox.read_text(), timeout=30)
            server.send_signal(signal.SIGTERM)
            server.wait(20)
        assert len(receiver.received) == 1 and receiver.received[0]["valid"]
        (report,) = receiver.accepted.values()
        assert report["callId"] == call_id and report["transcript"][0]["text"] == "Dentist at nine."
        assert Outbox(outbox.parent).pending() == [], "marked delivered: a later start sends nothing"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        await receiver.stop()


def test_compaction_keeps_only_pending_entries_with_their_attempts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    for name in ("a", "b", "c"):
        outbox.add(Pending(name, json.dumps({"n": name}, separators=(",", ":")), 1.0))
    outbox.done("a")
    entry = Pending("b", "", 1.0, attempts=2, next_at=99.0)
    outbox.attempted(entry)
    outbox.dead("c")
    before = outbox.size()
    outbox.compact()
    assert outbox.size() < before
    (pending,) = outbox.pending()
    assert (pending.id, pending.body, pending.attempts, pending.next_at) == ("b", '{"n":"b"}', 2, 99.0)
    assert not (tmp_path / "outbox.jsonl.tmp").exists()
