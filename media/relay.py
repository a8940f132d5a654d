"""AudioRelay: the local bridge between two calls' media pipelines.

Used for a warm transfer when the carrier cannot join the two legs itself (the mock, SIP, Asterisk):
each side's caller audio (decoded wire PCM, from the pipeline's tap) is played to the other side
through that side's own `MediaPipeline.play`, so it is resampled to the other leg's codec and paced
like any other play (an underrun re-bases the pacing, so silence between words adds no delay).
The bridge's own voice stops on both sides when the relay starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from media.clock import Clock
from media.pipeline import MediaPipeline

log = logging.getLogger(__name__)

# With nothing to relay for this long, the play gets an empty chunk: it keeps the pipeline's
# stall guard (meant for a speech engine gone quiet) from ending a relay over a silent line.
IDLE_KEEPALIVE_S = 1.0
MAX_QUEUED_CHUNKS = 500  # ~10 s of 20 ms frames; a side that cannot keep up drops the oldest


class _Direction:
    """Caller audio of `source` played to `target`."""

    def __init__(self, source: MediaPipeline, target: MediaPipeline, clock: Clock, label: str) -> None:
        self.source = source
        self.target = target
        self.clock = clock
        self.label = label
        self.rate = source.wire.rate
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.relayed_bytes = 0
        self.dropped_chunks = 0
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.stopped = False

    def tap(self, pcm: bytes, rate: int) -> None:
        if self.queue.qsize() >= MAX_QUEUED_CHUNKS:
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.dropped_chunks += 1
        self.put(pcm)

    async def _next(self) -> bytes | None:
        """The next chunk; b"" when none came for IDLE_KEEPALIVE_S (on the injectable clock)."""
        if self.queue.qsize():
            return self.queue.get_nowait()
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiter = arrived
        try:
            await self.clock.wait_for(arrived, IDLE_KEEPALIVE_S)
        except TimeoutError:
            return b""
        finally:
            self.waiter = None
        return self.queue.get_nowait()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while not self.stopped:
            chunk = await self._next()
            if chunk is None:
                return
            self.relayed_bytes += len(chunk)
            yield chunk

    def put(self, item: bytes | None) -> None:
        self.queue.put_nowait(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def run(self) -> None:
        while not self.stopped and not self.target.closed:
            try:
                await self.target.play(self._chunks(), self.rate, label=self.label, barge_in=False)
            except TimeoutError:
                continue  # the stall guard fired anyway (a very slow loop): start a new play


class AudioRelay:
    """Joins pipelines `a` and `b` until `stop()` (or until one of them closes)."""

    def __init__(self, a: MediaPipeline, b: MediaPipeline, clock: Clock) -> None:
        self._a_to_b = _Direction(a, b, clock, "relay-a-b")
        self._b_to_a = _Direction(b, a, clock, "relay-b-a")
        self.running = False

    @property
    def relayed_bytes(self) -> tuple[int, int]:
        """PCM bytes relayed a->b and b->a so far."""
        return self._a_to_b.relayed_bytes, self._b_to_a.relayed_bytes

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        for way in (self._a_to_b, self._b_to_a):
            way.target.interrupt("relay")  # the bridge's own voice stops on both sides
            way.source.add_tap(way.tap)
            way.task = asyncio.ensure_future(way.run())

    async def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        tasks = []
        for way in (self._a_to_b, self._b_to_a):
            way.source.remove_tap(way.tap)
            way.stopped = True
            way.put(None)
            way.target.interrupt("relay-end")
            if way.task is not None:
                tasks.append(way.task)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("relay ended with %s: %s", type(result).__name__, result)
