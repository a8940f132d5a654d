"""The SIP carrier's media leg: frames between pjsua2's conference bridge and a MediaPipeline.

pjsua2's media clock thread calls `_AudioPort.onFrameReceived/onFrameRequested` every 20 ms; those only
touch the call's `SipMediaTransport` (a deque out, `call_soon_threadsafe` in).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from media.formats import AudioFormat

try:  # the `sip` extra; absent on Python 3.13 (no wheel)
    import pjsua2 as pj
except ImportError:  # pragma: no cover - exercised only without the extra
    pj = None

if TYPE_CHECKING:
    from media.pipeline import MediaPipeline

log = logging.getLogger("voicecall.sip")

JITTER_MAX_FRAMES = 50  # 1 s of outbound audio; older frames are dropped past this
PREBUFFER_FRAMES = 2  # start playout once 2 frames are queued (or after waiting 2 ticks)


# ----------------------------------------------------------------------------- media


def _vector_reader() -> Callable[[Any], bytes]:
    """Fast `bytes` of a pjsua2 ByteVector. Iterating the SWIG vector costs ~130 us per 20 ms frame;
    reading the std::vector's [begin, end) pointers costs ~2 us. Used only if a probe matches."""

    def slow(vec: Any) -> bytes:
        return bytes(vec)

    if pj is None:
        return slow

    def fast(vec: Any) -> bytes:
        addr = int(vec.this)
        begin = ctypes.c_void_p.from_address(addr).value or 0
        end = ctypes.c_void_p.from_address(addr + ctypes.sizeof(ctypes.c_void_p)).value or 0
        return ctypes.string_at(begin, end - begin) if end > begin else b""

    try:
        probe = pj.ByteVector(b"\x01\x02\x03\xfe")
        if fast(probe) == b"\x01\x02\x03\xfe" and fast(pj.ByteVector()) == b"":
            return fast
    except Exception:
        pass
    return slow


_read_vector = _vector_reader()


class LegCounters:
    """Frame counts of one call's audio leg, and when its media started and the far end first made
    a sound (call setup time is measured to that moment)."""

    def __init__(self, frame_bytes: int) -> None:
        self._silence = b"\x00" * frame_bytes
        self.frames_in = 0
        self.frames_out = 0
        self.underruns = 0
        self.frames_dropped = 0
        self.first_rx_at: float | None = None  # monotonic, first frame of the leg
        self.first_audio_at: float | None = None  # monotonic, first non-silent frame from the far end
        self.closed = False

    def count_in(self, payload: bytes) -> None:
        if self.first_audio_at is None:
            now = time.monotonic()
            if self.first_rx_at is None:
                self.first_rx_at = now
            if payload != self._silence:
                self.first_audio_at = now
        self.frames_in += 1


class SipMediaTransport(LegCounters):
    """One call's audio leg toward pjsua2, as a MediaPipeline sees it (`media.transport.MediaTransport`).

    Outbound: `send_media` appends to a bounded deque the media clock thread drains every 20 ms.
    Inbound: the media clock thread posts each received frame to the loop, which hands it to
    `bridge.receive`. Payloads are PCM16 LE mono at the conference clock rate.
    """

    def __init__(self, fmt: AudioFormat, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(fmt.frame_bytes)
        self.format = fmt
        self.supports_marks = False  # pjsua2 cannot echo marks: the bridge trusts its pacing clock
        self.bridge: MediaPipeline | None = None
        self._loop = loop
        self._out: collections.deque[bytes] = collections.deque(maxlen=JITTER_MAX_FRAMES)
        self._playing = False
        self._waited = 0

    # -- loop side (MediaTransport)
    async def send_media(self, payload: bytes) -> None:
        self.queue_payload(payload)

    def send_media_now(self, payload: bytes) -> bool:
        """The same, without a coroutine (the pacing wheel's path): queueing never waits."""
        self.queue_payload(payload)
        return True

    def queue_payload(self, payload: bytes) -> None:
        size = self.format.frame_bytes
        if len(payload) == size:
            self._queue(payload)
            return
        for i in range(0, len(payload), size):  # tolerate odd sizes: split, pad the tail
            chunk = payload[i : i + size]
            self._queue(chunk + self._silence[len(chunk) :])

    def _queue(self, frame: bytes) -> None:
        if len(self._out) == JITTER_MAX_FRAMES:
            self.frames_dropped += 1  # the deque drops its oldest frame: the writer ran ahead of real time
        self._out.append(frame)

    async def send_mark(self, name: str) -> None:
        return None

    async def send_clear(self) -> None:
        self.clear_now()

    def clear_now(self) -> None:
        self._out.clear()
        self._playing = False

    @property
    def queued_frames(self) -> int:
        return len(self._out)

    def _deliver(self, payload: bytes) -> None:
        if self.bridge is not None and not self.closed:
            self.bridge.receive(payload)

    # -- media clock thread side
    def _pull(self) -> bytes | None:
        out = self._out
        if not self._playing:
            if not out:
                return None
            self._waited += 1
            if len(out) < PREBUFFER_FRAMES and self._waited < PREBUFFER_FRAMES:
                return None
            self._playing = True
            self._waited = 0
        try:
            payload = out.popleft()
        except IndexError:
            self._playing = False
            self.underruns += 1
            return None
        self.frames_out += 1
        return payload

    def _push(self, payload: bytes) -> None:
        if self.closed:
            return
        self.count_in(payload)
        try:
            self._loop.call_soon_threadsafe(self._deliver, payload)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.closed = True


_AudioPort: Any = None  # defined below when the `sip` extra is installed
if pj is not None:

    class _AudioPort(pj.AudioMediaPort):  # type: ignore[no-redef]  # the real one, with pjsua2
        """Conference-bridge port between a call's stream and its SipMediaTransport."""

        # Class-level: what an instance reads before __init__ ends and after its dict is cleared while it
        # is deleted, when pjsua's media thread may still call it: the callbacks then do nothing.
        closed = True
        _frame_bytes = 0

        def __init__(self, transport: SipMediaTransport) -> None:
            super().__init__()
            self.transport = transport
            self._frame_bytes = transport.format.frame_bytes
            self._silence = pj.ByteVector(b"\x00" * self._frame_bytes)
            self.closed = False

        def onFrameRequested(self, frame: Any) -> None:
            if self.closed:
                return
            try:
                payload = self.transport._pull()
                frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
                if payload is None:
                    frame.buf = self._silence
                else:
                    frame.buf = pj.ByteVector(payload)
                frame.size = self._frame_bytes
            except Exception:
                log.exception("sip: frame request failed")

        def onFrameReceived(self, frame: Any) -> None:
            if self.closed:
                return
            try:
                if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size:
                    payload = _read_vector(frame.buf)[: frame.size]
                    if len(payload) != self._frame_bytes:
                        payload = (payload + bytes(self._frame_bytes))[: self._frame_bytes]
                else:
                    payload = bytes(self._frame_bytes)
                self.transport._push(payload)
            except Exception:
                log.exception("sip: frame receive failed")

