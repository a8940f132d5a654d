"""The CLI and config as a new user meets them: one line per problem, never a traceback; `check`
refuses what `serve` refuses; secrets never echoed; destinations validated; honest `end` and `tail`."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bridge.calls import CallState, EventType
from tests.harness import run_bridge, wait_for
from tests.test_manager import ev, make
from tests.test_rpc_cli_tool import BASE

ROOT = Path(__file__).resolve().parents[1]
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("OPENAI", "ELEVENLABS", "TWILIO", "TELNYX", "PLIVO", "VOICECALL"))}


def cli(*args: str, env: dict[str, str] | None = None, shell_tail: str = "") -> subprocess.CompletedProcess[str]:
    env = {**CLEAN_ENV, **(env or {})}
    if shell_tail:
        command = " ".join([sys.executable, "-m", "bridge.cli", *args]) + shell_tail
        return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)


def one_clean_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("voicecall: "), proc.stderr
    return proc.stderr


TWILIO = {"provider": "twilio", "fromNumber": "+15550001234",
          "twilio": {"accountSid": "AC" + "1" * 32, "authToken": "tok"}}


@pytest.mark.parametrize("text, expected", [
    ("plugins:\n  entries:\n    voice-call: [1]\n", "plugins.entries.voice-call: must be a mapping"),
    ("plugins:\n  entries:\n    voice-call: {config: {}}\nmessages: [1]\n", "messages: must be a mapping"),
    ("streaming:\n  openaiApiKey: sk-1\n  providers: [1]\n", "streaming.providers"),
    ("tts: {provider: espeek}\n", "did you mean 'espeak'?"),
    ("tts: {provider: openai}\n", "tts.openai.apiKey is required"),
    ("streaming: {enabled: true, provider: openai}\n", "streaming.providers.openai.apiKey is required"),
    ("publicUrl: not a url\n", "publicUrl: must be an absolute http(s) URL"),
    ("rpc: {url: 'localhost:3334'}\n", "rpc.url: must be an absolute http(s) URL"),
    ("provider: telnyx\nfromNumber: '+15550001234'\ntelnyx: {apiKey: k, connectionId: c, publicKey: nope}\n",
     "telnyx.publicKey: must be the base64 Ed25519 public key"),
])
def test_check_and_serve_refuse_the_same_config_in_one_line_each(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text + f"store: {tmp_path}\nserve: {{port: 0}}\n")
    for command in ("check", "serve"):
        stderr = one_clean_error(cli(command, "--config", str(config)), 2)
        assert expected in stderr, stderr


def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(b"provider: mock\ninboundGreeting: caf\xe9\n")
    assert "not UTF-8 text (byte 35 is 0xe9)" in one_clean_error(cli("check", "--config", str(config)), 2)


def test_yaml_error_on_a_secret_line_does_not_echo_the_secret(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("provider: twilio\ntwilio:\n  authToken: 'sup3r-s3cret-t0ken\n  accountSid: AC1\n")
    stderr = one_clean_error(cli("check", "--config", str(config)), 2)
    assert "not valid YAML at line" in stderr and "sup3r" not in stderr
    config.write_text("twilio:\n  authToken: sup3r-s3cret-t0ken: x\n")
    stderr = one_clean_error(cli("check", "--config", str(config)), 2)
    assert "not valid YAML at line 2" in stderr and "sup3r" not in stderr


def test_check_piped_into_head_ends_quietly() -> None:
    proc = cli("check", shell_tail=" | head -1")
    assert proc.returncode == 0 and proc.stdout.startswith("# config OK") and proc.stderr == "", proc.stderr


def test_url_without_scheme_is_one_line() -> None:
    stderr = one_clean_error(cli("list", env={"VOICECALL_URL": "127.0.0.1:3334"}), 1)
    assert stderr.strip() == ("voicecall: VOICECALL_URL must be an http(s) URL like http://127.0.0.1:3334/rpc "
                              "(got '127.0.0.1:3334')")


async def test_cli_against_a_server_base_url_destinations_end_and_tail(tmp_path: Path) -> None:
    async with run_bridge({**BASE, "mock": {**BASE["mock"], "ringDelayMs": 60_000}}, tmp_path) as runtime:
        base = f"http://127.0.0.1:{runtime.port}"  # no /rpc: accepted
        run = lambda *a: asyncio.to_thread(cli, *a, env={"VOICECALL_URL": base})  # noqa: E731
        proc = await run("list", "--json")
        assert proc.returncode == 0, proc.stderr
        for bad in ("+1abc", "5551234"):
            stderr = one_clean_error(await run("call", "--to", bad, "-m", "hi"), 1)
            assert "`to` must be an E.164 number like +15550001234 or a sip: URI" in stderr
        assert "--to is empty" in one_clean_error(await run("call", "--to", "", "-m", "hi"), 1)
        proc = await run("call", "--to", "sip:alice@example.com", "-m", "hi", "--json")
        assert proc.returncode == 0, proc.stderr
        call_id = yaml.safe_load(proc.stdout)["callId"]
        assert (await run("end", "--call-id", call_id)).returncode == 0
        stderr = one_clean_error(await run("end", "--call-id", call_id), 1)
        assert stderr.strip() == f"voicecall: Call {call_id} has already ended (hangup-bot)"
        log = str(tmp_path / "calls.jsonl")
        proc = await run("tail", "--file", log, "--no-follow", "--since", "0")
        assert proc.returncode == 0 and proc.stdout == ""
        proc = await run("tail", "--file", log, "--no-follow", "--since", "2")
        assert len(proc.stdout.splitlines()) == 2
        assert (await run("tail", "--file", log, "--no-follow", "--since", "-1")).returncode == 2


async def test_response_model_none_means_no_auto_reply(tmp_path: Path) -> None:
    config = {**BASE, "responseModel": "none", "inboundGreeting": "Hi.",
              "mock": {**BASE["mock"], "calleeScript": ["I have a question."]}}
    async with run_bridge(config, tmp_path) as runtime:
        assert runtime.manager.responder is None
        provider_id = runtime.carrier.inject_inbound("+15550002222", "+15550001234", ["I have a question."])
        await wait_for(lambda: runtime.manager.find_call(None, provider_id) is not None)
        call = runtime.manager.find_call(None, provider_id)
        await wait_for(lambda: any(t.speaker == "user" for t in call.transcript), timeout=20)
        await runtime.manager.drain()
        assert [t.speaker for t in call.transcript] == ["bot", "user"]


async def test_unanswered_call_frees_its_slot_after_the_ring_timeout(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path, ringTimeoutMs=30_000)
    await manager.start()
    call = await manager.initiate(None, "Hello", "notify")
    manager.process_event(ev(EventType.RINGING, call.callId))
    await clock.advance(39)
    assert not call.terminal
    await clock.advance(2)
    await manager.drain()
    assert call.state == CallState.NO_ANSWER and (call.callId, CallState.NO_ANSWER) in carrier.hangups
    assert manager.active_calls() == []
    answered = await manager.initiate(None, "Hello", "notify")
    manager.process_event(ev(EventType.ANSWERED, answered.callId))
    await clock.advance(41)  # answering replaced the ring timer
    assert answered.state != CallState.NO_ANSWER
    await manager.stop()


async def test_signed_carrier_without_public_url_warns_at_start(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.runtime"):
        async with run_bridge(TWILIO, tmp_path, public_url=False):
            pass
    assert any("no publicUrl" in r.getMessage() and "twilio" in r.getMessage() for r in caplog.records)


async def test_tailscale_path_is_used_and_reset_on_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "calls.txt"
    fake = tmp_path / "tailscale"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {record}
if [ "$1" = status ]; then echo '{{"Self": {{"DNSName": "box.tail1234.ts.net."}}}}'; fi
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    config = {"provider": "mock", "tailscale": {"mode": "funnel", "path": "/hooks/voice"}}
    async with run_bridge(config, tmp_path, public_url=False) as runtime:
        assert runtime.settings.publicUrl == "https://box.tail1234.ts.net/hooks/voice"
        port = runtime.port
    lines = record.read_text().splitlines()
    assert lines[0] == f"funnel --bg --set-path /hooks/voice http://127.0.0.1:{port}/voice/webhook"
    assert lines[-2:] == ["serve reset", "funnel reset"]
