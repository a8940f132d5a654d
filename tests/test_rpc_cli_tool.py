"""RPC over HTTP and WebSocket (with and without a token), every CLI command against a running server,
and the agent tool dispatcher."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from bridge.calls import CallState
from bridge.tool import TOOL_SCHEMA, dispatch
from tests.harness import free_port, rpc_client, run_bridge, wait_for

ROOT = Path(__file__).resolve().parents[1]
FAST_MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0,
             "calleeScript": ["Sounds good."]}
BASE = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "inboundPolicy": "open",
        "maxConcurrentCalls": 3, "streaming": {"enabled": True, "provider": "none"},
        "tts": {"provider": "espeak"}, "responseModel": "offline", "mock": FAST_MOCK}


async def post(url: str, body: object, token: str | None = None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.post(url, data=json.dumps(body), headers=headers) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)


async def test_jsonrpc_http_framing(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/rpc"
        status, body = await post(url, {"jsonrpc": "2.0", "id": 1, "method": "voicecall.status",
                                        "params": {"callId": "nope"}})
        assert status == 200 and body == {"jsonrpc": "2.0", "id": 1, "result": {"found": False}}
        _, body = await post(url, {"jsonrpc": "2.0", "id": 2, "method": "voicecall.fly"})
        assert body["error"]["code"] == -32601
        _, body = await post(url, {"jsonrpc": "2.0", "id": 3, "method": "voicecall.speak", "params": {"callId": "x"}})
        assert body["error"] == {"code": -32602, "message": "missing parameter `message`"}
        _, body = await post(url, {"jsonrpc": "2.0", "id": 4, "method": "voicecall.end", "params": {"callId": "x"}})
        assert body["error"] == {"code": -32000, "message": "Call not found: x"}
        _, body = await post(url, [{"jsonrpc": "2.0", "id": 5, "method": "voicecall.list"}, {"bad": 1}])
        assert body[0]["result"] == {"calls": []} and body[1]["error"]["code"] == -32600
        status, _ = await post(url, {"jsonrpc": "2.0", "method": "voicecall.list"})  # notification
        assert status == 204
        async with aiohttp.ClientSession() as session, session.post(url, data=b"{nope") as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == -32700


async def test_rpc_token_required_on_http_and_websocket(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "rpc": {"token": "s3cret-token"}}, tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/rpc"
        request = {"jsonrpc": "2.0", "id": 1, "method": "voicecall.list"}
        assert (await post(url, request))[0] == 401
        assert (await post(url, request, token="wrong"))[0] == 401
        assert (await post(url, request, token="s3cret-token"))[0] == 200
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(url)
            assert info.value.status == 401
            async with session.ws_connect(url, headers={"Authorization": "Bearer s3cret-token"}) as ws:
                await ws.send_json(request)
                assert (await ws.receive_json())["result"] == {"calls": []}


async def test_websocket_rpc_and_event_subscription(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/rpc"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "voicecall.subscribe"})
            assert (await ws.receive_json())["result"] == {"subscribed": True}
            await ws.send_json({"jsonrpc": "2.0", "id": 2, "method": "voicecall.initiate",
                                "params": {"message": "Hello there.", "mode": "notify"}})
            seen: list[str] = []
            call_id = None
            async with asyncio.timeout(20):
                while "call.ended" not in seen:
                    msg = await ws.receive_json()
                    if msg.get("id") == 2:
                        call_id = msg["result"]["callId"]
                    elif msg.get("method") == "voicecall.event":
                        seen.append(msg["params"]["type"])
            assert call_id and {"call.created", "call.answered", "call.speaking", "call.ended"} <= set(seen)


def test_server_refuses_non_loopback_bind_without_token(tmp_path: Path) -> None:
    config = tmp_path / "open.yaml"
    config.write_text(yaml.safe_dump({**BASE, "store": str(tmp_path), "serve": {"bind": "0.0.0.0", "port": free_port()}}))
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 1
    assert "not loopback: set rpc.token" in proc.stderr


def cli(*args: str, url: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VOICECALL_URL": url, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)


async def test_every_cli_command_against_a_running_server(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/rpc"
        run = lambda *a: asyncio.to_thread(cli, *a, url=url)  # noqa: E731 - the CLI blocks; keep the loop free
        proc = await run("call", "--to", "+15550007777", "-m", "Hello from the CLI", "--json")
        assert proc.returncode == 0, proc.stderr
        call_id = json.loads(proc.stdout)["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: any(t.speaker == "user" for t in call.transcript), timeout=20)
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        # The callee answers only once "Which day?" has been heard in full: a scripted reply queued
        # earlier would race the CLI's start-up and barge in on the question.
        turn = asyncio.ensure_future(run("continue", "--call-id", call_id, "-m", "Which day?"))
        await wait_for(lambda: any(t.text == "Which day?" for t in call.transcript)
                       and call.state == CallState.LISTENING, timeout=20)
        assert (await run("callee", "--call-id", call_id, "--say", "Tuesday works.")).returncode == 0
        proc = await turn
        assert proc.returncode == 0 and proc.stdout.strip() == "caller: Tuesday works.", proc.stderr
        assert (await run("speak", "--call-id", call_id, "-m", "Great.")).returncode == 0
        proc = await run("dtmf", "--call-id", call_id, "--digits", "1")
        assert proc.returncode == 0, proc.stderr
        proc = await run("callee", "--call-id", call_id, "--press", "9")
        assert proc.returncode == 0, proc.stderr
        await wait_for(lambda: call.metadata.get("dtmf") == "9", timeout=5)
        (tmp_path / "audio").mkdir()
        wav = tmp_path / "audio" / "caller.wav"
        import numpy as np
        import soundfile

        soundfile.write(wav, (np.sin(np.arange(8000) / 5) * 8000).astype(np.int16), 8000)
        frames_before = runtime.manager.voice(call_id).bridge.stats.frames_in
        proc = await run("callee", "--call-id", call_id, "--play", str(wav))
        assert proc.returncode == 0, proc.stderr
        await wait_for(lambda: runtime.manager.voice(call_id).bridge.stats.frames_in >= frames_before + 40, timeout=5)
        proc = await run("callee", "--call-id", call_id, "--play", str(tmp_path / "audio" / "missing.wav"))
        assert proc.returncode == 1 and "cannot read WAV" in proc.stderr
        # outside the audio folder: refused before the file system is asked, so existence never leaks
        for outside in (str(wav.parent.parent / "calls.jsonl"), "/etc/passwd", "/nonexistent.wav", "../calls.jsonl"):
            proc = await run("callee", "--call-id", call_id, "--play", outside)
            assert proc.returncode == 1 and proc.stderr.strip() == (
                f"voicecall: `file` must be a WAV inside {(tmp_path / 'audio').resolve()}"), proc.stderr
        proc = await run("status", "--call-id", call_id)
        assert proc.returncode == 0 and "Which day?" in proc.stdout and "caller: Tuesday works." in proc.stdout
        proc = await run("list", "--active", "--json")
        assert [c["callId"] for c in json.loads(proc.stdout)["calls"]] == [call_id]
        assert (await run("end", "--call-id", call_id)).returncode == 0
        assert call.state == CallState.HANGUP_BOT
        proc = await run("status", "--call-id", "missing")
        assert proc.returncode == 1 and proc.stderr.strip() == "voicecall: call not found: missing"
        proc = await run("inject", "--from", "+15550002222", "--say", "Hi there")
        assert proc.returncode == 0 and "accepted" in proc.stdout
        log = str(tmp_path / "calls.jsonl")
        proc = await run("tail", "--file", log, "--no-follow", "--since", "3")
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3
        proc = await run("latency", "--file", log, "--json")
        stats = json.loads(proc.stdout)
        # voice-to-voice turns: at least the caller's greeting reply (auto-answered) and "Tuesday works." ->
        # "Great." (the WAV and the injected call may add theirs while the commands run)
        assert stats["turns"] >= 2 and stats["calls"] >= 1
        total = stats["parts"]["total"]
        assert total["count"] == stats["turns"] and 0 < total["p50"] <= total["p95"] <= total["p99"] <= total["max"]
        proc = await run("tool-schema")
        assert json.loads(proc.stdout)["function"]["name"] == "voice_call"
        proc = await run("check", "--json")
        assert proc.returncode == 0 and json.loads(proc.stdout)["provider"] == "mock"


def test_cli_without_a_server_fails_with_one_line() -> None:
    proc = cli("status", "--call-id", "x", url=f"http://127.0.0.1:{free_port()}/rpc")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("voicecall: no voicecall server at http://127.0.0.1:")
    assert "Traceback" not in proc.stderr


def test_cli_bad_config_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("provider: mock\nmaxConcurentCalls: 3\n")
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "check", "--config", str(bad)], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 2 and "maxConcurentCalls: unknown key; did you mean 'maxConcurrentCalls'?" in proc.stderr


def test_expose_without_tailscale_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "expose", "--mode", "funnel"], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, env=env)
    assert proc.returncode == 1
    assert "`tailscale` is not installed or not on PATH" in proc.stderr


def test_expose_drives_the_tailscale_cli(tmp_path: Path) -> None:
    record = tmp_path / "calls.txt"
    fake = tmp_path / "tailscale"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {record}
if [ "$1" = status ]; then echo '{{"Self": {{"DNSName": "box.tail1234.ts.net."}}}}'; fi
""")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "expose", "--mode", "funnel", "--port", "4000"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "funnel: https://box.tail1234.ts.net/voice/webhook"
    assert record.read_text().splitlines()[0] == "funnel --bg --set-path /voice/webhook http://127.0.0.1:4000/voice/webhook"


def test_tool_schema_is_an_openai_function() -> None:
    fn = TOOL_SCHEMA["function"]
    assert TOOL_SCHEMA["type"] == "function" and fn["name"] == "voice_call"
    assert fn["parameters"]["properties"]["action"]["enum"] == [
        "initiate_call", "continue_call", "speak_to_user", "send_dtmf", "end_call", "get_status", "transfer_call"]


async def test_tool_dispatch_runs_the_rpc_path(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        call = runtime.dispatcher.call
        started = await dispatch(call, {"action": "initiate_call", "message": "Hi from the tool", "mode": "notify"})
        assert started["initiated"] is True
        status = await dispatch(call, {"action": "get_status", "callId": started["callId"]})
        assert status["found"] is True and status["call"]["metadata"]["initialMessage"] == "Hi from the tool"
        assert await dispatch(call, {"action": "end_call", "callId": started["callId"]}) == {"success": True}
        assert await dispatch(call, {"action": "speak_to_user", "callId": started["callId"]}) == {
            "error": "speak_to_user needs message"}
        ended = await dispatch(call, {"action": "speak_to_user", "callId": started["callId"], "message": "x"})
        assert ended["error"].startswith("Call ") and "has ended" in ended["error"]
        assert (await dispatch(call, {"action": "dance"}))["error"].startswith("unknown action 'dance'")
        legacy = await dispatch(call, {"mode": "status", "sid": started["callId"]})
        assert legacy["found"] is True
        # over the network too: the same dispatcher with the RPC client
        remote = await dispatch(rpc_client(runtime).call, {"action": "get_status", "callId": started["callId"]})
        assert remote == legacy


def test_serve_runs_one_server_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    import signal
    import time
    import urllib.request

    port = free_port()
    config = tmp_path / "mock.yaml"
    config.write_text(yaml.safe_dump({**BASE, "store": str(tmp_path), "serve": {"port": port}}))
    server = subprocess.Popen([sys.executable, "-m", "bridge.cli", "serve", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                    assert json.loads(resp.read())["ok"] is True
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        proc = subprocess.run([sys.executable, "-m", "bridge.cli", "list", "--config", str(config), "--json"],
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert proc.returncode == 0 and json.loads(proc.stdout) == {"calls": []}
        # a second server on the same port fails with a clear reason instead of a traceback
        second = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert second.returncode == 1 and "is another voicecall server running?" in second.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=20)
    assert server.returncode == 0, err
    assert f"voicecall serving mock on http://127.0.0.1:{port}" in out
