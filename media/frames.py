"""Exact 20 ms framing and real-time pacing (sans-I/O except for the sleep)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from media.formats import FRAME_MS


class Framer:
    """Cuts a byte stream of any chunking (empty, tiny, bursty) into frames of exactly `frame_bytes`."""

    def __init__(self, frame_bytes: int, pad_byte: int = 0) -> None:
        if frame_bytes <= 0:
            raise ValueError("frame_bytes must be positive")
        self.frame_bytes = frame_bytes
        self.pad_byte = pad_byte
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def push(self, data: bytes) -> list[bytes]:
        if data:
            self._buf += data
        n = len(self._buf) // self.frame_bytes
        if not n:
            return []
        fb = self.frame_bytes
        frames = [bytes(self._buf[i * fb : (i + 1) * fb]) for i in range(n)]
        del self._buf[: n * fb]
        return frames

    def flush(self) -> bytes | None:
        """The last partial frame, padded with `pad_byte`; None if nothing is pending."""
        if not self._buf:
            return None
        frame = bytes(self._buf) + bytes([self.pad_byte]) * (self.frame_bytes - len(self._buf))
        self._buf.clear()
        return frame

    def clear(self) -> None:
        self._buf.clear()


class Pacer:
    """Real-time pacing for frames sent to a carrier that plays them at 1x.

    The schedule is absolute from the first frame (t0), so sleep jitter never accumulates into
    drift. Frame n plays at the far end during [t0 + n*dt, t0 + (n+1)*dt]. We may send frame n once
    at most `lead` frames (including n) would be queued at the far end, i.e. at
    t0 + (n - lead + 1)*dt. The pace depends only on frames, never on how the producer chunks its
    audio, so empty or bursty chunks cannot speed playback up (pipecat #5592).

    If the producer stalls past the far end's buffer (an underrun: silence was heard), the schedule
    is re-based on now; `underruns` counts those events.
    """

    def __init__(
        self,
        monotonic: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        *,
        lead_frames: int = 3,
        frame_ms: int = FRAME_MS,
    ) -> None:
        if lead_frames < 1:
            raise ValueError("lead_frames must be >= 1")
        self._now = monotonic
        self._sleep = sleep
        self.lead = lead_frames
        self.dt = frame_ms / 1000.0
        self.t0: float | None = None
        self.sent = 0
        self.underruns = 0

    def due(self, n: int) -> float:
        assert self.t0 is not None
        return self.t0 + max(0, n - self.lead + 1) * self.dt

    async def wait_turn(self) -> None:
        """Sleep until the next frame may be sent; call `sent_one()` after sending it."""
        now = self._now()
        if self.t0 is None:
            self.t0 = now
            return
        if now > self.t0 + self.sent * self.dt:
            # Everything sent so far has already played out: the far end went silent.
            self.underruns += 1
            self.t0 = now - self.sent * self.dt
            return
        delay = self.due(self.sent) - now
        if delay > 0:
            await self._sleep(delay)

    def sent_one(self) -> None:
        self.sent += 1

    def play_start(self, n: int) -> float:
        """When frame n starts playing at the far end (the pacing clock's estimate)."""
        assert self.t0 is not None
        return self.t0 + n * self.dt

    @property
    def end_time(self) -> float | None:
        """When the last sent frame finishes playing."""
        return None if self.t0 is None else self.t0 + self.sent * self.dt

    def played_frames(self, now: float | None = None) -> float:
        """Frames the far end has played by `now` (fractional), at most those sent."""
        if self.t0 is None:
            return 0.0
        now = self._now() if now is None else now
        return max(0.0, min(float(self.sent), (now - self.t0) / self.dt))
