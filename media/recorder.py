"""Per-call 2-channel WAV: caller on channel 0, bridge audio (what the caller heard) on channel 1.

Both channels sit on one timeline in samples since the first write. Callers of `write_*` give
the monotonic time the audio started (or None for "now"); audio that continues where the
channel left off (within `snap_s`) is appended seamlessly, so arrival jitter never inserts
clicks, and a real gap (no stream, no playback) becomes silence. Positioning happens on the
event loop (cheap byte work); finished blocks go to one writer thread, so file I/O never blocks
the loop.

A call whose media stream is replaced (Twilio keys out, a failed transfer, a re-attach, a restart)
gets a new recorder for the same file: it appends after what the previous one wrote, once that
one has closed the file, so nothing recorded before the replacement is lost.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

CALLER, BRIDGE = 0, 1

# Recorders of one file take turns in the order they were created (the call's streams' order), not in
# the order their writer threads happen to get a block: each waits for every earlier unfinished one.
_writers: dict[Path, list[threading.Event]] = {}
_writers_guard = threading.Lock()


def _take_turn(path: Path) -> tuple[list[threading.Event], threading.Event]:
    """(the done events of the earlier recorders of `path` still writing, this recorder's own)."""
    done = threading.Event()
    with _writers_guard:
        earlier = _writers.setdefault(path, [])
        before = list(earlier)
        earlier.append(done)
    return before, done


def _end_turn(path: Path, done: threading.Event) -> None:
    done.set()
    with _writers_guard:
        left = [e for e in _writers.get(path, []) if e is not done]
        if left:
            _writers[path] = left
        else:
            _writers.pop(path, None)


class CallRecorder:
    def __init__(
        self,
        path: str | Path,
        rate: int,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        snap_s: float = 0.25,
        lag_s: float = 0.5,
    ) -> None:
        self.path = Path(path)
        self.rate = rate
        self._now = monotonic
        self._snap = round(snap_s * rate)
        self._lag = lag_s
        self._t0: float | None = None
        self._base = 0  # absolute sample index of _pending[*][0]
        self._pending = [bytearray(), bytearray()]
        self._cursor = [0, 0]
        self._closed = False
        self.samples_written = 0
        self.error: BaseException | None = None
        self._q: queue.SimpleQueue[np.ndarray | None] = queue.SimpleQueue()
        self._key = self.path.resolve()
        self._after, self._done = _take_turn(self._key)
        self._thread = threading.Thread(target=self._writer, name=f"recorder:{self.path.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side

    def write_caller(self, pcm: bytes, at: float | None = None) -> None:
        self._place(CALLER, pcm, at)

    def write_bridge(self, pcm: bytes, at: float | None = None) -> None:
        self._place(BRIDGE, pcm, at)

    def _place(self, ch: int, pcm: bytes, at: float | None) -> None:
        if self._closed or len(pcm) < 2:
            return
        now = self._now()
        when = now if at is None else at
        if self._t0 is None:
            self._t0 = when
        idx = round((when - self._t0) * self.rate)
        cur = self._cursor[ch]
        if idx > cur + self._snap:
            cur = idx  # a real gap: leave silence
        data = pcm[: len(pcm) // 2 * 2]
        start = cur - self._base
        if start < 0:  # part of it falls before what is already on disk: drop that part
            data = data[-start * 2 :]
            cur -= start
            start = 0
        buf = self._pending[ch]
        if len(buf) < start * 2:
            buf += bytes(start * 2 - len(buf))
        buf[start * 2 : start * 2 + len(data)] = data
        self._cursor[ch] = cur + len(data) // 2
        # Audio older than `lag_s` is final; never write ahead of what either channel has.
        self._flush_until(min(round((now - self._lag - self._t0) * self.rate), max(self._cursor)))

    def _flush_until(self, horizon: int, *, force: bool = False) -> None:
        n = horizon - self._base
        if n <= 0 or (not force and n < self.rate // 4):
            return
        block = np.zeros((n, 2), dtype="<i2")
        for ch in (CALLER, BRIDGE):
            buf = self._pending[ch]
            take = min(len(buf) // 2, n)
            if take:
                block[:take, ch] = np.frombuffer(bytes(buf[: take * 2]), dtype="<i2")
            del buf[: n * 2]
        self._base = horizon
        self._q.put(block)

    def flush(self) -> None:
        """Hand everything placed so far to the writer (the shorter channel is padded)."""
        end = max(self._base + len(b) // 2 for b in self._pending)
        self._flush_until(end, force=True)

    async def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._q.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def close_sync(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True
            self._q.put(None)
        self._thread.join()

    # ------------------------------------------------------------------ writer thread

    def _open(self) -> sf.SoundFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            f = sf.SoundFile(self.path, "r+")
            if f.samplerate == self.rate and f.channels == 2:
                f.seek(0, sf.SEEK_END)
                return f
            f.close()
            self.path = self.path.with_name(f"{self.path.stem}-{int(time.time())}{self.path.suffix}")
            log.warning("recording %s: earlier part has another format; continuing in %s",
                        self.path.name, self.path.name)
        return sf.SoundFile(self.path, "w", samplerate=self.rate, channels=2, subtype="PCM_16")

    def _writer(self) -> None:
        f: sf.SoundFile | None = None
        try:
            while (block := self._q.get()) is not None:
                if self.error is not None:
                    continue
                try:
                    if f is None:
                        for earlier in self._after:  # earlier recorders of this call finish their parts first
                            earlier.wait()
                        f = self._open()
                    f.write(block)
                    self.samples_written += len(block)
                except Exception as exc:  # keep draining so the call never stalls on a bad disk
                    self.error = exc
                    log.error("recording %s failed: %s", self.path.name, exc)
        finally:
            if f is not None:
                f.close()
            _end_turn(self._key, self._done)
