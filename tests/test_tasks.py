"""BackgroundTasks: spawned work stays referenced until done, failures are logged with the task's
name, drain waits for work spawned meanwhile, cancel stops what is left. `mirror`: a task's outcome as a
plain future a clock can time out, the task stopped with it (the transfer summary and HTTP tools use it)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bridge.calls import CallRecord, CallState, Direction, TranscriptEntry
from bridge.conversation.chat import ChatModel, ReplyStream
from bridge.tasks import BackgroundTasks, mirror
from bridge.transfer.summary import SUMMARY_TIMEOUT_S, write_summary
from media.clock import FakeClock


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


async def test_mirror_settles_like_its_task() -> None:
    async def answer() -> str:
        await asyncio.sleep(0)
        return "42"

    async def fail() -> str:
        raise ValueError("bad gateway")

    assert await mirror(asyncio.ensure_future(answer())) == "42"
    with pytest.raises(ValueError, match="bad gateway"):
        await mirror(asyncio.ensure_future(fail()))


async def test_a_mirror_timed_out_on_the_clock_stops_its_task() -> None:
    clock = FakeClock()
    started = asyncio.Event()
    task = asyncio.ensure_future(_hang(started))
    waiting = asyncio.ensure_future(clock.wait_for(mirror(task), 2.0))
    await started.wait()
    await clock.advance(1.9)
    assert not waiting.done() and not task.done()
    await clock.advance(0.2)
    with pytest.raises(TimeoutError):
        await waiting
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


class _SilentStream(ReplyStream):
    def __init__(self, started: asyncio.Event) -> None:
        self.tool_calls = []
        self.finish_reason = None
        self.started = started
        self.closed = False

    async def _pieces(self):  # type: ignore[no-untyped-def]
        await _hang(self.started)
        yield ""

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self._pieces()

    async def aclose(self) -> None:
        self.closed = True


class _SilentModel(ChatModel):
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.stream_made = _SilentStream(self.started)

    async def stream(self, messages, tools):  # type: ignore[no-untyped-def]
        return self.stream_made


async def _hang(started: asyncio.Event) -> str:
    started.set()
    await asyncio.Event().wait()
    return "never"


async def test_a_summary_model_that_never_answers_gives_the_callers_words_and_is_closed() -> None:
    clock = FakeClock()
    model = _SilentModel()
    call = CallRecord(callId="c1", provider="mock", direction=Direction.INBOUND, state=CallState.LISTENING,
                      from_="+15550001111", to="+15550002222", startedAt=1.0,
                      transcript=[TranscriptEntry(1.0, "user", "My card was charged twice.")])
    summary = asyncio.ensure_future(write_summary(call, model, clock))
    await model.started.wait()
    await clock.advance(SUMMARY_TIMEOUT_S - 0.1)
    assert not summary.done()
    await clock.advance(0.2)
    assert await summary == "The caller said: My card was charged twice."
    assert model.stream_made.closed  # the request was cancelled, its stream closed
