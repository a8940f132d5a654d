"""Restart recovery of a call whose callee was still being classified when the process stopped.

- The carrier's own detector (here Telnyx, end to end): the carrier still calls back, to the same
  public URL, now served by the new process, which waits for it (for the rest of the carrier's wait)
  and acts on it as usual: a machine in hangup mode is hung up.
- The local detector: its audio went with the old process, so the call is `unknown` (cause RESTART)
  and goes on as a normal call; nothing is said again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.calls import CallEvent, CallRecord, CallState, EventType
from bridge.config import build_settings
from bridge.manager import CallManager
from bridge.store import CallStore
from carriers.base import ProviderStatus
from media.clock import FakeClock
from tests.fakes.carrier import RecordingCarrier
from tests.fakes.telnyx_server import FakeTelnyx
from tests.harness import run_bridge, wait_for

MACHINE = "+15550000005"


async def test_native_verdict_after_a_restart_is_applied_by_the_new_process(tmp_path: Path) -> None:
    async with FakeTelnyx() as telnyx:
        telnyx.amd_s = 3.0  # the verdict comes 3 s after the answer: the first process is gone by then
        cfg: dict[str, Any] = {"provider": "telnyx", "fromNumber": "+15550001234", "telnyx": telnyx.config(),
                               "outbound": {"machineDetection": "hangup"}, "responseModel": "none",
                               "tts": {"provider": "espeak"}, "streaming": {"enabled": False}}
        async with run_bridge(cfg, tmp_path) as first:
            call = await first.manager.initiate(MACHINE, "Hello there.", "notify")
            await wait_for(lambda: call.answeredAt is not None, timeout=10)
            assert "answeredBy" not in call.metadata and call.metadata["amdNative"] is True
            first.crashed = True
        tx = telnyx.calls[call.providerCallId or ""]
        assert tx.alive and not [e for e, _ in tx.webhooks if e.startswith("call.machine")]
        async with run_bridge(cfg, tmp_path) as second:
            # the public URL now reaches the new process
            tx.webhook_url = second.manager.webhook_url(callId=call.callId)
            restored = second.manager.calls[call.callId]
            assert not restored.terminal and call.callId in second.manager._machine  # noqa: SLF001
            await wait_for(lambda: restored.terminal, timeout=10)
            assert restored.state == CallState.HANGUP_BOT
            assert (restored.metadata["answeredBy"], restored.metadata["amdCause"]) == (
                "machine", "telnyx:detection:machine")
            assert tx.received.count("hangup") == 1 and not tx.alive


class Carrier(RecordingCarrier):
    streams_media = True
    media_always = True


def manager(tmp_path: Path, clock: FakeClock, carrier: Carrier) -> CallManager:
    raw = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "store": str(tmp_path),
           "outbound": {"machineDetection": "leave-message"}}
    return CallManager(build_settings(raw, {}), carrier, clock=clock, store=CallStore(tmp_path))


async def test_local_detection_cut_by_a_restart_is_unknown(tmp_path: Path) -> None:
    clock = FakeClock()
    first_carrier = Carrier()
    first = manager(tmp_path, clock, first_carrier)
    await first.start()
    call = await first.initiate(None, "Hi, the clinic here.", "conversation")
    first.process_event(CallEvent(EventType.ANSWERED, call_id=call.callId))
    await first.drain()
    assert call.callId in first._machine and "answeredBy" not in call.metadata  # noqa: SLF001
    # the process dies here (no stop: nothing more is written)
    await clock.advance(1.5)
    carrier = Carrier()
    carrier.status[call.providerCallId or ""] = ProviderStatus(terminal=False, state=CallState.ANSWERED)
    second = manager(tmp_path, clock, carrier)
    events = second.subscribe()
    await second.start()
    await second.drain()
    restored: CallRecord = second.calls[call.callId]
    assert not restored.terminal
    assert (restored.metadata["answeredBy"], restored.metadata["amdCause"]) == ("unknown", "RESTART")
    assert restored.metadata["amdDecisionMs"] == 1500
    assert call.callId not in second._machine, "the call goes on as a normal call"  # noqa: SLF001
    assert carrier.spoken == [] and carrier.hangups == [], "nothing said again, nothing hung up"
    kinds = []
    while not events.empty():
        kinds.append(events.get_nowait()["type"])
    assert "call.answered_by" in kinds
    reloaded = await CallStore(tmp_path).load()
    assert reloaded.calls[call.callId].metadata["answeredBy"] == "unknown", "the verdict is in the call log"
    await second.stop()
    await first.stop()
