"""The pacing wheel (media/wheel.py): one timer sends every call's due messages, on each call's own
Pacer schedule; producers wait only for room in their outbox; waiting sends, failing sends, barge-in
and close with messages queued. Deterministic: every pipeline runs on one FakeClock moved by `drive`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from media import g711
from media.clock import FakeClock
from media.formats import ULAW_8K
from media.pipeline import QUEUE_SLACK, MediaPipeline
from media.wheel import GRAIN_S, PacingWheel, shared_wheel
from tests.harness import run_bridge, wait_for
from tests.test_hardening_streams import TWILIO, start_frame
from tests.test_media_pipeline import Clip, Listener, LoopbackCarrier, drive, make, settle
from tests.test_stream_inline import server_socket
from tests.test_stream_limits import inbound_call, stream_url

DT = 0.02


async def wire_chunks(frames: int, asked: list[float], clock: FakeClock, *, fill: int = 0) -> AsyncIterator[bytes]:
    """`frames` 20 ms chunks of 8 kHz PCM (the wire rate: one chunk, one message), noting when each is asked for."""
    for k in range(frames):
        asked.append(clock.monotonic())
        yield chunk(fill + k)


def chunk(k: int) -> bytes:
    """20 ms at 8 kHz of one sample value, a different one for each k < 60."""
    return int(500 * (k % 60 + 1)).to_bytes(2, "little", signed=True) * 160


def schedule_gaps(carrier: LoopbackCarrier, lead: int = 3) -> tuple[float, float]:
    """(most ahead of, most behind) each message's pacing slot: sent[0] + max(0, n - (lead - 1)) x 20 ms."""
    sent = np.array([f.sent for f in carrier.frames])
    slots = sent[0] + np.maximum(0, np.arange(len(sent)) - (lead - 1)) * DT
    return float((slots - sent).max()), float((sent - slots).max())


async def test_many_calls_share_one_timer_and_each_keeps_its_schedule() -> None:
    clock = FakeClock()
    calls = [make(clock=clock) for _ in range(40)]
    seconds = 1.0

    async def later(bridge: MediaPipeline, offset: float) -> object:
        await clock.sleep(offset)
        return await bridge.play(Clip.tone(seconds), 16000)

    # starts spread over half a frame: 40 calls at 0.25 ms steps, four due in each millisecond
    results = await drive(clock, asyncio.gather(*(later(b, k * 0.00025) for k, (b, _, _) in enumerate(calls))))
    messages = sum(r.frames_sent for r in results)  # type: ignore[attr-defined]
    fired = shared_wheel(clock).fired
    print(f"\n40 calls: {messages} messages sent by {fired} timer callbacks")
    assert messages == 40 * 50
    assert all(r.completed and r.heard_ms == 1000 for r in results)  # type: ignore[attr-defined]
    for _, carrier, _ in calls:
        ahead, behind = schedule_gaps(carrier)
        assert ahead <= 1e-9  # never before its slot
        assert behind < GRAIN_S + 1e-9  # at most one grain after it
        assert max(carrier.buffered_at(f.sent + 1e-9) for f in carrier.frames) <= 3
    # a callback per grain with something due, not one per message: 10 per 20 ms here
    assert fired <= seconds / DT * 10 + 25
    assert fired * 3 < messages


async def test_the_engine_is_asked_in_bursts_and_never_far_ahead() -> None:
    """The producer queues up to lead + QUEUE_SLACK messages and waits until the queue is down to
    the lead: it is woken once per QUEUE_SLACK messages, not per message."""
    bridge, carrier, _ = make(vad_barge_in=False)
    clock = carrier.clock
    asked: list[float] = []
    result = await drive(clock, bridge.play(wire_chunks(100, asked, clock), 8000))
    assert result.completed and result.frames_sent == 100
    wake_ups = len(set(asked))
    print(f"\n100 messages: the engine was asked at {wake_ups} distinct times")
    assert wake_ups <= 100 // QUEUE_SLACK + 3
    sent = [f.sent for f in carrier.frames]
    for n, t in enumerate(asked):
        already_sent = sum(1 for s in sent if s <= t)
        assert n - already_sent <= 3 + QUEUE_SLACK  # never more than lead + slack queued here
    ahead, behind = schedule_gaps(carrier)
    assert ahead <= 1e-9 and behind <= 1e-9  # 20 ms slots on a whole-ms clock: exactly on time


@dataclass
class WaitingCarrier(LoopbackCarrier):
    """Every third media write waits (a full socket buffer); counts overlapping sends."""

    writes: int = 0
    in_flight: int = 0
    overlaps: int = 0
    fail_at: int | None = None

    async def send_media(self, payload: bytes) -> None:
        self.writes += 1
        if self.fail_at is not None and self.writes == self.fail_at:
            raise ConnectionResetError("peer gone")
        self.in_flight += 1
        self.overlaps += self.in_flight > 1
        try:
            if self.writes % 3 == 0:
                await self.clock.sleep(0.004)
            await super().send_media(payload)
        finally:
            self.in_flight -= 1


def waiting_call(**kw: object) -> tuple[MediaPipeline, WaitingCarrier]:
    clock = FakeClock()
    carrier = WaitingCarrier(clock=clock)
    bridge = MediaPipeline(carrier, Listener(clock), clock=clock, vad_barge_in=False, **kw)  # type: ignore[arg-type]
    carrier.bridge = bridge
    return bridge, carrier


async def test_a_send_that_waits_is_carried_on_and_the_next_waits_for_it() -> None:
    bridge, carrier = waiting_call()
    asked: list[float] = []
    result = await drive(carrier.clock, bridge.play(wire_chunks(30, asked, carrier.clock), 8000))
    assert result.completed and result.frames_sent == 30 == len(carrier.frames)
    assert carrier.overlaps == 0
    assert [f.payload for f in carrier.frames] == [g711.encode(chunk(k), ULAW_8K.encoding) for k in range(30)]  # in order
    ahead, _ = schedule_gaps(carrier)
    assert ahead <= 1e-9
    await bridge.close()


async def test_barge_in_during_a_waiting_send_stops_it_and_sends_nothing_after() -> None:
    bridge, carrier = waiting_call()
    clock = carrier.clock
    task = asyncio.create_task(bridge.play(wire_chunks(200, [], clock), 8000))
    await drive(clock, wait_until(lambda: carrier.in_flight == 1, clock))
    writes, t = carrier.writes, clock.monotonic()
    bridge.interrupt()
    result = await drive(clock, task)
    await drive(clock, clock.sleep(0.5))
    assert result.interrupted and carrier.writes == writes
    assert [f for f in carrier.frames if f.sent > t] == []
    assert carrier.cleared[0][0] == t
    await bridge.close()


async def wait_until(cond: object, clock: FakeClock) -> None:
    while not cond():  # type: ignore[operator]
        await clock.sleep(0.001)


async def test_a_failing_send_ends_the_play_with_its_error_and_the_call_plays_on() -> None:
    bridge, carrier = waiting_call()
    carrier.fail_at = 5
    with pytest.raises(ConnectionResetError):
        await drive(carrier.clock, bridge.play(wire_chunks(50, [], carrier.clock), 8000))
    assert len(carrier.frames) == 4 and not bridge.playing
    carrier.fail_at = None
    result = await drive(carrier.clock, bridge.play(wire_chunks(10, [], carrier.clock), 8000))
    assert result.completed and result.frames_sent == 10
    await bridge.close()


async def test_close_with_messages_queued_sends_none_of_them_and_leaves_no_timer() -> None:
    bridge, carrier, _ = make(vad_barge_in=False)
    clock = carrier.clock
    task = asyncio.create_task(bridge.play(wire_chunks(100, [], clock), 8000))
    await drive(clock, clock.sleep(0.1))
    outbox = bridge._current.outbox  # type: ignore[union-attr]  # noqa: SLF001
    assert outbox is not None and outbox.queued > 0
    sent, t = len(carrier.frames), clock.monotonic()
    await bridge.close()
    result = await task
    assert result.interrupted and result.frames_sent == sent
    assert result.heard_ms == pytest.approx((t - carrier.frames[0].start) * 1000, abs=1e-6)
    await settle()
    assert clock.next_at is None  # the wheel forgot the call's slot
    assert len(carrier.frames) == sent


def test_the_wheel_rounds_due_times_up_to_its_grain_and_never_early() -> None:
    clock = FakeClock()
    wheel = PacingWheel(clock, grain_s=0.001)
    calls: list[tuple[str, float, float]] = []

    class Box:
        def __init__(self, name: str) -> None:
            self.name = name

        def on_due(self, slot: float, now: float) -> None:
            calls.append((self.name, slot, now))

    for name, due in (("a", 0.0201), ("b", 0.0207), ("c", 0.021), ("d", 0.0212)):
        wheel.schedule(Box(name), due)  # type: ignore[arg-type]
    clock._fire_until(1.0)  # noqa: SLF001
    assert [(n, round(s, 6)) for n, s, _ in calls] == [("a", 0.021), ("b", 0.021), ("c", 0.021), ("d", 0.022)]
    assert all(now >= slot for _, slot, now in calls)
    assert wheel.fired == 2


async def test_a_real_stream_sends_its_media_without_a_coroutine_per_message(tmp_path: Path) -> None:
    """Over a real Twilio stream: the wheel writes each media message with the socket's synchronous
    write (bridge/ws_inline.py send_str_now); the client gets them all, in order, then the mark."""
    async with run_bridge(TWILIO, tmp_path) as runtime, aiohttp.ClientSession() as s:
        call, token = inbound_call(runtime, "CA1")
        ws = await s.ws_connect(stream_url(runtime))
        await ws.send_str(start_frame("CA1", token))
        await wait_for(lambda: runtime.manager.voice(call.callId))
        bridge = runtime.manager.voice(call.callId).bridge
        before = server_socket(runtime).sent_now
        pcm = b"".join(bytes([k, 0]) * 160 for k in range(25))  # 500 ms at 8 kHz, byte k in frame k
        play = asyncio.create_task(bridge.play(_once(pcm), 8000, label="hello"))
        got: list[dict[str, object]] = []
        while not got or got[-1]["event"] != "mark":
            msg = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)
            if msg["event"] in ("media", "mark"):
                got.append(msg)
        await ws.send_str(json.dumps({"event": "mark", "streamSid": got[-1]["streamSid"], "mark": got[-1]["mark"]}))
        result = await asyncio.wait_for(play, 5)
        media = [base64.b64decode(m["media"]["payload"]) for m in got[:-1]]  # type: ignore[index]
        assert result.completed and result.frames_sent == len(media)
        assert server_socket(runtime).sent_now - before == len(media)  # every one written synchronously
        assert sum(len(m) for m in media) == 25 * 160
        await ws.close()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
