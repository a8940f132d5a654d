"""espeak-ng, the offline default voice: one `espeak-ng --stdout` subprocess per utterance,
its WAV stream parsed on the fly and forwarded as it arrives (the loop never waits on it)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
from collections.abc import AsyncIterator
from typing import Any

from media.resample import StreamResampler
from media.tts.base import EvenBytes, TtsEngine, TtsError

ESPEAK_RATE = 22050


class WavStreamParser:
    """Incremental RIFF/WAVE parser for a stream whose sizes may be bogus (espeak writes
    0x7ffff000-ish placeholders when it cannot seek). Sans-I/O."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.rate: int | None = None
        self.channels = 1
        self.bits = 16
        self._in_data = False

    def feed(self, data: bytes) -> bytes:
        """Returns the PCM payload bytes available so far."""
        if self._in_data:
            return data
        self._buf += data
        if len(self._buf) < 12:
            return b""
        if self._buf[:4] != b"RIFF" or self._buf[8:12] != b"WAVE":
            raise TtsError("espeak-ng did not produce a WAV stream")
        pos = 12
        while len(self._buf) >= pos + 8:
            cid = bytes(self._buf[pos : pos + 4])
            size = struct.unpack_from("<I", self._buf, pos + 4)[0]
            if cid == b"data":
                self._in_data = True
                out = bytes(self._buf[pos + 8 :])
                self._buf.clear()
                if self.rate is None:
                    raise TtsError("WAV stream without a fmt chunk")
                return out
            if len(self._buf) < pos + 8 + size:
                return b""
            if cid == b"fmt ":
                fmt, ch, rate, _, _, bits = struct.unpack_from("<HHIIHH", self._buf, pos + 8)
                if fmt != 1 or bits != 16:
                    raise TtsError(f"unsupported WAV format {fmt}/{bits} bit")
                self.rate, self.channels, self.bits = rate, ch, bits
            pos += 8 + size + (size & 1)
        return b""


class EspeakTts(TtsEngine):
    name = "espeak"

    def __init__(
        self,
        *,
        voice: str | None = None,
        speed: int | None = None,
        pitch: int | None = None,
        binary: str = "espeak-ng",
        sample_rate: int = ESPEAK_RATE,
    ) -> None:
        self.voice = voice
        self.speed = speed
        self.pitch = pitch
        self.binary = binary
        self.sample_rate = sample_rate

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> EspeakTts:
        return cls(voice=cfg.get("voice"), speed=cfg.get("speed"), pitch=cfg.get("pitch"), binary=cfg.get("binary", "espeak-ng"))

    @staticmethod
    def available(binary: str = "espeak-ng") -> bool:
        return shutil.which(binary) is not None

    def _argv(self) -> list[str]:
        argv = [self.binary, "--stdout", "--stdin"]
        if self.voice:
            argv += ["-v", str(self.voice)]
        if self.speed:
            argv += ["-s", str(int(self.speed))]
        if self.pitch is not None:
            argv += ["-p", str(int(self.pitch))]
        return argv

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        # Text goes through stdin, so it can never be read as an option.
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise TtsError(f"cannot run {self.binary}: {exc.strerror}") from exc
        assert proc.stdin and proc.stdout and proc.stderr
        parser = WavStreamParser()
        even = EvenBytes()
        resampler: StreamResampler | None = None
        try:
            proc.stdin.write(text.replace("\n", " ").encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await proc.stdin.drain()
            proc.stdin.close()
            while chunk := await proc.stdout.read(4096):
                pcm = parser.feed(chunk)
                if not pcm:
                    continue
                if resampler is None:
                    assert parser.rate is not None
                    if parser.channels != 1:
                        raise TtsError("espeak-ng produced non-mono audio")
                    resampler = StreamResampler(parser.rate, self.sample_rate)
                yield resampler.process(even.feed(pcm))
            if resampler is not None:
                tail = resampler.flush()
                if tail:
                    yield tail
            rc = await proc.wait()
            if rc != 0:
                err = (await proc.stderr.read()).decode(errors="replace").strip()
                raise TtsError(f"espeak-ng exited with {rc}: {err[:200]}")
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                # Drain the pipes: a paused, full stdout reader would keep wait() from returning.
                await asyncio.gather(proc.stdout.read(), proc.stderr.read(), return_exceptions=True)
                await proc.wait()
