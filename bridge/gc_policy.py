"""The server process's garbage collector: start-up objects are frozen out of its sight.

CPython's full (generation 2) collection walks every tracked object with the event loop stopped. After
start-up those are ~65,000 objects that live as long as the process (modules, classes, functions, the
config, the app), and walking them took 40-130 ms per full collection in `bench/voice_to_voice.py` at
100 calls: one such pause was the turn's p99. `gc.freeze()` moves them to a permanent generation that
collections skip; what calls allocate later is collected as before.
"""

from __future__ import annotations

import gc


def settle_startup_heap() -> int:
    """Collect once, then freeze whatever is still alive; call when the server is up, before calls come in.
    Returns how many objects are now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
