"""RPC client for the CLI and the agent tool: talks to the running server, never starts one."""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp


class RpcClientError(Exception):
    pass


class RpcClient:
    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 600) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=5)
        self._ids = itertools.count(1)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params or {}}
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as session:
                async with session.post(self.url, json=body, headers=self._headers) as resp:
                    if resp.status == 401:
                        raise RpcClientError("the server refused the RPC token (set rpc.token or VOICECALL_RPC_TOKEN)")
                    data = await resp.json(content_type=None)
        except aiohttp.ClientConnectionError:
            raise RpcClientError(f"no voicecall server at {self.url} (start one with `voicecall serve`)") from None
        except TimeoutError:
            raise RpcClientError(f"the server at {self.url} did not answer in time") from None
        if not isinstance(data, dict):
            raise RpcClientError("the server sent a malformed reply")
        if "error" in data:
            raise RpcClientError(str(data["error"].get("message", "request failed")))
        return data.get("result")
