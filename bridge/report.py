"""The after-call report: what a `hooks.callEnded` receiver gets, and how it is signed (pure).

Body: one JSON object per call (below), identical on every retry. Headers:
    X-Voicecall-Event: call.ended
    X-Voicecall-Delivery: <deliveryId>          (the same on every retry: dedupe on it)
    X-Voicecall-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>
`t` is the time of the attempt; a receiver recomputes v1 over the raw body bytes, compares in
constant time, and refuses a `t` older than its tolerance (5 minutes by default here).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from bridge.calls import CallRecord

EVENT = "call.ended"
SIGNATURE_HEADER = "X-Voicecall-Signature"
DELIVERY_HEADER = "X-Voicecall-Delivery"
EVENT_HEADER = "X-Voicecall-Event"
TOLERANCE_S = 300


def build_report(call: CallRecord, *, delivery_id: str, recording: str | None = None) -> dict[str, Any]:
    view = call.public_view()
    meta = view.get("metadata") or {}
    latencies: dict[str, Any] = {key: meta[key] for key in ("turnLatenciesMs", "lastTurnLatencyMs",
                                                            "lastTurnListenWaitMs", "lastResponseLatencyMs") if key in meta}
    if call.turns:  # voice-to-voice turns, per part (bridge/turnmarks.py)
        latencies["turns"] = [t.to_json() for t in call.turns]
    duration = round(call.endedAt - call.answeredAt, 3) if call.endedAt and call.answeredAt else None
    return {
        "event": EVENT,
        "deliveryId": delivery_id,
        "callId": call.callId,
        "provider": call.provider,
        "direction": str(call.direction),
        "from": call.from_,
        "to": call.to,
        "startedAt": call.startedAt,
        "answeredAt": call.answeredAt,
        "endedAt": call.endedAt,
        "durationSec": duration,
        "endReason": call.endReason,
        "answeredBy": meta.get("answeredBy"),
        "transfer": view.get("transfer"),  # CallRecord.transfer: mode, to, outcome, joined, ... (null: none)
        "recording": recording,
        "transcript": view["transcript"],
        "latencies": latencies,
        "record": view,
    }


def encode(report: dict[str, Any]) -> bytes:
    return json.dumps(report, separators=(",", ":"), ensure_ascii=False).encode()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance_s: float = TOLERANCE_S) -> bool:
    """What a receiver does with X-Voicecall-Signature (also used by the tests)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))
