"""Per-number agents (`numbers:`): each of our numbers answers as its own agent.

A call's agent number is ours: the dialled number of an inbound call, the `from` of an outbound one
(`agent_number`). `Settings.for_number` gives that agent's settings (greeting, inbound policy,
model, prompt, TTS, realtime, tools); the two objects here build one voice factory and one
conversation engine per agent from them, and route each call to its own, so the manager keeps
one of each and never looks at numbers itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from bridge.calls import CallEvent, CallRecord, Direction
from bridge.config import Settings, match_number

if TYPE_CHECKING:
    from bridge.conversation.chat import ChatModel
    from bridge.conversation.engine import ConversationEngine, TurnHost
    from media.transport import MediaTransport


def agent_number(call: CallRecord) -> str:
    """Which of our numbers the call is on."""
    return call.to if call.direction == Direction.INBOUND else call.from_


class Conversation(Protocol):
    """What the manager uses of a conversation engine (one, or one per number)."""

    @property
    def model(self) -> ChatModel: ...

    async def respond(self, call: CallRecord, host: TurnHost) -> None: ...

    async def failed(self, call: CallRecord, host: TurnHost, error: str) -> None: ...

    def forget(self, call_id: str) -> None: ...

    async def close(self) -> None: ...


class _ByNumber:
    """One thing per agent, built from its settings; the top level's for calls on other numbers."""

    def __init__(self, settings: Settings, build: Callable[[Settings], Any]) -> None:
        self.default = build(settings)
        self.by_key: dict[str, Any] = {key: build(settings.for_number(key)) for key in settings.number_keys()}

    def for_call(self, call: CallRecord) -> Any:
        key = match_number(self.by_key, agent_number(call))
        return self.by_key[key] if key is not None else self.default

    def all(self) -> list[Any]:
        return [self.default, *self.by_key.values()]


class AgentVoices(_ByNumber):
    """A VoiceFactory that builds each call's voice with its agent's TTS / STT / realtime settings."""

    def __call__(self, call: CallRecord, transport: MediaTransport, emit: Callable[[CallEvent], None]) -> Any:
        return self.for_call(call)(call, transport, emit)

    def prewarm(self, call: CallRecord) -> None:
        prewarm = getattr(self.for_call(call), "prewarm", None)
        if prewarm is not None:
            prewarm(call)

    def discard(self, call_id: str) -> None:
        for factory in self.all():
            discard = getattr(factory, "discard", None)
            if discard is not None:
                discard(call_id)

    def bind(self, manager: Any) -> None:
        for factory in self.all():
            bind = getattr(factory, "bind", None)
            if bind is not None:
                bind(manager)

    async def close(self) -> None:
        for factory in self.all():
            close = getattr(factory, "close", None)
            if close is not None:
                await close()


class AgentConversations(_ByNumber):
    """The conversation engine of each call's agent (model, system prompt, tools)."""

    @property
    def model(self) -> ChatModel:
        """The top level's model (a transfer's briefing is written with it)."""
        engine: ConversationEngine = self.default
        return engine.model

    async def respond(self, call: CallRecord, host: TurnHost) -> None:
        engine: ConversationEngine = self.for_call(call)
        await engine.respond(call, host)

    async def failed(self, call: CallRecord, host: TurnHost, error: str) -> None:
        engine: ConversationEngine = self.for_call(call)
        await engine.failed(call, host, error)

    def forget(self, call_id: str) -> None:
        for engine in self.all():
            engine.forget(call_id)

    def prewarm(self, call: CallRecord) -> None:
        engine: ConversationEngine = self.for_call(call)
        engine.prewarm(call)

    async def close(self) -> None:
        for engine in self.all():
            await engine.close()
