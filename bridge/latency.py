"""Turn-latency statistics from the call log (one sample per completed `continue` turn)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def turn_samples(path: Path) -> list[float]:
    """Each (call, turn number) once: the log holds a full record per change, so turns repeat."""
    seen: dict[tuple[str, int], float] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
                meta = rec.get("metadata") or {}
                latency = meta.get("lastTurnLatencyMs")
                if latency is None:
                    continue
                seen.setdefault((rec["callId"], int(meta.get("turnCount", 0))), float(latency))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return list(seen.values())


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def latency_stats(path: Path, *, last: int = 200) -> dict[str, Any] | None:
    samples = turn_samples(path)[-last:]
    if not samples:
        return None
    ordered = sorted(samples)
    return {
        "count": len(ordered),
        "min": ordered[0],
        "avg": sum(ordered) / len(ordered),
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "max": ordered[-1],
    }
