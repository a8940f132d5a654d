"""Asynchronous continue for agents that cannot hold a request open: `voicecall.continue.start`
runs the turn in the background and returns an id at once; `voicecall.continue.result` polls it.

Finished results are kept for `keep_s` (on the manager's clock) and at most `limit` jobs are
remembered, oldest finished first out, so polling agents that never come back cost nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from bridge.manager import CallError
from bridge.tasks import BackgroundTasks
from media.clock import Clock

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Job:
    call_id: str
    task: asyncio.Task[dict[str, Any]]
    finished_at: float | None = None


class ContinueJobs:
    def __init__(self, clock: Clock, tasks: BackgroundTasks, *, keep_s: float = 600.0, limit: int = 1000) -> None:
        self._clock = clock
        self._tasks = tasks
        self._keep_s = keep_s
        self._limit = limit
        self._jobs: OrderedDict[str, _Job] = OrderedDict()

    def start(self, call_id: str, turn: Awaitable[str]) -> str:
        self._expire()
        job_id = uuid.uuid4().hex
        task = self._tasks.spawn(_outcome(turn), f"continue-{job_id}")
        job = _Job(call_id, task)
        task.add_done_callback(lambda _: setattr(job, "finished_at", self._clock.monotonic()))
        self._jobs[job_id] = job
        return job_id

    def result(self, job_id: str) -> dict[str, Any] | None:
        """None for an unknown (or expired) id."""
        self._expire()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        base = {"continueId": job_id, "callId": job.call_id}
        if not job.task.done():
            return {**base, "status": "pending"}
        if job.task.cancelled():
            return {**base, "status": "error", "success": False, "error": "cancelled"}
        return {**base, **job.task.result()}

    async def close(self) -> None:
        """Stop turns still running (the server is shutting down)."""
        await self._tasks.cancel()

    def _expire(self) -> None:
        now = self._clock.monotonic()
        for job_id, job in list(self._jobs.items()):
            if job.finished_at is not None and now - job.finished_at >= self._keep_s:
                del self._jobs[job_id]
        while len(self._jobs) >= self._limit:
            finished = next((k for k, j in self._jobs.items() if j.finished_at is not None), None)
            del self._jobs[finished if finished is not None else next(iter(self._jobs))]


async def _outcome(turn: Awaitable[str]) -> dict[str, Any]:
    """The turn's transcript, or its failure as a result (a timeout is an answer, not a crash)."""
    try:
        return {"status": "done", "success": True, "transcript": await turn}
    except CallError as exc:
        return {"status": "error", "success": False, "error": str(exc)}
    except Exception:  # noqa: BLE001 - reported to the poller; the details go to the log only
        log.exception("asynchronous continue failed")
        return {"status": "error", "success": False, "error": "internal error"}
