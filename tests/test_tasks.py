"""BackgroundTasks: spawned work stays referenced until done, failures are logged with the task's
name, drain waits for work spawned meanwhile, cancel stops what is left."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bridge.tasks import BackgroundTasks


async def test_failures_are_logged_and_finished_tasks_let_go(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("voicecall.test-tasks")
    tasks = BackgroundTasks(log)

    async def boom() -> None:
        raise RuntimeError("carrier said no")

    with caplog.at_level(logging.WARNING, logger="voicecall.test-tasks"):
        tasks.spawn(boom(), "hangup-call-7")
        assert len(tasks) == 1
        await tasks.drain()
    assert len(tasks) == 0
    assert "hangup-call-7 failed: carrier said no" in caplog.text


async def test_drain_waits_for_work_spawned_meanwhile_and_cancel_stops_the_rest() -> None:
    tasks = BackgroundTasks(logging.getLogger("voicecall.test-tasks"))
    done: list[str] = []

    async def second() -> None:
        await asyncio.sleep(0.01)
        done.append("second")

    async def first() -> None:
        tasks.spawn(second(), "second")
        done.append("first")

    tasks.spawn(first(), "first")
    await tasks.drain()
    assert done == ["first", "second"]

    forever = tasks.spawn(asyncio.sleep(3600), "forever")
    await tasks.cancel()
    assert forever.cancelled() and len(tasks) == 0
