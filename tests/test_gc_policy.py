"""The server's start-up objects are frozen (`voicecall serve` calls this once it is up): a full
collection no longer walks them, and garbage made later is collected as before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import gc, json
import bridge.runtime, bridge.cli  # what a server has loaded once it is up
from bridge.gc_policy import settle_startup_heap
before = len(gc.get_objects())
frozen = settle_startup_heap()
after = len(gc.get_objects())
garbage = [[] for _ in range(1000)]
for item in garbage:
    item.append(item)  # cycles made after start-up are still collected
del garbage, item
print(json.dumps({"before": before, "frozen": frozen, "after": after, "collected": gc.collect()}))
"""


def test_start_up_objects_are_frozen_and_later_garbage_is_still_collected() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["before"] > 20_000 and seen["frozen"] >= seen["before"] * 0.9, seen
    assert seen["after"] < seen["before"] / 20, seen  # what a full collection still walks
    assert seen["collected"] >= 1000, seen

