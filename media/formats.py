"""Wire audio formats. Carriers send G.711 (u-law / A-law) at 8 kHz or linear PCM16 (L16)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

FRAME_MS = 20


class AudioEncoding(StrEnum):
    PCMU = "pcmu"  # G.711 u-law
    PCMA = "pcma"  # G.711 A-law
    L16 = "l16"  # signed 16-bit little-endian PCM (as the bridge receives it, already host order)


@dataclass(frozen=True, slots=True)
class AudioFormat:
    encoding: AudioEncoding
    rate: int = 8000

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding is AudioEncoding.L16 else 1

    @property
    def frame_bytes(self) -> int:
        """Bytes in one 20 ms frame."""
        return self.bytes_for_ms(FRAME_MS)

    def bytes_for_ms(self, ms: int) -> int:
        """Bytes in `ms` milliseconds of audio (whole samples)."""
        return self.rate * ms // 1000 * self.bytes_per_sample

    def ms_of(self, payload: bytes) -> float:
        """Duration of `payload` in milliseconds."""
        return len(payload) * 1000 / (self.rate * self.bytes_per_sample)

    @property
    def silence_byte(self) -> int:
        return {AudioEncoding.PCMU: 0xFF, AudioEncoding.PCMA: 0xD5, AudioEncoding.L16: 0x00}[self.encoding]


ULAW_8K = AudioFormat(AudioEncoding.PCMU, 8000)
ALAW_8K = AudioFormat(AudioEncoding.PCMA, 8000)
