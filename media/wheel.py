"""One pacing timer for every outbound stream, and the per-play queue it sends from.

Pacing each message with its own sleep costs a timer, a future and a task wake-up per message per
stream. Here a play's producer pushes its encoded messages into a `PacedOutbox` and goes on
producing; the outbox sends each message the moment its `Pacer` allows (at once when it is due, or
from the `PacingWheel`'s single timer, which sends every stream's due messages in one callback). The
producer waits only when its outbox holds `high` messages, and is woken once it is down to `low`,
so in steady state no task wakes per message.

The schedule is the Pacer's, unchanged (absolute from t0, `lead`, re-based after an underrun); the
wheel only rounds a due time UP to its grain (1 ms), so streams due within the same millisecond
share one timer callback and no message goes early. A send uses the transport's synchronous
`send_media_now` when it has one and it need not wait; otherwise the `send_media` coroutine runs
eagerly: if it finishes without waiting, inside the callback; if it waits, a task carries it on and
the outbox sends nothing else until it is done.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import heapq
import itertools
import math
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, cast

from media.clock import Clock, RealClock, TimerHandle
from media.frames import Pacer

GRAIN_S = 0.001


class PacingWheel:
    """Due times of many outboxes, served by one timer on `clock` (rounded up to `grain_s`)."""

    def __init__(self, clock: Clock, *, grain_s: float = GRAIN_S) -> None:
        self._clock = clock
        self._grain = grain_s
        self._heap: list[tuple[float, int, PacedOutbox]] = []
        self._seq = itertools.count()
        self._timer: TimerHandle | None = None
        self._timer_at = math.inf
        self._firing = False
        self.fired = 0  # timer callbacks so far (each sends every message due by then)

    def schedule(self, outbox: PacedOutbox, due: float) -> float:
        """Call `outbox.on_due` at `due` or within one grain after it; returns the slot's time."""
        if self._grain > 0:
            due = math.ceil(due / self._grain - 1e-6) * self._grain
        heapq.heappush(self._heap, (due, next(self._seq), outbox))
        if not self._firing and due < self._timer_at:
            self._arm(due)
        return due

    def cancel(self, outbox: PacedOutbox) -> None:
        """Forget `outbox`'s slots (it stopped): no timer fires for them."""
        kept = [entry for entry in self._heap if entry[2] is not outbox]
        if len(kept) == len(self._heap):
            return
        heapq.heapify(kept)
        self._heap = kept
        if self._firing:
            return
        if not kept:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        elif kept[0][0] > self._timer_at:
            self._arm(kept[0][0])

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._clock.call_later(at - self._clock.monotonic(), self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.fired += 1
        now = self._clock.monotonic()
        self._firing = True
        try:
            while self._heap and self._heap[0][0] <= now + 1e-9:
                slot, _, outbox = heapq.heappop(self._heap)
                outbox.on_due(slot, now)
        finally:
            self._firing = False
            if self._heap:
                self._arm(self._heap[0][0])


# Real time: one wheel per event loop. Other clocks (a test's FakeClock): one per clock, which the
# wheel holds weakly, so a finished test's clock and wheel are freed together.
_real_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PacingWheel] = weakref.WeakKeyDictionary()
_clock_wheels: weakref.WeakKeyDictionary[Clock, PacingWheel] = weakref.WeakKeyDictionary()


def shared_wheel(clock: Clock) -> PacingWheel:
    """The wheel every pipeline on this clock shares (real time: one per event loop)."""
    if isinstance(clock, RealClock):
        loop = asyncio.get_running_loop()
        wheel = _real_wheels.get(loop)
        if wheel is None:
            wheel = _real_wheels[loop] = PacingWheel(RealClock())
        return wheel
    try:
        wheel = _clock_wheels.get(clock)
        if wheel is None:
            wheel = _clock_wheels[clock] = PacingWheel(cast(Clock, weakref.proxy(clock)))
    except TypeError:  # a clock that takes no weak reference: a wheel of its own for this pipeline
        wheel = PacingWheel(clock)
    return wheel


class PacedOutbox:
    """One play's messages waiting for their turn; sends them through `send` as the Pacer allows.

    `on_sent(message)` runs after each send completes (the caller's accounting). A failed send
    stops the outbox; the producer gets the exception from `put`, `room` or `drained`.
    """

    def __init__(self, pacer: Pacer, wheel: PacingWheel, clock: Clock,
                 send: Callable[[bytes], Coroutine[Any, Any, None]], on_sent: Callable[[bytes], None],
                 *, high: int, low: int, send_now: Callable[[bytes], bool] | None = None) -> None:
        self._pacer = pacer
        self._wheel = wheel
        self._clock = clock
        self._send = send
        self._send_now = send_now  # the transport's synchronous send, when it has one
        self._on_sent = on_sent
        self._high, self._low = high, low
        self._queue: deque[bytes] = deque()
        self._slot: float | None = None  # the wheel slot this outbox waits for
        self._in_flight: asyncio.Task[None] | None = None  # a send that had to wait
        self._waiter: asyncio.Future[None] | None = None  # the producer, waiting for room or the end
        self._waiting_for_end = False
        self._context = contextvars.copy_context()  # the play's (its call's log context)
        self.error: BaseException | None = None
        self.stopped = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    def put(self, message: bytes) -> bool:
        """Queue a message (it goes at once if it is due); True when the producer should `await room()`."""
        self._raise_error()
        if self.stopped:
            return False
        self._queue.append(message)
        if self._slot is None and self._in_flight is None and len(self._queue) == 1:
            self._pump(self._clock.monotonic())
        return len(self._queue) >= self._high

    async def room(self) -> None:
        """Wait until the queue is down to `low` messages (or the outbox stopped)."""
        if len(self._queue) > self._low and not self.stopped and self.error is None:
            await self._wait(end=False)
        self._raise_error()

    async def drained(self) -> None:
        """Wait until every queued message was sent (or the outbox stopped)."""
        if (self._queue or self._in_flight is not None) and not self.stopped and self.error is None:
            await self._wait(end=True)
        self._raise_error()

    def stop(self) -> None:
        """Drop what is queued at once; nothing is sent after this returns."""
        self.stopped = True
        self._queue.clear()
        if self._slot is not None:
            self._slot = None
            self._wheel.cancel(self)
        if self._in_flight is not None:
            self._in_flight.cancel()
        self._wake()

    async def _wait(self, *, end: bool) -> None:
        self._waiting_for_end = end
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def on_due(self, slot: float, now: float) -> None:
        """The wheel's call at `slot` (ignored unless it is the slot this outbox waits for)."""
        if self._slot != slot:
            return
        self._slot = None
        self._context.run(self._pump, now, True)

    def _pump(self, now: float, due: bool = False) -> None:
        """Send what may go at `now`; schedule the next one. `due`: the first queued message's
        turn has come (the wheel's call), so it goes without asking the pacer again."""
        queue, pacer = self._queue, self._pacer
        while queue and not self.stopped and self._in_flight is None:
            if not due:
                turn = pacer.turn(now)
                if turn > now:
                    self._slot = self._wheel.schedule(self, turn)
                    break
            due = False
            message = queue.popleft()
            try:
                send_now = self._send_now
                pending = None if send_now is not None and send_now(message) else _start(self._send(message))
                if pending is None:
                    self._on_sent(message)
            except Exception as exc:  # noqa: BLE001 - handed to the producer, which raises it
                self._fail(exc)
                return
            if pending is not None:
                self._in_flight = pending
                pending.add_done_callback(functools.partial(self._finished, message), context=self._context)
                break
        self._after_send()

    def _finished(self, message: bytes, task: asyncio.Task[None]) -> None:
        self._in_flight = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            try:
                self._on_sent(message)
            except Exception as error:  # noqa: BLE001 - handed to the producer, which raises it
                exc = error
        if exc is not None:
            self._fail(exc)
            return
        self._pump(self._clock.monotonic())

    def _after_send(self) -> None:
        if self._waiter is None:
            return
        left = len(self._queue) + (self._in_flight is not None)
        if left == 0 or (not self._waiting_for_end and left <= self._low) or self.stopped:
            self._wake()

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.stop()


def _start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` now; None if it finished without waiting (its exception is raised), else the task
    that carries it on from where it waits."""
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_Resumed(coro, first).run())


class _Resumed:
    """A coroutine already started by hand, continued by a task from the point where it waits."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self._coro = coro
        self._first = first

    async def run(self) -> None:
        await self

    def __await__(self) -> Generator[Any, Any, None]:
        value = self._first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # noqa: BLE001 - passed into the coroutine, as a task would
                try:
                    value = self._coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = self._coro.send(sent)
                except StopIteration:
                    return
