"""Stateful stream resampling of PCM16 mono (soxr).

One `StreamResampler` per direction per call: the filter state carries across chunks, so 20 ms
frames come out exactly as if the whole signal had been resampled at once (no clicks at frame
edges, unlike per-chunk one-shot resampling; see pipecat #2070). Chunks may be any size, even
empty or with an odd byte count (HTTP streams split samples); a dangling byte waits for the next
chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import soxr

SUPPORTED_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
# Rate pairs on which soxr (HQ) releases one block per block of input, so idle calls can be skipped
# without moving any output (checked over several chunkings in tests/test_media_inbound_resampler.py;
# 8k -> 48k, for one, sometimes releases two blocks at once).
SKIP_IDLE_PAIRS = frozenset({(8000, 16000), (16000, 8000), (8000, 24000), (24000, 8000), (16000, 24000),
                             (24000, 16000)})


class StreamResampler:
    def __init__(self, in_rate: int, out_rate: int, *, quality: str = "HQ", skip_idle_calls: bool = False) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"bad sample rates {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._odd = b""
        self.samples_in = 0
        self.samples_out = 0
        self._stream = (
            None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)
        )
        # soxr's C call itself: the public resample_chunk wraps it in a type check, a reshape and a
        # squeeze, 2-3 us per 20 ms frame at this size (bench/README.md). Same output; the public
        # method is the fallback if a soxr release renames it.
        self._process: Callable[[np.ndarray, bool], np.ndarray] | None = getattr(self._stream, "_process", None)
        # skip_idle_calls: soxr releases output in blocks, one per `block` input samples (830 at
        # 8k -> 16k HQ), so fed 20 ms frames it answers 4 calls of 5 with nothing, at nearly the
        # cost of a call that works. `_next` is a lower bound on the input count at which soxr
        # releases its next block: a call that releases nothing at input count F raises it to F + 1;
        # a release raises it by one block. Input is only held until `_next`, so the output comes
        # on the same chunk as without skipping (tests/test_media_inbound_resampler.py).
        self._skip = skip_idle_calls and quality == "HQ" and (in_rate, out_rate) in SKIP_IDLE_PAIRS
        self._held = bytearray()
        self._fed = 0  # input samples handed to soxr
        self._next = 0
        self._block: int | None = None  # input samples per released block (a lower bound)
        self._released = False

    @property
    def passthrough(self) -> bool:
        return self._stream is None

    def process(self, pcm: bytes) -> bytes:
        if self._odd:
            pcm = self._odd + pcm
            self._odd = b""
        if len(pcm) % 2:
            self._odd = pcm[-1:]
            pcm = pcm[:-1]
        n = len(pcm) // 2
        self.samples_in += n
        if self._stream is None or not pcm:
            self.samples_out += n
            return bytes(pcm)
        if self._skip:
            self._held += pcm
            if self.samples_in < self._next:
                return b""
            pcm = bytes(self._held)
            self._held.clear()
        x = np.frombuffer(pcm, dtype=np.int16)
        out = self._process(x.reshape(-1, 1), False) if self._process is not None else self._stream.resample_chunk(x)
        self._fed += len(x)
        self.samples_out += len(out)
        if self._skip:
            if len(out):
                self._after_release(len(x), len(out))
            else:
                self._next = max(self._next, self._fed + 1)
        return out.tobytes()

    def _after_release(self, took: int, released: int) -> None:
        # A block's size in input samples, learnt only from a call that took at most half of what
        # it released (releasing m >= 2 blocks needs more than (m - 1) blocks of input, so such a
        # call released one); the floor, minus one, keeps it a lower bound where blocks alternate
        # in size (8k -> 24k: 489/490).
        block = released * self.in_rate // self.out_rate - 1
        # not from the first release, which can carry the filter's lead-in too (24k -> 8k: 980 = 2 x 490)
        if self._released and 2 * took <= block and (self._block is None or block < self._block):
            self._block = block
        self._released = True
        # the block just released became due at input count >= _next; the next one a block later
        self._next = self._next + self._block if self._block is not None else self._fed + 1

    @property
    def pending_s(self) -> float:
        """Seconds of input not yet out: soxr works in blocks, so this swings between ~20 and
        ~130 ms at HQ (its output is delay-compensated, so it is buffering, not offset)."""
        return self.samples_in / self.in_rate - self.samples_out / self.out_rate

    def flush(self) -> bytes:
        """Drain the filter's tail at the end of a stream; the resampler is then reset."""
        self._odd = b""  # half a sample cannot be played
        if self._stream is None:
            return b""
        held = np.frombuffer(bytes(self._held), dtype=np.int16)
        out = self._stream.resample_chunk(held, last=True)
        self._stream.clear()
        self._forget()
        return bytes(out.tobytes())

    def reset(self) -> None:
        self._odd = b""
        self._forget()
        if self._stream is not None:
            self._stream.clear()

    def _forget(self) -> None:
        self.samples_in = self.samples_out = 0
        self._held.clear()
        self._fed = self._next = 0
        self._released = False
