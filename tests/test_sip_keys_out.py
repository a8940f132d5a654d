"""Keys out on SIP, seen on the wire: the bridge calls a sipp callee whose SDP answer puts its audio
(and telephone-event on payload type 101) at a port the test listens on, and the digits must arrive
there as RFC 4733 events: the negotiated payload type, the right event codes, end bit set. Through
the manager, `dtmfSequence` is sent after the answer with `w` as a 0.5 s pause."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bridge.calls import CallState, EventType
from carriers.base import OutboundRequest
from carriers.sip.settings import SipSettings
from tests.harness import run_bridge, wait_for
from tests.peers.harness import running_carrier, skip_reason
from tests.peers.ports import bridge_rtp, bridge_sip, rtp_listener, sipp_media, sipp_uas
from tests.peers.rtp import KeyPress, RtpSink
from tests.peers.sipp import SippResult, run_sipp

_reason = skip_reason("sipp")
pytestmark = [pytest.mark.realpeer, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

TELEPHONE_EVENT_PT = 101  # what the callee's answer names (the bridge's offer may use another number)
DIGIT_TS = 8  # timestamp units per ms at 8 kHz


async def _callee(tmp_path: Path, rtp_port: int) -> tuple[asyncio.Task[SippResult], str]:
    port = sipp_uas()
    task = asyncio.create_task(run_sipp("uas_answer.xml", None, workdir=tmp_path / "uas", local_port=port,
                                        media_port=sipp_media(), timeout_s=20, keys={"rtp_port": str(rtp_port)}))
    await asyncio.sleep(0.3)  # let sipp bind
    return task, f"sip:callee@127.0.0.1:{port}"


async def _presses(sink: RtpSink, count: int, timeout: float = 10) -> list[KeyPress]:
    await wait_for(lambda: sum(p.ended for p in sink.key_presses(TELEPHONE_EVENT_PT)) >= count, timeout)
    return sink.key_presses(TELEPHONE_EVENT_PT)


async def test_send_dtmf_goes_out_as_rfc4733_events(tmp_path: Path) -> None:
    settings = SipSettings(port=bridge_sip(), rtpPortStart=bridge_rtp(), rtpPortRange=100, workers=2)
    sink = await RtpSink.open(rtp_listener())
    try:
        async with running_carrier(settings) as (host, carrier):
            sipp, uri = await _callee(tmp_path, sink_port(sink))
            record = host.outbound_record(uri)
            pid = await carrier.initiate_call(record, OutboundRequest(uri, "", "hi", "notify", True))
            record.providerCallId = pid
            await host.wait_for(EventType.ACTIVE, pid)
            await wait_for(lambda: len(sink.packets) > 5)  # audio flows to the callee's port
            await carrier.send_dtmf(record, "159#*0AD")
            presses = await _presses(sink, 8)
            await carrier.hangup_call(record, CallState.HANGUP_BOT)
            result = await sipp
            assert result.ok, result.errors[-2000:] or result.output[-2000:]
    finally:
        sink.close()
    assert "".join(p.digit for p in presses) == "159#*0AD", presses
    assert all(p.ended and p.marked for p in presses), presses
    # Call.dialDtmf sends each digit for pjmedia's PJMEDIA_DTMF_DURATION: 1600 units = 200 ms at 8 kHz
    assert all(p.duration == 200 * DIGIT_TS for p in presses), [p.duration for p in presses]
    audio_pts = {p.payload_type for p in sink.packets} - {TELEPHONE_EVENT_PT}
    assert audio_pts == {0}, audio_pts  # PCMU audio around the events, nothing else


def sink_port(sink: RtpSink) -> int:
    assert sink.transport is not None
    return int(sink.transport.get_extra_info("sockname")[1])
def _config() -> dict[str, Any]:
    return {
        "provider": "sip",
        "sip": {"bindAddress": "127.0.0.1", "port": bridge_sip(), "rtpPortStart": bridge_rtp(), "rtpPortRange": 100},
        "streaming": {"enabled": True, "provider": "none"},
        "tts": {"provider": "espeak"},
        "outbound": {"defaultMode": "notify", "notifyHangupDelaySec": 1},
    }


async def test_dtmf_sequence_after_answer_with_a_pause(tmp_path: Path) -> None:
    sink = await RtpSink.open(rtp_listener())
    try:
        async with run_bridge(_config(), tmp_path / "store") as runtime:
            sipp, uri = await _callee(tmp_path, sink_port(sink))
            call = await runtime.manager.initiate(uri, "Extension dialled.", "notify", dtmf_sequence="12w3")
            presses = await _presses(sink, 3)
            await wait_for(lambda: call.terminal, 20)
            assert call.state is CallState.HANGUP_BOT, call
            assert call.metadata.get("dtmfSequenceSent") is True
            result = await sipp
            assert result.ok, result.errors[-2000:] or result.output[-2000:]
    finally:
        sink.close()
    assert [p.digit for p in presses] == ["1", "2", "3"] and all(p.ended for p in presses), presses
    one_after_two = presses[1].started_at - presses[0].started_at
    pause = presses[2].started_at - (presses[1].started_at + 0.2)  # from the end of "2" (200 ms) to "3"
    # "12" is one dialDtmf: 2 follows right after 1; `w` is 0.5 s of quiet once "12" is out.
    assert one_after_two < 0.3, one_after_two
    assert 0.5 <= pause < 1.0, pause
    print(f"\n[sip keys out] 1->2 {one_after_two * 1000:.0f} ms apart; quiet between 2 and 3 across `w`: "
          f"{pause * 1000:.0f} ms")
