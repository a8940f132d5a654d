"""`voicecall.levels` on the RPC WebSocket: a call's audio levels (RMS per side) about 10 times a second.

A tap on the call's MediaPipeline exists only while a subscriber watches; it follows the call's
current bridge (a reconnected media stream gets a new one) and goes away with the subscription.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.manager import CallManager
from media.levels import LevelTap

INTERVAL_S = 0.1


async def stream_levels(manager: CallManager, call_id: str, send: Callable[[Any], Awaitable[None]],
                        interval_s: float = INTERVAL_S) -> None:
    tap = LevelTap()
    bridge: Any = None
    try:
        while True:
            call = manager.get_call(call_id)
            voice = manager.voice(call_id)
            current = voice.bridge if voice is not None else None
            if current is not bridge:
                if bridge is not None:
                    bridge.remove_level_tap(tap)
                bridge = current
                if bridge is not None:
                    bridge.add_level_tap(tap)
            levels = tap.take()
            await send({"jsonrpc": "2.0", "method": "voicecall.event",
                        "params": {"type": "call.levels", "callId": call_id,
                                   "caller": round(levels["caller"], 5), "bot": round(levels["bot"], 5)}})
            if call is None or call.terminal:
                return
            await manager.clock.sleep(interval_s)
    finally:
        if bridge is not None:
            bridge.remove_level_tap(tap)


class LevelSubscriptions:
    """The level streams of one RPC WebSocket connection, by call id."""

    def __init__(self, manager: CallManager, send: Callable[[Any], Awaitable[None]]) -> None:
        self._manager = manager
        self._send = send
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def handle(self, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict) or not isinstance(params.get("callId"), str):
            raise ValueError("`callId` (a string) is required")
        call_id = params["callId"]
        on = params.get("on", True)
        if on is not True and on is not False:
            raise ValueError("`on` must be true or false")
        if on and self._manager.status(call_id) is None:
            raise ValueError(f"Call not found: {call_id}")
        call = self._manager.status(call_id)
        key = call.callId if call is not None else call_id
        old = self._tasks.pop(key, None)
        if old is not None:
            old.cancel()
        if on:
            task = asyncio.create_task(stream_levels(self._manager, key, self._send))
            self._tasks[key] = task
            task.add_done_callback(self._forget)
        return {"levels": on, "callId": key}

    def _forget(self, task: asyncio.Task[None]) -> None:
        for key, running in list(self._tasks.items()):
            if running is task:
                del self._tasks[key]

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
