"""A small CarrierHost and MediaPipeline test double: records events and frames, plays PCM paced."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from bridge.calls import CallEvent, CallRecord, CallState, Direction, EventType
from media.clock import RealClock

FRAME_S = 0.02


@dataclass
class RecordingBridge:
    """Stands in for media.pipeline.MediaPipeline: collects received frames, plays PCM in 20 ms frames."""

    transport: Any
    frames: list[bytes] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)

    def receive(self, payload: bytes, sequence: int | None = None) -> None:
        self.frames.append(payload)
        self.frame_times.append(time.monotonic())

    @property
    def pcm(self) -> bytes:
        return b"".join(self.frames)

    async def play(self, pcm: bytes) -> None:
        """Paced like the real bridge: one frame per 20 ms against a monotonic schedule."""
        size = self.transport.format.frame_bytes
        start = time.monotonic()
        for i, off in enumerate(range(0, len(pcm), size)):
            frame = pcm[off : off + size].ljust(size, b"\x00")
            self.sent.append(frame)
            await self.transport.send_media(frame)
            delay = start + (i + 1) * FRAME_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


class TestHost:
    """CarrierHost for carrier tests. `policy` decides inbound calls: "answer", "reject" or "none"."""

    __test__ = False

    def __init__(self, sip_settings: Any = None, policy: str = "answer") -> None:
        self.settings = SimpleNamespace(sip=sip_settings)
        self.clock = RealClock()
        self.policy = policy
        self.carrier: Any = None
        self.events: list[CallEvent] = []
        self.bridges: dict[str, RecordingBridge] = {}
        self.calls: dict[str, CallRecord] = {}
        self.by_pid: dict[str, CallRecord] = {}
        self.detached: list[str] = []
        self.attached_at: dict[str, float] = {}
        self.on_attach: Any = None  # optional callable(RecordingBridge), e.g. to start playing
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def webhook_url(self, **query: str) -> str:
        return "http://127.0.0.1/unused"

    def stream_url(self) -> str:
        return "ws://127.0.0.1/unused"

    def stream_token(self, call_id: str) -> str:
        return "unused"

    def emit(self, event: CallEvent) -> None:
        self.events.append(event)
        self._changed.set()
        if event.type is EventType.INITIATED and event.direction is Direction.INBOUND:
            record = CallRecord(
                callId=uuid.uuid4().hex,
                provider="sip",
                direction=Direction.INBOUND,
                state=CallState.RINGING,
                from_=event.from_number or "",
                to=event.to_number or "",
                startedAt=time.time(),
                providerCallId=event.provider_call_id,
            )
            self.calls[record.callId] = record
            assert event.provider_call_id
            self.by_pid[event.provider_call_id] = record
            if self.policy == "answer":
                self._spawn(self.carrier.answer_call(record))
            elif self.policy == "reject":
                self._spawn(self.carrier.reject_call(record))

    def spawn(self, coro: Any) -> None:
        self._spawn(coro)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def attach_media(self, call_id: str, transport: Any) -> RecordingBridge:
        bridge = RecordingBridge(transport)
        self.bridges[call_id] = bridge
        self.attached_at[call_id] = time.monotonic()
        if self.on_attach is not None:
            self.on_attach(bridge)
        return bridge

    def detach_media(self, call_id: str) -> None:
        self.detached.append(call_id)

    def get_call(self, call_id: str) -> CallRecord | None:
        return self.calls.get(call_id)

    def outbound_record(self, to: str) -> CallRecord:
        record = CallRecord(
            callId=uuid.uuid4().hex,
            provider="sip",
            direction=Direction.OUTBOUND,
            state=CallState.INITIATED,
            from_="sip:bridge@127.0.0.1",
            to=to,
            startedAt=time.time(),
        )
        self.calls[record.callId] = record
        return record

    def of_type(self, etype: EventType, pid: str | None = None) -> list[CallEvent]:
        return [e for e in self.events if e.type is etype and (pid is None or e.provider_call_id == pid)]

    async def wait_for(
        self, etype: EventType, pid: str | None = None, count: int = 1, timeout: float = 10
    ) -> list[CallEvent]:
        async def seek() -> list[CallEvent]:
            while True:
                found = self.of_type(etype, pid)
                if len(found) >= count:
                    return found
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(seek(), timeout)
