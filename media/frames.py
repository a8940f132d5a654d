"""Exact framing (20 ms frames, or messages of several frames) and real-time pacing (sans-I/O except for the sleep)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from media.formats import FRAME_MS


class Framer:
    """Cuts a byte stream of any chunking (empty, tiny, bursty) into frames of exactly `frame_bytes`.

    `flush` pads the last partial frame only up to a multiple of `pad_to` (default `frame_bytes`):
    with 40 ms messages and `pad_to` = one 20 ms frame, the tail is 20 or 40 ms, never more silence
    than a 20 ms framer would add.
    """

    def __init__(self, frame_bytes: int, pad_byte: int = 0, *, pad_to: int | None = None) -> None:
        if frame_bytes <= 0:
            raise ValueError("frame_bytes must be positive")
        pad_to = frame_bytes if pad_to is None else pad_to
        if pad_to <= 0 or frame_bytes % pad_to:
            raise ValueError("pad_to must be a positive divisor of frame_bytes")
        self.frame_bytes = frame_bytes
        self.pad_to = pad_to
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
        """The last partial frame, padded with `pad_byte` to a multiple of `pad_to`; None if nothing is pending."""
        if not self._buf:
            return None
        size = -(-len(self._buf) // self.pad_to) * self.pad_to
        frame = bytes(self._buf) + bytes([self.pad_byte]) * (size - len(self._buf))
        self._buf.clear()
        return frame

    def clear(self) -> None:
        self._buf.clear()


class Pacer:
    """Real-time pacing for messages sent to a carrier that plays them at 1x.

    Messages are `frame_ms` long (the last one of a play may be shorter; `sent_one` takes its
    length). The schedule is absolute from the first message (t0), so sleep jitter never
    accumulates into drift: the far end plays the audio sent so far during [t0, t0 + sent_s]. A
    message may go once at most `lead` messages' worth of audio (including it) would be queued at
    the far end. The pace depends only on audio sent, never on how the producer chunks it, so empty
    or bursty chunks cannot speed playback up (pipecat #5592).

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
        self.frame_ms = frame_ms
        self.dt = frame_ms / 1000.0
        self.t0: float | None = None
        self.sent = 0  # messages
        self.sent_ms = 0.0  # audio in them (summed in ms: exact for whole milliseconds)
        self.underruns = 0

    @property
    def sent_s(self) -> float:
        return self.sent_ms / 1000.0

    async def wait_turn(self) -> None:
        """Sleep until the next message may be sent; call `sent_one()` after sending it."""
        now = self._now()
        due = self.turn(now)
        if due > now:
            await self._sleep(due - now)

    def turn(self, now: float) -> float:
        """When the next message may go (`now` or earlier: at once), asked at `now`. The first
        message sets t0, and a message asked for after everything sent has played re-bases it."""
        if self.t0 is None:
            self.t0 = now
            return now
        if now > self.t0 + self.sent_s:
            # Everything sent so far has already played out: the far end went silent.
            self.underruns += 1
            self.t0 = now - self.sent_s
            return now
        return self.t0 + self.sent_s + self.dt * (1 - self.lead)

    def sent_one(self, ms: float | None = None) -> None:
        """One message went out: `ms` of audio, by default a full `frame_ms`."""
        self.sent += 1
        self.sent_ms += self.frame_ms if ms is None else ms

    def play_start(self, n: int) -> float:
        """When full message n starts playing at the far end (the pacing clock's estimate)."""
        assert self.t0 is not None
        return self.t0 + n * self.dt

    @property
    def end_time(self) -> float | None:
        """When the last sent message finishes playing."""
        return None if self.t0 is None else self.t0 + self.sent_s

    def played_ms(self, now: float | None = None) -> float:
        """Milliseconds of audio the far end has played by `now`, at most what was sent."""
        if self.t0 is None:
            return 0.0
        now = self._now() if now is None else now
        return max(0.0, min(self.sent_ms, (now - self.t0) * 1000.0))

    def played_frames(self, now: float | None = None) -> float:
        """Full messages the far end has played by `now` (fractional)."""
        return self.played_ms(now) / 1000.0 / self.dt
