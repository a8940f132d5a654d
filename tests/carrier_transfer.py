"""What the carrier transfer tests (tests/test_transfer_{plivo,telnyx,twilio}.py) share: the transfer
settings, a live conversation call to transfer, the warm transfer's first half (the person dialled
and briefed) and the loudness of what a leg heard."""

from __future__ import annotations

from typing import Any

import numpy as np

from bridge.calls import CallRecord, CallState
from bridge.runtime import Runtime
from tests.harness import rpc_client, wait_for

TRANSFER: dict[str, Any] = {"ringTimeoutMs": 20_000, "outcomeTimeoutMs": 20_000, "holdMessage": "One moment.",
                            "briefing": "{summary}", "failureMessage": "Sorry, {reason}."}
SUMMARY = "Sam, about Thursday."


def rms(pcm: bytes) -> float:
    """Root mean square of 16-bit little-endian PCM (0 for none)."""
    samples = np.frombuffer(bytes(pcm), dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


async def live_call(runtime: Runtime) -> CallRecord:
    """An outbound conversation call placed over RPC, once the bot listens (its greeting said)."""
    result = await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"})
    call = runtime.manager.calls[result["callId"]]
    await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
    return call


async def warm_transfer(runtime: Runtime, call: CallRecord, person: str) -> CallRecord:
    """Warm-transfer `call` to `person` over RPC; checks the legs were joined at the carrier and the bot
    said the briefing (with SUMMARY) on the person's call. The person's call."""
    result = await rpc_client(runtime).call("voicecall.transfer", {
        "callId": call.callId, "to": person, "mode": "warm", "summary": SUMMARY})
    assert result["success"] and result["transfer"]["joined"] == "carrier"
    assert call.transfer is not None and call.transfer.personCallId
    person_call = runtime.manager.calls[call.transfer.personCallId]
    briefing = runtime.settings.transfer.briefing.replace("{summary}", SUMMARY)
    assert [t.text for t in person_call.transcript if t.speaker == "bot"] == [briefing]
    return person_call
