"""Start a real bridge (Runtime: carrier + manager + the one aiohttp server) on 127.0.0.1 for a test."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bridge.client import RpcClient
from bridge.config import build_settings
from bridge.runtime import Runtime
from carriers.base import Carrier
from media.clock import Clock
from tests.workers import slot

_handed_out: deque[int] = deque(maxlen=256)


def free_port() -> int:
    """A port the OS says is free, from this xdist worker's share (ports split by (port // 2) % workers:
    Linux hands out odd ports to bind(0)), and not one this process handed out lately (a test may ask
    for two before it binds either)."""
    index, count = slot()
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if (port // 2) % count == index and port not in _handed_out:
            _handed_out.append(port)
            return port
    raise RuntimeError("no free port in this worker's share")


@asynccontextmanager
async def run_bridge(config: dict[str, Any], store: Path, *, env: dict[str, str] | None = None,
                     public_url: bool = True, carrier: Carrier | None = None,
                     clock: Clock | None = None) -> AsyncIterator[Runtime]:
    """`config` is a raw config mapping; the store, port and (unless given) publicUrl are filled in."""
    raw = dict(config)
    port = free_port()
    raw["store"] = str(store)
    raw["serve"] = {**raw.get("serve", {}), "port": port, "bind": "127.0.0.1"}
    if public_url and raw.get("provider", "mock") != "mock":
        raw.setdefault("publicUrl", f"http://127.0.0.1:{port}{raw['serve'].get('path', '/voice/webhook')}")
    runtime = Runtime(build_settings(raw, env or {}), carrier=carrier, clock=clock)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def rpc_client(runtime: Runtime, token: str | None = None) -> RpcClient:
    return RpcClient(f"http://127.0.0.1:{runtime.port}/rpc", token)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll a condition on real time (for end-to-end tests over sockets)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)
