"""Proposed hot-path changes, applied to a benchmark server process as patches so each can be
measured before anyone commits it (`bench/media_streams.py --experiment NAME`).

- `no-inband-dtmf` (now the default for Twilio/Telnyx/Plivo: `streaming.inbandDtmf: auto`): MediaPipeline without the in-band DTMF detector. Twilio, Telnyx and Plivo media
  streams report key presses out of band (`dtmf` events), so on those carriers the detector only
  duplicates what the carrier says (the bridge already de-duplicates the two).
- `fast-dtmf`: the same detector and the same decisions, but the per-block tail (argmax, delete, max,
  twist and harmonic checks over 4-element arrays) in plain Python floats instead of ~10 small numpy
  calls per 25.6 ms block.
- `frames-40ms`: now the default on WebSocket streams (`streaming.outboundFrameMs: 40`, with
  `heard_ms` counted in milliseconds); kept as a name that changes nothing, so old command lines
  still run. `bench/media_streams.py --outbound-ms 20` measures the old 20 ms messages.
- `soxr-resampler`: soxr HQ streams for the telephony rate pairs too (what they used before
  media/polyphase.py), to weigh the polyphase filter's CPU against soxr's in the same run.
- `gc-freeze`: once the server is up, `gc.freeze()` the objects it started with (config models,
  aiohttp, numpy, ...), so the cyclic GC's full collections only walk what calls create.
"""

from __future__ import annotations

from typing import Any

EXPERIMENTS = ("no-inband-dtmf", "fast-dtmf", "gc-freeze", "frames-40ms", "soxr-resampler")


def _no_inband_dtmf() -> None:
    import media.pipeline as mb

    original = mb.MediaPipeline.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["inband_dtmf"] = False
        original(self, *args, **kwargs)

    mb.MediaPipeline.__init__ = init  # type: ignore[method-assign]


def fast_classify(self: Any, x: Any) -> str | None:
    """Drop-in for media.dtmf.DtmfDetector.classify (same math, same thresholds)."""
    import numpy as np

    from media.dtmf import KEYS

    energy = float(np.dot(x, x))
    if energy < self._min_energy:
        return None
    y = x @ self._basis
    p = ((y[:16] ** 2 + y[16:] ** 2) * (2.0 / self.block)).tolist()
    rows, cols = p[0:4], p[4:8]
    pr = max(rows)
    r = rows.index(pr)
    pc = max(cols)
    c = cols.index(pc)
    both = pr + pc
    if both < self._min_purity * energy:
        return None
    if pr < self._peak_ratio * max(rows[:r] + rows[r + 1:]) or pc < self._peak_ratio * max(cols[:c] + cols[c + 1:]):
        return None
    if pr > pc * self._twist or pc > pr * self._rtwist:
        return None
    if p[8 + r] > both * self._harm or p[12 + c] > both * self._harm:
        return None
    return KEYS[r][c]


def _fast_dtmf() -> None:
    from media import dtmf

    dtmf.DtmfDetector.classify = fast_classify  # type: ignore[method-assign]


def _gc_freeze() -> None:
    import gc

    import bridge.runtime as rt

    original = rt.Runtime.start

    async def start(self: Any, *args: Any, **kwargs: Any) -> int:
        port = await original(self, *args, **kwargs)
        gc.collect()
        gc.freeze()
        return port

    rt.Runtime.start = start  # type: ignore[method-assign]


def _soxr_resampler() -> None:
    import media.resample as resample

    resample.is_polyphase_pair = lambda in_rate, out_rate: False  # type: ignore[assignment]


def apply(names: str) -> None:
    for name in filter(None, names.split(",")):
        if name == "no-inband-dtmf":
            _no_inband_dtmf()
        elif name == "fast-dtmf":
            _fast_dtmf()
        elif name == "gc-freeze":
            _gc_freeze()
        elif name == "soxr-resampler":
            _soxr_resampler()
        elif name == "frames-40ms":
            pass  # the default now (streaming.outboundFrameMs: 40)
        else:
            raise SystemExit(f"unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})")
