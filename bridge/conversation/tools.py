"""In-call tools: what the model on the line may do besides talking.

Built in: `end_call` (finish the sentence, then hang up), `send_dtmf` (keys on the line),
`consult_agent` (ask the agent that placed the call). Declared in config (`agent.tools`): HTTP
tools, POSTed as JSON and signed (see `sign`). More built-ins (e.g. `transfer_call`, owned by the
call-control work) plug in through `CallToolbox.register`.

Declared tool request:
    POST <url>   Content-Type: application/json
    X-Voicecall-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>
    body: {"tool": "<name>", "callId": "<call id>", "arguments": {<the model's arguments>}}
The response body (text, at most 4000 characters) goes back to the model; a non-2xx status, a
timeout or a network error goes back as a short error text, so the model can tell the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bridge.tasks import mirror
from media.clock import Clock

if TYPE_CHECKING:  # the tool types are shared with sans-I/O code; aiohttp is loaded only to POST
    import aiohttp

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Voicecall-Signature"
MAX_RESULT_CHARS = 4000
DTMF_DIGITS = frozenset("0123456789*#ABCD")


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it (may be invalid)


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    content: str  # what goes back to the model
    end_call: bool = False
    filler: str | None = None  # spoken while the tool ran (for the record)


@dataclass(frozen=True, slots=True)
class HttpToolConfig:
    name: str
    description: str
    parameters: dict[str, Any]
    url: str
    timeout_ms: int
    secret: str | None
    filler: str | None


class ToolHost(Protocol):
    """What the tools need of the call's owner (the CallManager)."""

    async def send_dtmf(self, call_id: str, digits: str) -> None: ...

    async def consult(self, call_id: str, question: str) -> str: ...

    def say_filler(self, call_id: str, text: str) -> Awaitable[None]: ...


Handler = Callable[[str, dict[str, Any]], Awaitable[ToolOutcome]]  # (call id, arguments) -> outcome

END_CALL = ToolSpec("end_call", "Hang up the call. Say goodbye first, in the same reply; the call ends once "
                    "your words have been heard.", {"type": "object", "properties": {}})
SEND_DTMF = ToolSpec("send_dtmf", "Press telephone keys on the line, e.g. to navigate a phone menu.",
                     {"type": "object", "properties": {"digits": {
                         "type": "string", "description": "Keys to press: 0-9, *, #, A-D."}},
                      "required": ["digits"]})
CONSULT = ToolSpec("consult_agent", "Ask the agent you work for a question you cannot answer yourself; "
                   "the answer comes back as the result.",
                   {"type": "object", "properties": {"question": {"type": "string"}}, "required": ["question"]})


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Voicecall-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, *, now: float, tolerance_s: float = 300) -> bool:
    """What a receiver does: recompute, compare in constant time, refuse stale timestamps."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, ts), f"t={ts},v1={parts.get('v1', '')}")


def parse_arguments(raw: str) -> dict[str, Any] | None:
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class ToolSettings:
    """Per deployment: the declared HTTP tools and the texts and limits of the built-ins."""

    http_tools: Sequence[HttpToolConfig] = ()
    consult_enabled: bool = True
    consult_filler: str | None = "Let me check on that."
    tool_filler: str | None = "One moment."
    session: aiohttp.ClientSession | None = None  # shared by all calls; opened lazily


class CallToolbox:
    """One call's tools: specs for the model, and `run` for each call the model makes."""

    def __init__(self, call_id: str, host: ToolHost, settings: ToolSettings, *, clock: Clock,
                 session_factory: Callable[[], aiohttp.ClientSession] | None = None) -> None:
        self.call_id = call_id
        self._host = host
        self._settings = settings
        self._clock = clock
        self._session_factory = session_factory
        self._handlers: dict[str, tuple[ToolSpec, Handler]] = {}
        self._after_speech: set[str] = set()
        self.register(END_CALL, self._end_call)
        self.register(SEND_DTMF, self._send_dtmf)
        if settings.consult_enabled:
            self.register(CONSULT, self._consult)
        for tool in settings.http_tools:
            self.register(ToolSpec(tool.name, tool.description, tool.parameters), self._http_handler(tool))

    def register(self, spec: ToolSpec, handler: Handler, *, after_speech: bool = False) -> None:
        """Add (or replace) a tool: the extension point for built-ins owned elsewhere (transfer_call).
        `after_speech`: run only once the words said with the call were heard in full (never after an
        interrupted reply)."""
        self._handlers[spec.name] = (spec, handler)
        if after_speech:
            self._after_speech.add(spec.name)
        else:
            self._after_speech.discard(spec.name)

    def after_speech(self, name: str) -> bool:
        return name in self._after_speech

    def specs(self) -> list[ToolSpec]:
        return [spec for spec, _ in self._handlers.values()]

    async def run(self, call: ToolCall) -> ToolOutcome:
        entry = self._handlers.get(call.name)
        if entry is None:
            return ToolOutcome(f"error: there is no tool named {call.name!r}")
        args = parse_arguments(call.arguments)
        if args is None:
            return ToolOutcome("error: the arguments are not a JSON object")
        try:
            return await entry[1](self.call_id, args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing tool must not end the call
            log.warning("call %s: tool %s failed: %s", self.call_id, call.name, type(exc).__name__)
            return ToolOutcome(f"error: the tool failed ({type(exc).__name__})")

    # ------------------------------------------------------------------ built-ins

    async def _end_call(self, call_id: str, args: dict[str, Any]) -> ToolOutcome:
        return ToolOutcome("The call will end after your last words.", end_call=True)

    async def _send_dtmf(self, call_id: str, args: dict[str, Any]) -> ToolOutcome:
        digits = str(args.get("digits") or "").replace(" ", "")
        if not digits or not set(digits) <= DTMF_DIGITS:
            return ToolOutcome("error: `digits` may contain only 0-9, *, #, A-D")
        await self._host.send_dtmf(call_id, digits)
        return ToolOutcome(f"Pressed {digits}.")

    async def _consult(self, call_id: str, args: dict[str, Any]) -> ToolOutcome:
        question = str(args.get("question") or "").strip()
        if not question:
            return ToolOutcome("error: `question` is required")
        filler = self._settings.consult_filler
        answer = await self._with_filler(filler, self._host.consult(call_id, question))
        return ToolOutcome(answer, filler=filler)

    async def _with_filler(self, filler: str | None, work: Awaitable[str]) -> str:
        """Run `work`; meanwhile speak `filler` (the filler never delays the result)."""
        if not filler:
            return await work
        spoken = asyncio.ensure_future(self._host.say_filler(self.call_id, filler))
        try:
            return await work
        finally:
            await spoken  # the caller hears the whole filler before the answer is spoken

    # ------------------------------------------------------------------ declared HTTP tools

    def _http_handler(self, tool: HttpToolConfig) -> Handler:
        async def handler(call_id: str, args: dict[str, Any]) -> ToolOutcome:
            filler = tool.filler if tool.filler is not None else self._settings.tool_filler
            content = await self._with_filler(filler, self._post(tool, call_id, args))
            return ToolOutcome(content, filler=filler)

        return handler

    async def _post(self, tool: HttpToolConfig, call_id: str, args: dict[str, Any]) -> str:
        import aiohttp

        body = json.dumps({"tool": tool.name, "callId": call_id, "arguments": args}, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if tool.secret:
            headers[SIGNATURE_HEADER] = sign(tool.secret, body, int(time.time()))
        session = self._session()

        async def post() -> str:
            async with session.post(tool.url, data=body, headers=headers) as resp:
                text = (await resp.text(errors="replace"))[:MAX_RESULT_CHARS]
                if resp.status >= 300:
                    return f"error: the tool answered HTTP {resp.status}"
                return text

        try:
            return await self._clock.wait_for(mirror(asyncio.ensure_future(post())), tool.timeout_ms / 1000)
        except TimeoutError:  # the request was cancelled with the timed-out future
            log.info("call %s: tool %s timed out after %d ms", call_id, tool.name, tool.timeout_ms)
            return f"error: the tool did not answer within {tool.timeout_ms} ms"
        except aiohttp.ClientError as exc:
            return f"error: the tool could not be reached ({type(exc).__name__})"

    async def close(self) -> None:
        if self._settings.session is not None:
            await self._settings.session.close()
            self._settings.session = None

    def _session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._settings.session is None or self._settings.session.closed:
            self._settings.session = (self._session_factory or aiohttp.ClientSession)()
        return self._settings.session
