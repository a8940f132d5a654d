"""Tunnels started by `serve`: ngrok through its CLI (a fake ngrok on PATH here), and a clear error without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.runtime import StartupError
from tests.harness import run_bridge

BASE = {"provider": "mock", "fromNumber": "+15550001234", "tunnel": {"provider": "ngrok", "ngrokAuthToken": "tok-123"}}


def fake_ngrok(folder: Path, record: Path) -> None:
    script = folder / "ngrok"
    script.write_text(f"""#!/bin/sh
echo "$@" > {record}
echo "token=$NGROK_AUTHTOKEN" >> {record}
echo '{{"lvl":"info","msg":"starting web service","addr":"127.0.0.1:4040"}}'
echo '{{"lvl":"info","msg":"started tunnel","name":"command_line","url":"https://abc123.ngrok.app"}}'
exec sleep 30
""")
    script.chmod(0o755)


async def test_ngrok_tunnel_sets_the_public_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "argv.txt"
    fake_ngrok(tmp_path, record)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    async with run_bridge(BASE, tmp_path, public_url=False) as runtime:
        assert runtime.settings.publicUrl == "https://abc123.ngrok.app/voice/webhook"
        assert runtime.manager.webhook_url(callId="c1") == "https://abc123.ngrok.app/voice/webhook?callId=c1"
        assert runtime.manager.stream_url() == "wss://abc123.ngrok.app/voice/stream"
        argv, token = record.read_text().splitlines()
        assert argv == f"http {runtime.port} --log stdout --log-format json" and token == "token=tok-123"


async def test_missing_ngrok_is_a_clear_startup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StartupError, match="`ngrok` is not installed or not on PATH"):
        async with run_bridge(BASE, tmp_path, public_url=False):
            pass
