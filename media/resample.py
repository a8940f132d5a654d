"""Stateful stream resampling of PCM16 mono.

One `StreamResampler` per direction per call: the filter state carries across chunks, so 20 ms
frames come out exactly as if the whole signal had been resampled at once (no clicks at frame
edges, unlike per-chunk one-shot resampling; see pipecat #2070). Chunks may be any size, even
empty or with an odd byte count (HTTP streams split samples); a dangling byte waits for the next
chunk. The output is delay-compensated: output sample i is input sample i's time.

The telephony pairs (8k <-> 16k <-> 24k) use a polyphase FIR (media/polyphase.py): a few hundred
bytes of state per stream and output with every chunk, ~2.5 ms behind the input. Every other pair
uses soxr HQ, which holds ~90 KB per stream and releases output in ~100 ms blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import soxr

from media.polyphase import PolyphaseStream, is_polyphase_pair

SUPPORTED_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


class StreamResampler:
    def __init__(self, in_rate: int, out_rate: int, *, quality: str = "HQ", hold_ms: int = 0) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"bad sample rates {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._odd = b""
        self.samples_in = 0
        self.samples_out = 0
        self._fir = PolyphaseStream(in_rate, out_rate) if is_polyphase_pair(in_rate, out_rate) else None
        # hold_ms (polyphase pairs): input is held until this much is there, then filtered in one
        # go. A 20 ms frame per call costs ~10 numpy calls whatever its size, and the audio then
        # travels on in frame-sized pieces too; 100 ms pieces cut the media path's CPU per stream
        # by ~30% at the price of up to 100 ms of delay (what soxr's blocks cost before).
        self._held = bytearray()
        self.set_hold_ms(hold_ms)
        self._stream = (
            None if in_rate == out_rate or self._fir is not None
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)
        )
        # soxr's C call itself: the public resample_chunk wraps it in a type check, a reshape and a
        # squeeze, 2-3 us per 20 ms frame at this size (bench/README.md). Same output; the public
        # method is the fallback if a soxr release renames it.
        self._process: Callable[[np.ndarray, bool], np.ndarray] | None = getattr(self._stream, "_process", None)

    def set_hold_ms(self, hold_ms: int) -> None:
        """Change the hold mid-stream; input held so far goes out with the next chunk if it is due by then."""
        self._hold = hold_ms * self.in_rate // 1000 * 2 if self._fir is not None else 0

    @property
    def passthrough(self) -> bool:
        return self._stream is None and self._fir is None

    def process(self, pcm: bytes) -> bytes:
        if self._odd:
            pcm = self._odd + pcm
            self._odd = b""
        if len(pcm) % 2:
            self._odd = pcm[-1:]
            pcm = pcm[:-1]
        n = len(pcm) // 2
        self.samples_in += n
        if self._fir is not None:
            if self._hold or self._held:
                self._held += pcm
                if len(self._held) < self._hold:
                    return b""
                pcm = bytes(self._held)
                self._held.clear()
            out = self._fir.process(pcm)
            self.samples_out += len(out) // 2
            return out
        if self._stream is None or not pcm:
            self.samples_out += n
            return bytes(pcm)
        x = np.frombuffer(pcm, dtype=np.int16)
        y = self._process(x.reshape(-1, 1), False) if self._process is not None else self._stream.resample_chunk(x)
        self.samples_out += len(y)
        return y.tobytes()

    @property
    def pending_s(self) -> float:
        """Seconds of input not yet out: ~2.5 ms for the polyphase pairs; soxr works in blocks, so
        there it swings between ~20 and ~130 ms (both are delay-compensated: buffering, not offset)."""
        return self.samples_in / self.in_rate - self.samples_out / self.out_rate

    def flush(self) -> bytes:
        """Drain the filter's tail at the end of a stream; the resampler is then reset."""
        self._odd = b""  # half a sample cannot be played
        if self._fir is not None:
            out = self._fir.process(bytes(self._held)) if self._held else b""
            out += self._fir.flush(self.samples_in, self.samples_out + len(out) // 2)
        elif self._stream is not None:
            out = self._stream.resample_chunk(np.zeros(0, np.int16), last=True).tobytes()
        else:
            return b""
        self.reset()
        return out

    def reset(self) -> None:
        self._odd = b""
        self._held.clear()
        self.samples_in = self.samples_out = 0
        if self._fir is not None:
            self._fir.reset()
        if self._stream is not None:
            self._stream.clear()
