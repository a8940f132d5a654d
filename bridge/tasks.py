"""Fire-and-forget tasks that stay referenced until done and never fail silently."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundTasks:
    """The side effects one component starts without awaiting them (a hang-up after a timeout, a
    webhook's follow-up request): kept referenced so they are not garbage-collected mid-flight,
    failures logged on `log`, cancelled together on close."""

    def __init__(self, log: logging.Logger, *, level: int = logging.WARNING) -> None:
        self._log = log
        self._level = level
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            self._log.log(self._level, "%s failed: %s", task.get_name(), error,
                          exc_info=error if self._level >= logging.ERROR else None)

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until every task (including ones spawned meanwhile) has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def finish_prefixed(self, prefixes: tuple[str, ...], timeout: float) -> None:
        """Let the tasks whose name starts with one of `prefixes` finish (at most `timeout` s)."""
        tasks = [task for task in self._tasks if task.get_name().startswith(prefixes)]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def cancel_named(self, suffix: str) -> int:
        """Cancel the tasks whose name ends with `suffix` (one call's work, named `<what>-<call id>`)."""
        tasks = [task for task in self._tasks if task.get_name().endswith(suffix)]
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def cancel(self) -> None:
        """Cancel every task and wait for them to finish."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def mirror(task: asyncio.Task[T]) -> asyncio.Future[T]:
    """A plain future settled like `task`, for a clock's `wait_for` (a clock fails a plain future on
    timeout; a task cannot be failed from outside). When the future ends first (timed out, cancelled),
    `task` is cancelled, and a failure it reports later counts as retrieved."""
    fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def settle(t: asyncio.Task[T]) -> None:
        if fut.done():
            if not t.cancelled():
                t.exception()
            return
        if t.cancelled():
            fut.cancel()
        elif (error := t.exception()) is not None:
            fut.set_exception(error)
        else:
            fut.set_result(t.result())

    def stop(_: asyncio.Future[T]) -> None:
        if not task.done():
            task.cancel()

    task.add_done_callback(settle)
    fut.add_done_callback(stop)
    return fut
