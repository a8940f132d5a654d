"""Pre-warm for the cascade: open a call's STT session (and the TTS engine's HTTP connection) while the call still rings.

The manager calls `prewarm(call)` when it places an outbound call or an inbound one rings; the
session connects then, for the wire format the configured carrier will most likely use
(`expected_wire`). When the call's CallVoice opens its STT session, `engine_for(call_id)` hands it
the warm one (if that guess was right; otherwise a fresh session opens, as without pre-warm). An unanswered call's session is
closed by `discard`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.calls import CallEvent, CallRecord
from bridge.tasks import BackgroundTasks
from media.formats import ALAW_8K, ULAW_8K, AudioEncoding, AudioFormat
from media.stt.base import SttEngine, SttEvent, SttSession

log = logging.getLogger(__name__)



def expected_wire(settings: Any) -> AudioFormat:
    """The media format a call on the configured carrier will most likely have."""
    if settings.provider == "telnyx" and settings.telnyx.streamCodec == "PCMA":
        return ALAW_8K
    if settings.provider == "sip":  # pjsua2 hands the bridge PCM at the conference clock rate
        return AudioFormat(AudioEncoding.L16, settings.sip.clockRate)
    if settings.provider == "asterisk":
        return {"alaw": ALAW_8K, "slin16": AudioFormat(AudioEncoding.L16, 16000)}.get(settings.asterisk.format, ULAW_8K)
    return ULAW_8K


class _Relay:
    """The warm session's event callback until a CallVoice adopts it (events are held till then)."""

    def __init__(self) -> None:
        self.target: Callable[[SttEvent], None] | None = None
        self.held: list[SttEvent] = []

    def __call__(self, event: SttEvent) -> None:
        if self.target is None:
            self.held.append(event)
        else:
            self.target(event)

    def adopt(self, target: Callable[[SttEvent], None]) -> None:
        self.target = target
        held, self.held = self.held, []
        for event in held:
            target(event)


class _Warm:
    def __init__(self, session: SttSession, relay: _Relay, sample_rate: int, wire: AudioFormat) -> None:
        self.session = session
        self.relay = relay
        self.sample_rate = sample_rate
        self.wire = wire


class _AdoptingEngine(SttEngine):
    """One call's view of the engine: its first `open` takes the warm session when it fits."""

    def __init__(self, engine: SttEngine, warm: _Warm | None, discard: Callable[[SttSession], None]) -> None:
        self.name = engine.name
        self._engine = engine
        self._warm = warm
        self._discard = discard

    def open(self, *, sample_rate: int, on_event: Callable[[SttEvent], None],
             wire_format: AudioFormat | None = None) -> SttSession:
        warm, self._warm = self._warm, None
        if warm is not None:
            if wire_format == warm.wire and sample_rate == warm.sample_rate:
                warm.relay.adopt(on_event)
                return warm.session
            self._discard(warm.session)
        return self._engine.open(sample_rate=sample_rate, on_event=on_event, wire_format=wire_format)


class SttPrewarm:
    def __init__(self, engine: SttEngine, pipeline_rate: int, wire: AudioFormat = ULAW_8K) -> None:
        self.engine = engine
        self.pipeline_rate = pipeline_rate
        self.wire = wire
        self._warm: dict[str, _Warm] = {}
        self._tasks = BackgroundTasks(log)

    def prewarm(self, call: CallRecord) -> None:
        if call.callId in self._warm:
            return
        relay = _Relay()
        session = self.engine.open(sample_rate=self.pipeline_rate, on_event=relay, wire_format=self.wire)
        self._warm[call.callId] = _Warm(session, relay, self.pipeline_rate, self.wire)
        self._tasks.spawn(session.start(), f"stt-prewarm-{call.callId}")

    def warm(self, call_id: str) -> SttSession | None:
        warm = self._warm.get(call_id)
        return warm.session if warm else None

    def engine_for(self, call_id: str) -> SttEngine:
        return _AdoptingEngine(self.engine, self._warm.pop(call_id, None), self._close)

    def discard(self, call_id: str) -> None:
        warm = self._warm.pop(call_id, None)
        if warm is not None:
            self._close(warm.session)

    def _close(self, session: SttSession) -> None:
        self._tasks.spawn(session.close(), "stt-prewarm-close")

    async def close(self) -> None:
        for call_id in list(self._warm):
            self.discard(call_id)
        await asyncio.gather(self._tasks.drain(), return_exceptions=True)


class PrewarmingFactory:
    """A voice factory (call, transport, emit) -> voice, plus the manager's pre-warm hooks."""

    def __init__(self, build: Callable[[CallRecord, Any, Callable[[CallEvent], None]], Any],
                 prewarm: SttPrewarm | None, close_engines: Callable[[], Awaitable[None]] | None = None,
                 warm_engines: Callable[[], None] | None = None) -> None:
        self._build = build
        self.stt = prewarm
        self._close_engines = close_engines
        self._warm_engines = warm_engines  # the shared TTS engine's connection pool

    def __call__(self, call: CallRecord, transport: Any, emit: Callable[[CallEvent], None]) -> Any:
        return self._build(call, transport, emit)

    def prewarm(self, call: CallRecord) -> None:
        if self.stt is not None:
            self.stt.prewarm(call)
        if self._warm_engines is not None:
            self._warm_engines()

    def discard(self, call_id: str) -> None:
        if self.stt is not None:
            self.stt.discard(call_id)

    async def close(self) -> None:
        if self.stt is not None:
            await self.stt.close()
        if self._close_engines is not None:
            await self._close_engines()
