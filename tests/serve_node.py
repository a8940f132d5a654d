"""One bridge node as its own process (`voicecall serve`), for tests that kill -9 a node."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from bridge.client import RpcClient
from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent


class ServeNode:
    """`config` is a raw config mapping; the store (under `directory`) and the HTTP port are filled in."""

    def __init__(self, name: str, directory: Path, config: dict[str, Any]) -> None:
        self.name = name
        self.directory = directory
        self.http_port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        raw = {**config, "store": str(directory / "store"),
               "serve": {**config.get("serve", {}), "port": self.http_port, "bind": "127.0.0.1"}}
        self.config = directory / "node.yaml"
        self.config.write_text(yaml.safe_dump(raw))
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    async def start(self, timeout: float = 30) -> None:
        """Start the process and wait until its /healthz answers ok."""
        self._log = open(self.directory / "node.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "serve", "--config", str(self.config)],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ},
        )
        async with asyncio.timeout(timeout):
            while True:
                assert self.process.poll() is None, f"{self.name} exited:\n{self.tail()}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with aiohttp.ClientSession() as session, session.get(
                        f"http://127.0.0.1:{self.http_port}/healthz"
                    ) as response:
                        if response.status == 200 and (await response.json()).get("ok"):
                            return
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self) -> str:
        return (self.directory / "node.log").read_text(errors="replace")[-3000:]

    def rpc(self) -> RpcClient:
        return RpcClient(f"http://127.0.0.1:{self.http_port}/rpc")

    async def calls(self) -> list[dict[str, Any]]:
        # `here`: the calls this node carries (on a cluster the list is every node's)
        return list((await self.rpc().call("voicecall.list", {"limit": 100, "here": True}))["calls"])
