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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bridge.calls import CallEvent, CallRecord
from bridge.clock import Clock
from bridge.prewarm import expected_wire
from bridge.realtime.connection import RealtimeConnection, RealtimeProtocol
from bridge.realtime.gemini import GeminiLiveOptions, GeminiLiveProtocol
from bridge.realtime.openai import OpenAiRealtimeOptions, OpenAiRealtimeProtocol
from bridge.realtime_voice import RealtimeVoice, ToolRunner
from bridge.tasks import BackgroundTasks

if TYPE_CHECKING:
    from bridge.config import RealtimeSettings, Settings
    from media.recorder import CallRecorder
    from media.transport import MediaTransport
    from media.tts.base import TtsEngine

log = logging.getLogger(__name__)

END_CALL_TOOL = {"type": "function", "name": "end_call",
                 "description": "Hang up the call once you have said goodbye.",
                 "parameters": {"type": "object", "properties": {}}}


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


class RealtimeVoices:
    def __init__(self, settings: Settings, tts: TtsEngine, *, inband_dtmf: bool, clock: Clock | None = None,
                 recorder: Callable[[CallRecord], CallRecorder | None] | None = None) -> None:
        self.settings = settings
        self.rt = settings.realtime
        self.tts = tts
        self.inband_dtmf = inband_dtmf
        self.clock = clock
        self._recorder = recorder
        self._warm: dict[str, RealtimeConnection] = {}
        self._tasks = BackgroundTasks(log)
        self.manager: Any = None
        # conv's toolbox plugs in here: (call) -> (extra tool specs, runner)
        self.toolbox: Callable[[CallRecord, RealtimeVoice], tuple[list[dict[str, Any]], ToolRunner]] | None = None

    def bind(self, manager: Any) -> None:
        self.manager = manager

    def _connection(self, wire: Any) -> RealtimeConnection:
        protocol = build_protocol(self.rt, wire, [END_CALL_TOOL], barge_in=self.settings.streaming.bargeIn)
        return RealtimeConnection(protocol, clock=self.clock,
                                  max_retries=self.rt.maxReconnects)

    # ---- pre-warm
    def prewarm(self, call: CallRecord) -> None:
        if not self.rt.prewarm or call.callId in self._warm:
            return
        connection = self._connection(expected_wire(self.settings))
        connection.start()
        self._warm[call.callId] = connection

    def discard(self, call_id: str) -> None:
        connection = self._warm.pop(call_id, None)
        if connection is not None:
            self._tasks.spawn(connection.close(), f"realtime-discard-{call_id}")

    def warm(self, call_id: str) -> RealtimeConnection | None:
        return self._warm.get(call_id)

    # ---- per call
    def __call__(self, call: CallRecord, transport: MediaTransport, emit: Callable[[CallEvent], None]) -> RealtimeVoice:
        connection = self._warm.pop(call.callId, None) or self._connection(transport.format)
        manager = self.manager

        async def hang_up() -> None:
            if manager is not None:
                await manager.end(call.callId)

        holder: dict[str, RealtimeVoice] = {}

        async def run_tool(tool_call_id: str, name: str, arguments: str) -> str:
            if name == "end_call":
                holder["voice"].end_after_reply()
                return json.dumps({"ok": True, "note": "the call ends after your next words"})
            return json.dumps({"error": f"tool {name!r} has no handler on this bridge"})

        voice = RealtimeVoice(
            call=call, transport=transport, connection=connection, tts=self.tts, emit=emit,
            pipeline_rate=self.settings.pipelineSampleRate,
            recorder=self._recorder(call) if self._recorder else None,
            barge_in=self.settings.streaming.bargeIn, inband_dtmf=self.inband_dtmf,
            on_tool_call=run_tool, hang_up=hang_up, apology=self.rt.apology)
        holder["voice"] = voice
        return voice

    async def close(self) -> None:
        for call_id in list(self._warm):
            self.discard(call_id)
        await asyncio.gather(self._tasks.drain(), return_exceptions=True)
