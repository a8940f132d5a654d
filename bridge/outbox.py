"""A small persistent outbox: `<store>/outbox.jsonl`, next to the call log.

Append-only lines, each fsync'd before the call returns:
    {"op": "add", "id", "body", "createdAt"}     a report to deliver (body = the exact JSON text)
    {"op": "try", "id", "attempts", "nextAt"}   a failed attempt, and when to try again (wall clock)
    {"op": "done", "id"} | {"op": "dead", "id"}  delivered | given up after maxAttempts
Replay on open gives the entries still pending; a torn last line (crash mid-write) is skipped.
`compact` rewrites the file with only the pending entries (a new file, fsync'd, renamed over the
old one), on start and whenever the file has grown past `COMPACT_BYTES` with nothing in flight.
Blocking file I/O: the async caller runs these methods in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

OUTBOX_NAME = "outbox.jsonl"
COMPACT_BYTES = 1 << 20


@dataclass(slots=True)
class Pending:
    id: str
    body: str
    created_at: float
    attempts: int = 0
    next_at: float = 0.0


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.path = directory / OUTBOX_NAME
        self._lock = threading.Lock()

    def repair(self) -> None:
        """A crash can leave a torn last line; start the next append on a fresh line."""
        with self._lock:
            if not self.path.exists() or self.path.stat().st_size == 0:
                return
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                last = fh.read(1)
            if last != b"\n":
                with open(self.path, "ab") as fh:
                    fh.write(b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())

    def pending(self) -> list[Pending]:
        """Entries added and neither delivered nor given up, oldest first."""
        entries: dict[str, Pending] = {}
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, start=1):
                try:
                    item = json.loads(line)
                    op, entry_id = item["op"], str(item["id"])
                    if op == "add":
                        entries[entry_id] = Pending(entry_id, str(item["body"]), float(item["createdAt"]))
                    elif op == "try" and entry_id in entries:
                        entries[entry_id].attempts = int(item["attempts"])
                        entries[entry_id].next_at = float(item["nextAt"])
                    elif op in ("done", "dead"):
                        entries.pop(entry_id, None)
                except (ValueError, KeyError, TypeError):
                    log.warning("outbox %s line %d skipped (unreadable)", self.path, number)
        return list(entries.values())

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def compact(self, larger_than: int = 0) -> None:
        """Keep only what is pending (with its attempt count); crash-safe by rename."""
        with self._lock:
            if not self.path.exists() or self.size() <= larger_than:
                return
            lines = []
            for entry in self.pending():
                lines.append({"op": "add", "id": entry.id, "body": entry.body, "createdAt": entry.created_at})
                if entry.attempts:
                    lines.append({"op": "try", "id": entry.id, "attempts": entry.attempts, "nextAt": entry.next_at})
            tmp = self.path.with_suffix(".jsonl.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(item, separators=(",", ":"), ensure_ascii=False) + "\n" for item in lines)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            self._sync_dir()

    def add(self, entry: Pending) -> None:
        self._append({"op": "add", "id": entry.id, "body": entry.body, "createdAt": entry.created_at})

    def attempted(self, entry: Pending) -> None:
        self._append({"op": "try", "id": entry.id, "attempts": entry.attempts, "nextAt": entry.next_at})

    def done(self, entry_id: str) -> None:
        self._append({"op": "done", "id": entry_id})

    def dead(self, entry_id: str) -> None:
        self._append({"op": "dead", "id": entry_id})

    def _append(self, item: dict[str, object]) -> None:
        line = json.dumps(item, separators=(",", ":"), ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            if new:  # the file's directory entry must survive a crash too
                self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
