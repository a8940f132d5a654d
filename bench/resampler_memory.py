"""Memory per call of the echo's two resamplers (caller 8k -> 16k, play-out 16k -> 8k), by RSS.

    python bench/resampler_memory.py [pairs]

Runs in a fresh process: RSS after importing, then after creating `pairs` StreamResampler pairs
and feeding each 1 s of 20 ms frames (the caller's audio up, the result back down).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media.resample import StreamResampler  # noqa: E402


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    frames = [np.random.default_rng(k).normal(0, 3000, 160).astype("<i2").tobytes() for k in range(50)]
    warm = (StreamResampler(8000, 16000), StreamResampler(16000, 8000))  # shared tables, allocator arenas
    for f in frames:
        warm[1].process(warm[0].process(f))
    before = rss_kb()
    pairs = [(StreamResampler(8000, 16000), StreamResampler(16000, 8000)) for _ in range(n)]
    for f in frames:
        for up, down in pairs:
            down.process(up.process(f))
    per_pair = (rss_kb() - before) / n
    print(f"{n} resampler pairs (8k->16k + 16k->8k) after 1 s of 20 ms frames: {per_pair:.1f} KB RSS per pair")


if __name__ == "__main__":
    main()
