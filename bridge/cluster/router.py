"""Commands for a call owned by another node go to that node through Redis, and the answer comes back.

Each node listens on its own channel `<prefix>:node:<nodeId>`. A request names the node to reply to;
the owner runs the command through its own dispatcher (never forwarding again) and publishes the
result or the error. The owner is the node named in the call record (`metadata.node`).
Besides the RPC methods, nodes ask each other `cluster.*` methods (`internal`): a whole webhook for
the owner to process, a call's release to the node that accepted its media (bridge/cluster/handover.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bridge.cluster.errors import NodeUnreachable, RouteError
from bridge.cluster.redis_store import TRANSIENT, RedisStore
from bridge.tasks import BackgroundTasks
from media.clock import Clock

log = logging.getLogger(__name__)

# method, params -> result (the owner's own dispatcher); `describe` turns its exception into (code, message)
LocalCall = Callable[[str, dict[str, Any]], Awaitable[Any]]
Describe = Callable[[BaseException], tuple[int, str]]
Internal = Callable[[dict[str, Any]], Awaitable[Any]]

DRAINING = -32010  # the node is shutting down: the asker treats it as gone and takes the call itself
RESUBSCRIBE_S = 0.5


class ClusterRouter:
    def __init__(self, store: RedisStore, node_id: str, clock: Clock, local: LocalCall, describe: Describe,
                 *, timeout_s: float = 30.0) -> None:
        self.internal: dict[str, Internal] = {}  # `cluster.*` methods this node answers
        self.draining = False  # set at shutdown: requests are refused with DRAINING
        self.store = store
        self.node_id = node_id
        self.clock = clock
        self._local = local
        self._describe = describe
        self.timeout_s = timeout_s
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._tasks = BackgroundTasks(log)
        self.forwarded = 0

    def channel(self, node_id: str) -> str:
        return f"{self.store.keys.prefix}:node:{node_id}"

    async def start(self) -> None:
        pubsub = await self._subscribe()
        self._listener = asyncio.get_running_loop().create_task(self._listen(pubsub), name="cluster-router")

    async def _subscribe(self) -> Any:
        pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.channel(self.node_id))
        return pubsub

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        await self._tasks.cancel()
        for future in self._pending.values():
            if not future.done():
                future.cancel()

    async def owner(self, call_id: str) -> str | None:
        if not call_id:
            return None
        loaded = await self.store.load(call_id)
        if loaded is None:
            return None
        node = loaded[0].metadata.get("node")
        return str(node) if node else None

    async def forward(self, owner: str, method: str, params: dict[str, Any], timeout_s: float | None = None) -> Any:
        request_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message = {"kind": "request", "id": request_id, "method": method, "params": params, "replyTo": self.node_id}
        try:
            receivers = await self.store.redis.publish(self.channel(owner), json.dumps(message))
            if not receivers:
                raise NodeUnreachable(f"the call is carried by node {owner}, which is not reachable")
            self.forwarded += 1
            wait_s = self.timeout_s if timeout_s is None else timeout_s
            reply = await self.clock.wait_for(future, wait_s)
        except TimeoutError:
            raise NodeUnreachable(f"node {owner} did not answer within {wait_s:.0f}s") from None
        finally:
            self._pending.pop(request_id, None)
        if "error" in reply:
            if reply["error"]["code"] == DRAINING:
                raise NodeUnreachable(f"node {owner} is shutting down")
            raise RouteError(int(reply["error"]["code"]), str(reply["error"]["message"]))
        return reply.get("result")

    async def _listen(self, pubsub: Any) -> None:
        """Until closed; when Redis goes away the channel is subscribed again once it is back."""
        while True:
            try:
                async for message in _messages(pubsub):
                    if message.get("kind") == "reply":
                        future = self._pending.get(str(message.get("id")))
                        if future is not None and not future.done():
                            future.set_result(message)
                    elif message.get("kind") == "request":
                        self._tasks.spawn(self._serve(message), f"routed-{message.get('method')}")
            except TRANSIENT as exc:
                log.warning("node channel lost (%s); subscribing again", type(exc).__name__)
            finally:
                await pubsub.aclose()
            while True:
                await self.clock.sleep(RESUBSCRIBE_S)
                try:
                    pubsub = await self._subscribe()
                    break
                except TRANSIENT:
                    continue

    async def _serve(self, request: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"kind": "reply", "id": request.get("id")}
        try:
            params = dict(request.get("params") or {})
            method = str(request["method"])
            if self.draining:
                reply["error"] = {"code": DRAINING, "message": f"node {self.node_id} is shutting down"}
            elif method in self.internal:
                reply["result"] = await self.internal[method](params)
            else:
                reply["result"] = await self._local(method, params)
        except Exception as exc:  # noqa: BLE001 - the error goes back to the node that asked
            code, text = self._describe(exc)
            reply["error"] = {"code": code, "message": text}
        await self.store.redis.publish(self.channel(str(request.get("replyTo"))), json.dumps(reply, default=str))


async def _messages(pubsub: Any) -> AsyncIterator[dict[str, Any]]:
    async for item in pubsub.listen():
        if item.get("type") == "message":
            try:
                yield json.loads(item["data"])
            except ValueError:
                log.warning("unreadable message on the node channel ignored")
