"""Commands for a call owned by another node go to that node through Redis, and the answer comes back.

Each node listens on its own channel `<prefix>:node:<nodeId>`. A request names the node to reply to;
the owner runs the command through its own dispatcher (never forwarding again) and publishes the
result or the error. The owner is the node named in the call record (`metadata.node`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import fields
from typing import Any

from bridge.calls import CallEvent, CallState, Direction, EventType
from bridge.cluster.errors import RouteError
from bridge.cluster.redis_store import RedisStore
from bridge.tasks import BackgroundTasks
from media.clock import Clock

log = logging.getLogger(__name__)

EVENT_METHOD = "cluster.event"  # a webhook's event for the owner to apply

# method, params -> result (the owner's own dispatcher); `describe` turns its exception into (code, message)
LocalCall = Callable[[str, dict[str, Any]], Awaitable[Any]]
Describe = Callable[[BaseException], tuple[int, str]]


class ClusterRouter:
    def __init__(self, store: RedisStore, node_id: str, clock: Clock, local: LocalCall, describe: Describe,
                 on_event: Callable[[CallEvent], None], *, timeout_s: float = 30.0) -> None:
        self._on_event = on_event
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
        pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.channel(self.node_id))
        self._listener = asyncio.get_running_loop().create_task(self._listen(pubsub), name="cluster-router")

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
                raise RouteError(-32000, f"the call is carried by node {owner}, which is not reachable")
            self.forwarded += 1
            reply = await self.clock.wait_for(future, self.timeout_s if timeout_s is None else timeout_s)
        except TimeoutError:
            raise RouteError(-32000, f"node {owner} did not answer within {self.timeout_s:.0f}s") from None
        finally:
            self._pending.pop(request_id, None)
        if "error" in reply:
            raise RouteError(int(reply["error"]["code"]), str(reply["error"]["message"]))
        return reply.get("result")

    async def forward_event(self, event: CallEvent) -> bool:
        """A webhook's event for a call another node carries: applied there. False: not another node's call."""
        call_id = event.call_id
        if not call_id and event.provider_call_id:
            call_id = await self.store.call_id_for(event.provider_call_id)
        owner = await self.owner(call_id or "")
        if owner is None or owner == self.node_id:
            return False
        await self.forward(owner, EVENT_METHOD, event_to_json(event))
        return True

    async def _listen(self, pubsub: Any) -> None:
        try:
            async for message in _messages(pubsub):
                if message.get("kind") == "reply":
                    future = self._pending.get(str(message.get("id")))
                    if future is not None and not future.done():
                        future.set_result(message)
                elif message.get("kind") == "request":
                    self._tasks.spawn(self._serve(message), f"routed-{message.get('method')}")
        finally:
            await pubsub.aclose()

    async def _serve(self, request: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"kind": "reply", "id": request.get("id")}
        try:
            params = dict(request.get("params") or {})
            if request["method"] == EVENT_METHOD:
                self._on_event(event_from_json(params))
                reply["result"] = {"applied": True}
            else:
                reply["result"] = await self._local(str(request["method"]), params)
        except Exception as exc:  # noqa: BLE001 - the error goes back to the node that asked
            code, text = self._describe(exc)
            reply["error"] = {"code": code, "message": text}
        await self.store.redis.publish(self.channel(str(request.get("replyTo"))), json.dumps(reply, default=str))


def event_to_json(event: CallEvent) -> dict[str, Any]:
    return {f.name: getattr(event, f.name) for f in fields(event)}


def event_from_json(data: dict[str, Any]) -> CallEvent:
    known = {f.name for f in fields(CallEvent)}
    values = {k: v for k, v in data.items() if k in known}
    values["type"] = EventType(values["type"])
    if values.get("direction") is not None:
        values["direction"] = Direction(values["direction"])
    if values.get("reason") is not None:
        values["reason"] = CallState(values["reason"])
    return CallEvent(**values)


async def _messages(pubsub: Any) -> AsyncIterator[dict[str, Any]]:
    async for item in pubsub.listen():
        if item.get("type") == "message":
            try:
                yield json.loads(item["data"])
            except ValueError:
                log.warning("unreadable message on the node channel ignored")
