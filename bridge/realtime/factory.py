"""Builds each call's RealtimeVoice from the `realtime` config, and pre-warms sessions.

Pre-warm: the manager calls `prewarm(call)` when an outbound call is placed or an inbound call
rings; the model session connects then (for the carrier's likely wire format), so
the greeting does not wait for the TLS + WebSocket + session set-up when the call is answered.
When the media leg attaches, the voice adopts that session (a different wire format only costs a
`session.update`). A call that ends unanswered closes its session (`discard`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bridge.calls import CallEvent, CallRecord
from bridge.prewarm import expected_wire
from bridge.realtime.connection import RealtimeConnection, RealtimeProtocol
from bridge.realtime.gemini import GeminiLiveOptions, GeminiLiveProtocol
from bridge.realtime.openai import OpenAiRealtimeOptions, OpenAiRealtimeProtocol
from bridge.realtime_voice import RealtimeVoice
from bridge.tasks import BackgroundTasks
from media.clock import Clock

if TYPE_CHECKING:
    from bridge.config import RealtimeSettings, Settings
    from media.recorder import CallRecorder
    from media.transport import MediaTransport
    from media.tts.base import TtsEngine

log = logging.getLogger(__name__)

END_CALL_TOOL = {"type": "function", "name": "end_call",
                 "description": "Hang up the call once you have said goodbye.",
                 "parameters": {"type": "object", "properties": {}}}


@dataclass(frozen=True, slots=True)
class ToolResult:
    output: str  # what goes back to the model
    end_call: bool = False  # hang up once the model's next words have played


class Toolbox(Protocol):
    """One call's tools, as the realtime session uses them: OpenAI function-style specs, and a run."""

    def specs(self) -> Sequence[dict[str, Any]]: ...

    async def run(self, call_id: str, name: str, arguments: str) -> ToolResult: ...


class BuiltinTools:
    """Without the conversation toolbox: `end_call`, and a clear error for declared tools."""

    def specs(self) -> Sequence[dict[str, Any]]:
        return [END_CALL_TOOL]

    async def run(self, call_id: str, name: str, arguments: str) -> ToolResult:
        if name == "end_call":
            return ToolResult(json.dumps({"ok": True, "note": "the call ends after your next words"}), end_call=True)
        return ToolResult(json.dumps({"error": f"tool {name!r} has no handler on this bridge"}))


def build_protocol(rt: RealtimeSettings, wire: Any = None, tools: list[dict[str, Any]] | None = None,
                   *, barge_in: bool = True) -> RealtimeProtocol:
    key = rt.apiKey.get_secret_value() if rt.apiKey else str((rt.providers.get(rt.provider) or {}).get("apiKey") or "")
    specs = [t.model_dump() for t in rt.tools] + list(tools or [])
    if rt.provider == "gemini":
        return GeminiLiveProtocol(GeminiLiveOptions(
            api_key=key, base_url=str(rt.effective("baseUrl")), model=str(rt.effective("model")),
            voice=str(rt.effective("voice")), instructions=rt.instructions, interrupt=barge_in), tools=specs)
    return OpenAiRealtimeProtocol(OpenAiRealtimeOptions(
        api_key=key, base_url=str(rt.effective("baseUrl")), model=str(rt.effective("model")),
        voice=str(rt.effective("voice")), instructions=rt.instructions, transcription_model=rt.transcriptionModel,
        vad_threshold=rt.vadThreshold, prefix_padding_ms=rt.prefixPaddingMs,
        silence_duration_ms=rt.silenceDurationMs, interrupt_response=barge_in), wire, tools=specs)


class ConversationTools:
    """The conversation's per-call toolbox (`bridge/conversation/tools.py`: end_call, send_dtmf,
    consult_agent, declared HTTP tools) as the realtime session's Toolbox; calls are recorded in the
    call record and events like the cascade's."""

    def __init__(self, engine: Any, manager: Any, call: CallRecord) -> None:
        self._engine = engine
        self._manager = manager
        self._call = call
        self._box = engine.toolbox(call.callId, manager)
        self._count = 0

    def specs(self) -> Sequence[dict[str, Any]]:
        return [{"type": "function", "name": s.name, "description": s.description, "parameters": s.parameters}
                for s in self._box.specs()]

    async def run(self, call_id: str, name: str, arguments: str) -> ToolResult:
        from bridge.conversation.tools import ToolCall

        self._count += 1
        tool_call = ToolCall(f"rt-{self._count}", name, arguments)
        outcome = await self._box.run(tool_call)
        self._engine.record_tool(self._call, self._manager, tool_call, outcome, len(self._call.transcript), False)
        return ToolResult(outcome.content, outcome.end_call)


class RealtimeVoices:
    def __init__(self, settings: Settings, tts: TtsEngine, *, inband_dtmf: bool, clock: Clock | None = None,
                 recorder: Callable[[CallRecord], CallRecorder | None] | None = None, monitor: Any = None) -> None:
        self.settings = settings
        self.monitor = monitor  # turn timing (bridge/monitor.py), when the runtime has one
        self.rt = settings.realtime
        self.tts = tts
        self.inband_dtmf = inband_dtmf
        self.clock = clock
        self._recorder = recorder
        self._warm: dict[str, RealtimeConnection] = {}
        self._tasks = BackgroundTasks(log)
        self.manager: Any = None
        # the call's tools (the conversation toolbox plugs in here); default: BuiltinTools
        self.toolbox_for: Callable[[CallRecord], Toolbox] = lambda call: BuiltinTools()
        self._toolboxes: dict[str, Toolbox] = {}

    def bind(self, manager: Any) -> None:
        self.manager = manager
        engine = getattr(manager, "conversation", None)
        if engine is not None:
            self.toolbox_for = lambda call: ConversationTools(engine, manager, call)

    def _toolbox(self, call: CallRecord) -> Toolbox:
        box = self._toolboxes.get(call.callId)
        if box is None:
            box = self._toolboxes[call.callId] = self.toolbox_for(call)
        return box

    def _connection(self, call: CallRecord, wire: Any) -> RealtimeConnection:
        tools = list(self._toolbox(call).specs())
        protocol = build_protocol(self.rt, wire, tools, barge_in=self.settings.streaming.bargeIn)
        return RealtimeConnection(protocol, clock=self.clock,
                                  max_retries=self.rt.maxReconnects)

    # ---- pre-warm
    def prewarm(self, call: CallRecord) -> None:
        if not self.rt.prewarm or call.callId in self._warm:
            return
        connection = self._connection(call, expected_wire(self.settings))
        connection.start()
        self._warm[call.callId] = connection

    def discard(self, call_id: str) -> None:
        self._toolboxes.pop(call_id, None)
        connection = self._warm.pop(call_id, None)
        if connection is not None:
            self._tasks.spawn(connection.close(), f"realtime-discard-{call_id}")

    def warm(self, call_id: str) -> RealtimeConnection | None:
        return self._warm.get(call_id)

    # ---- per call
    def __call__(self, call: CallRecord, transport: MediaTransport, emit: Callable[[CallEvent], None]) -> RealtimeVoice:
        connection = self._warm.pop(call.callId, None) or self._connection(call, transport.format)
        manager = self.manager
        box = self._toolbox(call)

        async def hang_up() -> None:
            if manager is not None:
                await manager.end(call.callId)

        holder: dict[str, RealtimeVoice] = {}

        async def run_tool(tool_call_id: str, name: str, arguments: str) -> str:
            result = await box.run(call.callId, name, arguments)
            if result.end_call:
                holder["voice"].end_after_reply()
            return result.output

        voice = RealtimeVoice(
            call=call, transport=transport, connection=connection, tts=self.tts, emit=emit,
            pipeline_rate=self.settings.pipelineSampleRate,
            recorder=self._recorder(call) if self._recorder else None,
            barge_in=self.settings.streaming.bargeIn, inband_dtmf=self.inband_dtmf,
            on_tool_call=run_tool, hang_up=hang_up, apology=self.rt.apology, input_chunk_ms=self.rt.inputChunkMs,
            on_milestone=self.monitor.milestone_hook(call.callId) if self.monitor is not None else None,
            on_turn_note=self.monitor.turn_note_hook(call.callId) if self.monitor is not None else None)
        holder["voice"] = voice
        return voice

    async def close(self) -> None:
        for call_id in list(self._warm):
            self.discard(call_id)
        await asyncio.gather(self._tasks.drain(), return_exceptions=True)
        await self.tts.close()
