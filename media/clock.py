"""Injectable time: timers, timeouts and pacing use a Clock, so tests advance time instead of sleeping.

In media/ because the media path paces on it and media/ imports nothing of bridge/ or carriers/.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (for records)."""
        ...

    def monotonic(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle: ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait_for(self, awaitable: Awaitable[T], timeout: float) -> T:
        """Like asyncio.wait_for, on this clock; raises TimeoutError."""
        ...


class RealClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, awaitable: Awaitable[T], timeout: float) -> T:
        return await asyncio.wait_for(awaitable, timeout)


def _settle(fut: asyncio.Future[Any], outcome: BaseException | None) -> None:
    """Resolve `fut` (with None, or the exception) unless it is done already."""
    if fut.done():
        return
    if outcome is None:
        fut.set_result(None)
    else:
        fut.set_exception(outcome)


class _FakeTimer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time moves only when a test calls `advance`. Timers fire in order, on the running loop's turn.

    `jump=True`: `sleep` moves time forward itself, at once (firing the timers it passes): for
    measuring CPU cost with the pacing's waits taken out, not for tests of timing."""

    def __init__(self, start: float = 1_700_000_000.0, *, jump: bool = False) -> None:
        self._now = start
        self._mono = 0.0
        self._queue: list[tuple[float, int, _FakeTimer]] = []
        self._seq = itertools.count()
        self.jump = jump

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        timer = _FakeTimer(self._mono + max(0.0, delay), callback)
        heapq.heappush(self._queue, (timer.when, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        if self.jump:
            self._fire_until(self._mono + max(0.0, seconds))
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_later(seconds, lambda: _settle(fut, None))
        await fut

    def _fire_until(self, target: float) -> None:
        """Move time to `target`, firing the timers due by then in order (no loop turn between them)."""
        while self._fire_next(target):
            pass
        self._move_to(target)

    def _fire_next(self, target: float) -> bool:
        """Fire the next timer due by `target` (time moves to it); False when none is."""
        while self._queue and self._queue[0][0] <= target:
            when, _, timer = heapq.heappop(self._queue)
            if timer.cancelled:
                continue
            self._move_to(when)
            timer.callback()
            return True
        return False

    def _move_to(self, when: float) -> None:
        self._now += when - self._mono
        self._mono = when

    async def wait_for(self, awaitable: Awaitable[T], timeout: float) -> T:
        fut = asyncio.ensure_future(awaitable)
        expired = False

        def expire() -> None:
            nonlocal expired
            if fut.done():
                return
            expired = True
            if isinstance(fut, asyncio.Task):
                fut.cancel()  # a coroutine's task is stopped, as asyncio.wait_for does
            else:
                fut.set_exception(TimeoutError())

        timer = self.call_later(timeout, expire)
        try:
            return await fut
        except asyncio.CancelledError:
            if expired and fut.cancelled():
                raise TimeoutError from None
            raise
        finally:
            timer.cancel()

    @property
    def next_at(self) -> float | None:
        """The monotonic time the earliest pending timer fires, or None when none is pending."""
        while self._queue and self._queue[0][2].cancelled:
            heapq.heappop(self._queue)
        return self._queue[0][0] if self._queue else None

    @property
    def pending(self) -> int:
        return sum(1 for _, _, t in self._queue if not t.cancelled)

    async def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers in order and letting the loop run after each."""
        target = self._mono + seconds
        while self._fire_next(target):
            for _ in range(5):
                await asyncio.sleep(0)
        self._move_to(target)
        for _ in range(5):
            await asyncio.sleep(0)
