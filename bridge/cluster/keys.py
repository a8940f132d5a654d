"""Redis key names, in one place so every node and `voicecall store import` agree."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "voicecall"

    def call(self, call_id: str) -> str:
        """Hash: `v` (version, bumped on every write) and `json` (the full CallRecord)."""
        return f"{self.prefix}:call:{call_id}"

    @property
    def calls(self) -> str:
        """Set of every call id ever stored (what a node loads on start)."""
        return f"{self.prefix}:calls"

    @property
    def started(self) -> str:
        """Sorted set: call id scored by startedAt (`voicecall.list` across the nodes, newest last)."""
        return f"{self.prefix}:started"

    @property
    def live(self) -> str:
        """Set of the ids of calls not yet ended, on every node: its size is the live-call count."""
        return f"{self.prefix}:live"

    def seen(self, key: str) -> str:
        """Processed event ids and webhook replay keys (SET NX with a TTL)."""
        return f"{self.prefix}:seen:{key}"

    @property
    def provider_prefix(self) -> str:
        """`<prefix>:pcid:<carrier call id>` -> our call id (a webhook names the carrier's id)."""
        return f"{self.prefix}:pcid:"

    def turn(self, call_id: str) -> str:
        return f"{self.prefix}:turn:{call_id}"

    @property
    def events(self) -> str:
        """Pub/sub channel carrying every node's `voicecall.subscribe` events."""
        return f"{self.prefix}:events"
