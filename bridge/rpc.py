"""Gateway RPC: `voicecall.*` methods as JSON-RPC 2.0, over HTTP POST and over WebSocket at /rpc.

The same `RpcDispatcher.call` serves HTTP, WebSocket, the agent tool and the CLI (through the
server), so every surface behaves the same.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web

from bridge.cluster.errors import RouteError
from bridge.console.levels import LevelSubscriptions
from bridge.continues import ContinueJobs
from bridge.manager import CallError, CallManager
from bridge.tasks import BackgroundTasks
from media.untrusted import UntrustedJsonError, loads

if TYPE_CHECKING:
    from bridge.cluster.router import ClusterRouter

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
CALL_FAILED = -32000
CALL_MOVED = -32011  # a routed command reached a node that no longer carries the call (it is moving)
MOVE_RETRIES = 20  # 2 s: the new owner's write follows a release within a few Redis round trips
MOVE_RETRY_S = 0.1
MOVING = ""  # _remote_owner: the call is between two owners right now
# Commands about one call: on a cluster, run by the node that carries the call (bridge/cluster/router.py)
ROUTED = frozenset({"voicecall.continue", "voicecall.continue.start", "voicecall.speak", "voicecall.end",
                    "voicecall.status", "voicecall.dtmf", "voicecall.consult.reply", "voicecall.transfer"})
# On a cluster a continueId ends in `@<node id>`: the node whose job it is answers `continue.result`
CONTINUE_NODE_SEP = "@"

MAX_DTMF_DIGITS = 32  # a carrier plays ~10 keys/s; longer strings tie up the call and the RPC
MAX_LIST_LIMIT = 1000
MAX_BATCH = 50


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _str(params: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise RpcError(INVALID_PARAMS, f"missing parameter `{key}`")
        return None
    if not isinstance(value, str):
        raise RpcError(INVALID_PARAMS, f"parameter `{key}` must be a string")
    return value


def _int(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or not low <= value <= high:
        raise RpcError(INVALID_PARAMS, f"parameter `{key}` must be an integer from {low} to {high}")
    return int(value)


def _bool(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise RpcError(INVALID_PARAMS, f"parameter `{key}` must be true or false")
    return value


class RpcDispatcher:
    def __init__(self, manager: CallManager) -> None:
        self.manager = manager
        self.continues = ContinueJobs(manager.clock, BackgroundTasks(log))
        self.router: ClusterRouter | None = None  # set by the runtime on a cluster
        self._methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "voicecall.initiate": self._initiate,
            "voicecall.start": self._start_legacy,
            "voicecall.continue": self._continue,
            "voicecall.continue.start": self._continue_start,
            "voicecall.continue.result": self._continue_result,
            "voicecall.speak": self._speak,
            "voicecall.end": self._end,
            "voicecall.status": self._status,
            "voicecall.list": self._list,
            "voicecall.dtmf": self._dtmf,
            "voicecall.transfer": self._transfer,
            "voicecall.consult.reply": self._consult_reply,
            "mock.inject": self._mock_inject,
            "mock.callee": self._mock_callee,
        }

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    async def call(self, method: str, params: Any, *, route: bool = True) -> Any:
        """`route=False`: run here even if another node carries the call (a request routed to us)."""
        handler = self._methods.get(method)
        if handler is None:
            raise RpcError(METHOD_NOT_FOUND, f"unknown method {method!r}")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "params must be an object")
        if route and self.router is not None and method in ROUTED | {"voicecall.continue.result"}:
            for attempt in range(MOVE_RETRIES):
                owner = self._job_node(params) if method == "voicecall.continue.result" \
                    else await self._remote_owner(params)
                if owner is None:
                    break
                if owner == MOVING:  # released here a moment ago: the new owner's write is on its way
                    await self.manager.clock.sleep(MOVE_RETRY_S)
                    continue
                try:
                    return await self.router.forward(owner, method, params, self._route_timeout(method))
                except RouteError as exc:
                    if exc.code == CALL_MOVED and method == "voicecall.status" and attempt == MOVE_RETRIES - 1:
                        return await self._status_from_store(params)  # e.g. ended long ago, no longer in memory
                    if exc.code != CALL_MOVED or attempt == MOVE_RETRIES - 1:
                        raise RpcError(exc.code, exc.message) from None
                await self.manager.clock.sleep(MOVE_RETRY_S)  # the new owner's write follows the release
        try:
            return await handler(params)
        except CallError as exc:
            raise RpcError(CALL_FAILED, str(exc)) from None

    async def _remote_owner(self, params: dict[str, Any]) -> str | None:
        """The node carrying this call when it is not this one (None: handle it here)."""
        assert self.router is not None
        call_id = params.get("callId") or params.get("sid")
        if not isinstance(call_id, str) or not call_id or self.manager.find_call(call_id, call_id) is not None:
            return None
        loaded = await self.router.store.load(call_id)
        if loaded is None:
            return None
        record = loaded[0]
        owner = str(record.metadata.get("node") or "")
        if owner == self.router.node_id:
            # Redis still names this node, but the call is no longer in memory here: this node let it go to
            # the node that took its media, and that node has not written itself as the owner yet
            return MOVING if not record.terminal else None
        return owner or None

    async def _status_from_store(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self.router is not None
        loaded = await self.router.store.load(str(params.get("callId") or params.get("sid")))
        return {"found": True, "call": loaded[0].public_view()} if loaded else {"found": False}

    def _job_node(self, params: dict[str, Any]) -> str | None:
        """The node that runs a `continue.start` job, from its id (None: this one)."""
        assert self.router is not None
        job = params.get("continueId")
        node = job.rpartition(CONTINUE_NODE_SEP)[2] if isinstance(job, str) and CONTINUE_NODE_SEP in job else None
        return node if node and node != self.router.node_id else None

    def _route_timeout(self, method: str) -> float:
        if method == "voicecall.continue":  # waits for the callee's answer on the owner
            return self.manager.settings.transcriptTimeoutMs / 1000 + 30
        if method == "voicecall.transfer":  # waits for the outcome (warm: the person's ringing too)
            transfer = self.manager.settings.transfer
            return max(transfer.outcomeTimeoutMs, transfer.ringTimeoutMs) / 1000 + 60
        return 30.0

    async def call_here(self, method: str, params: dict[str, Any]) -> Any:
        """A command another node routed here because Redis names this node as the call's owner."""
        call_id = params.get("callId") or params.get("sid")
        if method in ROUTED and isinstance(call_id, str) and self.manager.find_call(call_id, call_id) is None:
            raise RpcError(CALL_MOVED, f"call {call_id} is moving between nodes; try again")
        return await self.call(method, params, route=False)

    # ---------------------------------------------------------------- voicecall.*
    async def _initiate(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("to") == "" or (isinstance(p.get("to"), str) and not p["to"].strip()):
            raise RpcError(INVALID_PARAMS, "parameter `to` is empty: give a number or leave it out for toNumber")
        call = await self.manager.initiate(_str(p, "to", required=False), _str(p, "message") or "",
                                           _str(p, "mode", required=False), **_call_options(p))
        await self._visible()
        return {"callId": call.callId, "initiated": True}

    async def _visible(self) -> None:
        """On a cluster: the new call's record is in Redis before its id is returned, so a command for
        it on any node finds its owner."""
        if self.router is not None and self.manager.shared is not None:
            await self.manager.shared.drain()

    async def _start_legacy(self, p: dict[str, Any]) -> dict[str, Any]:
        message = _str(p, "message", required=False) or "Hello"
        call = await self.manager.initiate(_str(p, "to"), message, _str(p, "mode", required=False),
                                           **_call_options(p))
        await self._visible()
        return {"callId": call.callId, "initiated": True}

    async def _continue(self, p: dict[str, Any]) -> dict[str, Any]:
        transcript = await self.manager.continue_call(_str(p, "callId") or "", _str(p, "message") or "")
        return {"success": True, "transcript": transcript}

    async def _continue_start(self, p: dict[str, Any]) -> dict[str, Any]:
        call_id, message = _str(p, "callId") or "", _str(p, "message") or ""
        call = self.manager.answered_call(call_id)  # refuse at once, not at the first poll
        continue_id = self.continues.start(call.callId, self.manager.continue_call(call.callId, message))
        if self.router is not None:
            continue_id = f"{continue_id}{CONTINUE_NODE_SEP}{self.router.node_id}"
        return {"continueId": continue_id, "callId": call.callId, "started": True}

    async def _continue_result(self, p: dict[str, Any]) -> dict[str, Any]:
        continue_id = _str(p, "continueId") or ""
        result = self.continues.result(continue_id.partition(CONTINUE_NODE_SEP)[0])
        if result is None:
            raise RpcError(INVALID_PARAMS, "unknown or expired `continueId`")
        return {**result, "continueId": continue_id}

    async def _speak(self, p: dict[str, Any]) -> dict[str, Any]:
        await self.manager.speak(_str(p, "callId") or "", _str(p, "message") or "")
        return {"success": True}

    async def _end(self, p: dict[str, Any]) -> dict[str, Any]:
        call_id = _str(p, "callId") or ""
        call = self.manager.status(call_id)
        if call is not None and call.terminal:
            raise RpcError(CALL_FAILED, f"Call {call.callId} has already ended ({call.state})")
        await self.manager.end(call_id)
        return {"success": True}

    async def _status(self, p: dict[str, Any]) -> dict[str, Any]:
        key = _str(p, "callId", required=False) or _str(p, "sid", required=False)
        if not key:  # the seed's newer form: no id lists the calls
            return await self._list(p)
        call = self.manager.status(key)
        return {"found": True, "call": call.public_view()} if call else {"found": False}

    async def _list(self, p: dict[str, Any]) -> dict[str, Any]:
        limit = _int(p, "limit", 50, 1, MAX_LIST_LIMIT)
        if self.router is not None and not _bool(p, "here"):  # a cluster: every node's calls, from Redis
            calls = await self.router.store.recent_calls(limit, active=_bool(p, "active"))
            return {"calls": [c.public_view() for c in calls]}
        calls = self.manager.active_calls() if _bool(p, "active") else list(self.manager.calls.values())
        calls = sorted(calls, key=lambda c: c.startedAt)[-limit:]
        return {"calls": [c.public_view() for c in calls]}

    async def _dtmf(self, p: dict[str, Any]) -> dict[str, Any]:
        digits = _str(p, "digits") or ""
        if not all(d in "0123456789*#ABCD" for d in digits):
            raise RpcError(INVALID_PARAMS, "`digits` may contain only 0-9, *, #, A-D")
        if len(digits) > MAX_DTMF_DIGITS:
            raise RpcError(INVALID_PARAMS, f"`digits` may be at most {MAX_DTMF_DIGITS} keys")
        await self.manager.send_dtmf(_str(p, "callId") or "", digits)
        return {"success": True}

    async def _transfer(self, p: dict[str, Any]) -> dict[str, Any]:
        """Hand the caller to a person; answers with the outcome (`completed`, or why not)."""
        record = await self.manager.transfer(_str(p, "callId") or "", _str(p, "to") or "",
                                             _str(p, "mode", required=False) or "cold",
                                             _str(p, "summary", required=False))
        call = self.manager.status(_str(p, "callId") or "")
        return {"success": record.outcome == "completed", "outcome": record.outcome,
                "state": str(call.state) if call else None, "transfer": asdict(record)}

    async def _consult_reply(self, p: dict[str, Any]) -> dict[str, Any]:
        """The agent's answer to a `call.consult` event (the model's consult_agent tool call)."""
        answer = p.get("answer")
        if not isinstance(answer, str):
            raise RpcError(INVALID_PARAMS, "parameter `answer` must be a string")
        self.manager.consult_reply(_str(p, "callId") or "", _str(p, "consultId") or "", answer)
        return {"success": True}

    # ---------------------------------------------------------------- mock carrier controls
    def _mock(self) -> Any:
        carrier = self.manager.carrier
        if carrier.name != "mock":
            raise RpcError(METHOD_NOT_FOUND, "mock.* methods exist only with provider: mock")
        return carrier

    async def _mock_inject(self, p: dict[str, Any]) -> dict[str, Any]:
        carrier = self._mock()
        script = p.get("script")
        if script is not None and not (isinstance(script, list) and all(isinstance(s, str) for s in script)):
            raise RpcError(INVALID_PARAMS, "`script` must be a list of strings")
        provider_id = carrier.inject_inbound(_str(p, "from") or "", _str(p, "to", required=False)
                                             or self.manager.settings.fromNumber or "", script)
        call = self.manager.find_call(None, provider_id)
        return {"providerCallId": provider_id, "accepted": call is not None,
                "callId": call.callId if call else None}

    async def _mock_callee(self, p: dict[str, Any]) -> dict[str, Any]:
        """Make the simulated callee act: say text, press keys, or hang up."""
        carrier = self._mock()
        call = self.manager.status(_str(p, "callId") or "")
        callee = carrier.callee(call.callId) if call else None
        if callee is None:
            raise RpcError(CALL_FAILED, "no live mock callee on that call")
        action = _str(p, "action")
        if action == "say":
            callee.say(_str(p, "text") or "")
        elif action == "press":
            callee.press(_str(p, "digits") or "")
        elif action == "play":
            pcm, rate = await _read_wav(_inside(self.manager.settings.mock_audio_dir, _str(p, "file") or ""))
            callee.play_later(pcm, rate)
        elif action == "hangup":
            callee.hang_up()
        else:
            raise RpcError(INVALID_PARAMS, "`action` must be say, play, press or hangup")
        return {"success": True}

    # ---------------------------------------------------------------- JSON-RPC framing
    async def handle(self, payload: Any) -> dict[str, Any] | list[dict[str, Any]] | None:
        if isinstance(payload, list):
            if not payload:
                return _error(None, INVALID_REQUEST, "empty batch")
            if len(payload) > MAX_BATCH:
                return _error(None, INVALID_REQUEST, f"a batch may hold at most {MAX_BATCH} requests")
            replies = await asyncio.gather(*(self._handle_one(item) for item in payload))
            return [r for r in replies if r is not None] or None
        return await self._handle_one(payload)

    async def _handle_one(self, item: Any) -> dict[str, Any] | None:
        if not isinstance(item, dict) or item.get("jsonrpc") != "2.0" or not isinstance(item.get("method"), str):
            return _error(item.get("id") if isinstance(item, dict) else None, INVALID_REQUEST,
                          "expected a JSON-RPC 2.0 request object")
        request_id = item.get("id")
        if not (request_id is None or isinstance(request_id, (str, int)) and not isinstance(request_id, bool)):
            return _error(None, INVALID_REQUEST, "`id` must be a string, a number or null")
        try:
            result = await self.call(item["method"], item.get("params"))
        except RpcError as exc:
            return _error(request_id, exc.code, exc.message) if "id" in item else None
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the connection
            log.error("rpc %s failed: %s", item["method"], type(exc).__name__)
            log.debug("rpc %s failure", item["method"], exc_info=True)
            return _error(request_id, CALL_FAILED, "internal error") if "id" in item else None
        if "id" not in item:
            return None
        return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _inside(folder: Path, name: str) -> str:
    """`name` (relative to `folder`, or absolute) resolved, and refused unless it stays inside `folder`.

    Checked before the file is touched, so the reply never tells whether a file elsewhere exists.
    """
    root = folder.resolve()
    try:
        target = (root / name).resolve()
    except (ValueError, OSError):  # a NUL byte, a symlink loop
        target = None
    if not name or target is None or not target.is_relative_to(root):
        raise RpcError(INVALID_PARAMS, f"`file` must be a WAV inside {root}")
    return str(target)


async def _read_wav(path: str) -> tuple[bytes, int]:
    """A WAV for the mock caller to speak, read off the event loop; mono PCM16 out."""
    import numpy as np
    import soundfile

    def read() -> tuple[bytes, int]:
        data, rate = soundfile.read(path, dtype="int16", always_2d=True)
        return np.ascontiguousarray(data[:, 0]).tobytes(), int(rate)

    try:
        return await asyncio.to_thread(read)
    except (OSError, RuntimeError) as exc:  # soundfile raises RuntimeError subclasses for bad files
        raise RpcError(INVALID_PARAMS, f"cannot read WAV {Path(path).name!r}: {type(exc).__name__}") from None


def _refuse(status: int, message: str) -> web.Response:
    response = web.json_response(_error(None, INVALID_REQUEST, message), status=status)
    response.force_close()  # the body may be unread: do not wait for it on a kept-alive connection
    return response


def _call_options(p: dict[str, Any]) -> dict[str, str | None]:
    """voicecall.initiate's optional call-control parameters."""
    return {"machine_detection": _str(p, "machineDetection", required=False),
            "dtmf_sequence": _str(p, "dtmfSequence", required=False),
            "voicemail_message": _str(p, "voicemailMessage", required=False),
            "from_number": _str(p, "from", required=False)}


def describe_error(exc: BaseException) -> tuple[int, str]:
    """(code, message) of a failure, as `_handle_one` would answer it (for a routed request)."""
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    log.error("routed rpc failed: %s", exc, exc_info=exc)
    return CALL_FAILED, "internal error"


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


class RpcEndpoint:
    """/rpc: POST for one request (or batch), GET upgrades to a WebSocket with event subscription."""

    def __init__(self, dispatcher: RpcDispatcher, token: str | None, *, max_body_bytes: int = 256 * 1024,
                 body_timeout_s: float = 10.0) -> None:
        self.dispatcher = dispatcher
        self._token = token
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        # The console's browser login (a session cookie from a same-origin page), set by bridge/console.
        self.browser_auth: Callable[[web.Request], bool] | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    async def close_all(self) -> None:
        """On shutdown: close subscribers' sockets (a console left open must not hold the server up)."""
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"Server shutdown")
                               for ws in list(self._sockets)), return_exceptions=True)

    def _authorized(self, request: web.Request) -> bool:
        if not self._token:
            return True
        if self.browser_auth is not None and self.browser_auth(request):
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.encode(), self._token.encode())

    async def post(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(_error(None, INVALID_REQUEST, "unauthorized"), status=401)
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return _refuse(413, f"request body over {self.max_body_bytes} bytes")
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await request.read()
        except TimeoutError:
            return _refuse(408, "request body not received in time")
        except web.HTTPRequestEntityTooLarge:
            return _refuse(413, f"request body over {self.max_body_bytes} bytes")
        except (ConnectionError, web.HTTPException, ValueError):
            return _refuse(400, "request body not readable")
        try:
            payload = loads(body)
        except UntrustedJsonError as exc:
            return web.json_response(_error(None, PARSE_ERROR, str(exc)), status=400)
        reply = await self.dispatcher.handle(payload)
        if reply is None:
            return web.Response(status=204)
        return web.json_response(reply)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response(_error(None, INVALID_REQUEST, "unauthorized"), status=401)
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=self.max_body_bytes)
        await ws.prepare(request)
        self._sockets.add(ws)
        send_lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()
        queue: asyncio.Queue[dict[str, Any]] | None = None
        forwarder: asyncio.Task[None] | None = None
        levels = LevelSubscriptions(self.dispatcher.manager, lambda obj: send(obj))

        async def send(obj: Any) -> None:
            async with send_lock:
                if not ws.closed:
                    await ws.send_str(json.dumps(obj))

        async def forward(q: asyncio.Queue[dict[str, Any]]) -> None:
            while True:
                event = await q.get()
                await send({"jsonrpc": "2.0", "method": "voicecall.event", "params": event})

        async def serve(item: Any) -> None:
            reply = await self.dispatcher.handle(item)
            if reply is not None:
                await send(reply)

        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    item = loads(msg.data)
                except UntrustedJsonError as exc:
                    await send(_error(None, PARSE_ERROR, str(exc)))
                    continue
                if isinstance(item, dict) and item.get("method") == "voicecall.subscribe":
                    if queue is None:
                        queue = self.dispatcher.manager.subscribe()
                        forwarder = asyncio.create_task(forward(queue))
                    if isinstance(item.get("id"), (str, int)):
                        await send({"jsonrpc": "2.0", "id": item["id"], "result": {"subscribed": True}})
                    continue
                if isinstance(item, dict) and item.get("method") == "voicecall.levels":
                    try:
                        result = levels.handle(item.get("params"))
                        reply = {"jsonrpc": "2.0", "id": item.get("id"), "result": result}
                    except ValueError as exc:
                        reply = _error(item.get("id"), INVALID_PARAMS, str(exc))
                    if "id" in item:
                        await send(reply)
                    continue
                task = asyncio.create_task(serve(item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            self._sockets.discard(ws)
            levels.close()
            if queue is not None:
                self.dispatcher.manager.unsubscribe(queue)
            for task in [*tasks, *([forwarder] if forwarder else [])]:
                task.cancel()
        return ws
