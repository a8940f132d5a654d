"""The call log: `<store>/calls.jsonl`, append-only, one full record per change; replayed on start."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

from bridge.calls import CallRecord

log = logging.getLogger(__name__)

LOG_NAME = "calls.jsonl"


@dataclass(slots=True)
class Replay:
    calls: dict[str, CallRecord] = field(default_factory=dict)
    skipped_lines: int = 0


class Store(Protocol):
    """Where call records live. `append` is sync and never blocks the loop; `load` returns every record."""

    def open(self) -> None: ...

    def append(self, record: CallRecord) -> None: ...

    async def load(self) -> Replay: ...

    def close(self) -> None: ...


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store several nodes share (bridge/cluster/): live-call slots and events across all of them."""

    node_id: str

    async def reserve(self, call_id: str, limit: int) -> bool:
        """Take one of `limit` live-call slots across all nodes (a terminal record releases it)."""
        ...

    def publish(self, message: dict[str, Any]) -> None:
        """Send an event to every node's subscribers, ordered after the writes queued before it."""
        ...

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """Every node's events, from the moment this returns."""
        ...

    async def flush(self) -> None:
        """Wait until queued writes and events reached the store."""
        ...

    async def aclose(self) -> None: ...


class CallStore:
    """Appends are small (one JSON line) and go through a lock-guarded, line-buffered file handle.

    A single write() of one line to an O_APPEND file is what makes a torn line possible only at the
    very end (a crash mid-write); replay skips such a line.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOG_NAME
        self._lock = threading.Lock()
        self._fh: TextIO | None = None

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - kept open for appends

    def _repair_tail(self) -> None:
        """A crash can leave a last line without newline; start our appends on a fresh line."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
        if last != b"\n":
            with open(self.path, "ab") as fh:
                fh.write(b"\n")

    def append(self, record: CallRecord) -> None:
        line = json.dumps(record.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._lock:
            if self._fh is None:
                self.open()
            assert self._fh is not None  # open() set it or raised
            self._fh.write(line)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def replay(self) -> Replay:
        return read_log(self.path)

    async def load(self) -> Replay:
        return self.replay()


def read_log(path: Path) -> Replay:
    """The last line per call wins; torn or corrupt lines are skipped with a warning."""
    result = Replay()
    if not path.exists():
        return result
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = CallRecord.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                result.skipped_lines += 1
                log.warning("call log %s line %d skipped (%s)", path, number, type(exc).__name__)
                continue
            result.calls[record.callId] = record
    return result
