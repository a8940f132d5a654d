"""`voicecall latency`: voice-to-voice turn latency and its parts, from the call log.

A turn is timed from the caller's end of speech (or the final transcript, when the recognizer is
the carrier's) to the first audio of the answer leaving for the caller (bridge/turnmarks.py), so
neither the bot's playback nor the caller's thinking time counts. Each call's newest record holds
its timed turns in `turns` (`CallRecord.turns`; older logs: `metadata.turns` or `turnTimings`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bridge.calls import TurnRecord, turns_of
from bridge.turnmarks import PARTS

PART_ORDER = ("total", *PARTS)
PERCENTILES = (50, 95, 99)


def turn_records(path: Path) -> list[dict[str, Any]]:
    """Timed turns of every call in the log, oldest call first (the last line per call wins)."""
    newest: dict[str, tuple[float, list[TurnRecord]]] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
                turns = turns_of(rec)  # CallRecord.turns, or the two older shapes
                if turns:
                    newest[str(rec["callId"])] = (float(rec.get("startedAt") or 0), turns)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    ordered = sorted(newest.items(), key=lambda item: item[1][0])
    return [{**turn.to_json(), "callId": call_id} for call_id, (_, turns) in ordered for turn in turns]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values) / 100 - 1e-9)))
    return sorted_values[rank - 1]


def latency_stats(path: Path, *, last: int = 200) -> dict[str, Any] | None:
    """Per part: count, p50/p95/p99, min, max (ms) over the newest `last` turns; None without turns."""
    turns = turn_records(path)[-last:]
    if not turns:
        return None
    parts: dict[str, Any] = {}
    for part in PART_ORDER:
        values = sorted(float(t[f"{part}Ms"]) for t in turns if isinstance(t.get(f"{part}Ms"), (int, float)))
        if values:
            parts[part] = {"count": len(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES},
                           "min": values[0], "max": values[-1]}
    return {"turns": len(turns), "calls": len({t["callId"] for t in turns}), "parts": parts}


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"voice-to-voice turn latency over {stats['turns']} turn(s) in {stats['calls']} call(s), ms",
             ("(from the caller's end of speech to the first audio of the answer; playback and the caller's "
              "thinking time excluded)"),
             f"  {'part':<8}{'count':>6}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"]
    for part, s in stats["parts"].items():
        lines.append(f"  {part:<8}{s['count']:>6}{s['p50']:>8.0f}{s['p95']:>8.0f}{s['p99']:>8.0f}{s['max']:>8.0f}")
    missing = [p for p in PART_ORDER if p not in stats["parts"]]
    if missing:
        lines.append(f"  (not measured on these calls: {', '.join(missing)})")
    return "\n".join(lines)
