"""The call log: `<store>/calls.jsonl`, append-only, one full record per change; replayed on start."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from bridge.calls import CallRecord

log = logging.getLogger(__name__)

LOG_NAME = "calls.jsonl"

# What a call id may look like when it names a file (recordings): ours are UUIDs; one from the
# network is used only if it fits, else the call gets a UUID of ours.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def is_safe_id(value: str | None) -> bool:
    return bool(value) and SAFE_ID.match(value) is not None  # type: ignore[arg-type]


def child_path(folder: Path, name: str, suffix: str = "") -> Path:
    """`folder/name+suffix`, refused (ValueError) unless name is a safe id and the result stays in folder."""
    if not is_safe_id(name):
        raise ValueError(f"unsafe file name {name[:40]!r}")
    path = folder / f"{name}{suffix}"
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{name[:40]!r} leaves {folder}")
    return path


@dataclass(slots=True)
class Replay:
    calls: dict[str, CallRecord] = field(default_factory=dict)
    skipped_lines: int = 0


class Store(Protocol):
    """Where call records live. `append` is sync and never blocks the loop; `load` returns every record."""

    @property
    def degraded(self) -> bool:
        """Records are kept in memory because the store cannot take them right now."""
        ...

    @property
    def pending(self) -> int: ...

    @property
    def write_failures(self) -> int: ...

    @property
    def last_error(self) -> str | None: ...

    def open(self) -> None: ...

    def append(self, record: CallRecord) -> bool:
        """False: not written now (kept for a later `flush`)."""
        ...

    def flush(self) -> bool:
        """Try again to write what was kept; True when nothing is left."""
        ...

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

    async def drain(self) -> None:
        """Wait until queued writes and events reached the store."""
        ...

    async def aclose(self) -> None: ...


class CallStore:
    """Appends are small (one JSON line), each one os.write() to an O_APPEND descriptor under a lock.

    One write per line is what makes a torn line possible only at the very end (a crash or a full
    disk mid-write); reopening repairs it and replay skips it.

    When a write fails (read-only, disk full), the record is kept in memory, newest per call, and
    the store reports itself degraded; `flush()` (the manager retries on a timer) writes what was
    kept once the disk takes writes again, so a restart finds every call in its last state.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOG_NAME
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pending: dict[str, bytes] = {}  # callId -> its newest line not yet written
        self.write_failures = 0
        self.last_error: str | None = None

    @property
    def degraded(self) -> bool:
        return bool(self._pending)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def open(self) -> None:
        """Raises OSError when the folder or the log cannot be created or opened for appending."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _repair_tail(self) -> None:
        """A crash can leave a last line without newline; start our appends on a fresh line."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
        if last != b"\n":
            with open(self.path, "ab") as fh:
                fh.write(b"\n")

    def append(self, record: CallRecord) -> bool:
        """Write the record (after any kept from a failed write); False if it is kept in memory instead."""
        line = (record.json_text() + "\n").encode()
        with self._lock:
            self._pending.pop(record.callId, None)
            self._pending[record.callId] = line
            return self._flush_locked()

    def flush(self) -> bool:
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> bool:
        try:
            if self._fd is None:
                self.open()
            for call_id, line in list(self._pending.items()):
                view = memoryview(line)
                while view:
                    written = os.write(self._fd, view)  # type: ignore[arg-type]
                    view = view[written:]
                del self._pending[call_id]
        except OSError as exc:
            self.write_failures += 1
            self.last_error = exc.strerror or type(exc).__name__
            self._close_fd()  # reopen next time: the disk may come back as a new file or mount
            return False
        self.last_error = None
        return True

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def close(self) -> None:
        with self._lock:
            if self._pending:
                self._flush_locked()
            self._close_fd()

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
