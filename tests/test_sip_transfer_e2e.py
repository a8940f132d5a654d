"""Transfer on SIP through the whole bridge (RPC `voicecall.transfer`, the transfer controller, the
SIP carrier, pjsua in worker processes): cold with sipp as the transferee (a 2xx sipfrag ends the
call `transferred`; a 486 brings the caller back to the conversation, told why), and warm with a
real baresip as the person: it hears the briefing, then the caller's own audio (a tone only the
sipp caller sends) relayed by the bridge."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr

from bridge.calls import CallState, Direction
from media.tts.espeak import EspeakTts
from tests.harness import rpc_client, run_bridge, wait_for
from tests.peers.audio import read_pcm, silence_wav, tone_wav, ulaw_wav, windowed_alignment
from tests.peers.harness import skip_reason
from tests.peers.ports import bridge_rtp, bridge_sip, sipp_media, sipp_uac, sipp_uas
from tests.peers.sipp import run_sipp

_reason = skip_reason("sipp", "baresip", "espeak-ng", "sox")
pytestmark = [pytest.mark.realpeer, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

TARGET = "sip:agent@pbx.example.com"
CALLER_HZ = 700.0


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "provider": "sip", "inboundPolicy": "open", "inboundGreeting": "Hi.",
        "sip": {"bindAddress": "127.0.0.1", "port": bridge_sip(), "rtpPortStart": bridge_rtp(), "rtpPortRange": 100},
        "streaming": {"enabled": True, "provider": "none", "bargeIn": False},
        "tts": {"provider": "espeak"}, "responseModel": "offline",
        "outbound": {"defaultMode": "conversation"},
        "transfer": {"holdMessage": "One moment.", "briefing": "Caller: {summary}", "failureMessage": "Sorry, {reason}.",
                     "outcomeTimeoutMs": 10_000, "ringTimeoutMs": 10_000},
        **extra,
    }


@pytest.mark.parametrize(("frag", "state"), [("200 OK", CallState.TRANSFERRED), ("486 Busy Here", CallState.LISTENING)])
async def test_cold_transfer_over_rpc(tmp_path: Path, frag: str, state: CallState) -> None:
    port = sipp_uas()
    sipp = asyncio.create_task(run_sipp("uas_refer.xml", None, workdir=tmp_path / "uas", local_port=port,
                                        media_port=sipp_media(), timeout_s=30, keys={"frag": frag}))
    async with run_bridge(_config(), tmp_path / "store") as runtime:
        await asyncio.sleep(0.3)
        call = await runtime.manager.initiate(f"sip:callee@127.0.0.1:{port}", "Hello there.", "conversation")
        await wait_for(lambda: call.state == CallState.LISTENING, 20)
        result = await rpc_client(runtime).call("voicecall.transfer", {"callId": call.callId, "to": TARGET,
                                                                        "mode": "cold"})
        assert result["outcome"] == ("completed" if state is CallState.TRANSFERRED else "busy"), result
        assert call.transfer is not None and call.transfer.to == TARGET
        if state is CallState.TRANSFERRED:
            assert call.state is CallState.TRANSFERRED and call.metadata["transferredTo"] == TARGET
        else:
            await wait_for(lambda: call.state == CallState.LISTENING, 20)  # told why, then back to listening
            assert "busy" in call.transcript[-1].text and call.transcript[-1].speaker == "bot"
            await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})
            assert call.state is CallState.HANGUP_BOT
    result = await sipp  # sent the NOTIFYs and got the bridge's BYE either way
    assert result.ok, result.errors[-2000:] or result.output[-2000:]


def _band_share(pcm: np.ndarray, hz: float, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm)) ** 2
    freqs = np.fft.rfftfreq(len(pcm), 1 / rate)
    return float(spectrum[np.abs(freqs - hz) < 40].sum() / max(spectrum.sum(), 1e-9))


async def test_warm_transfer_to_baresip_briefs_then_relays_the_caller(tmp_path: Path) -> None:
    from tests.test_sip_lab import _softphone

    summary = "Sam, about Thursday."
    caller_dir = tmp_path / "caller"
    caller_dir.mkdir()
    ulaw_wav(tone_wav(tmp_path / "tone.wav", 1.0, (CALLER_HZ,)), caller_dir / "audio_ulaw.wav")
    quiet = silence_wav(tmp_path / "quiet.wav", 30.0)  # the person listens
    raw = _config()
    async with run_bridge(raw, tmp_path / "store") as runtime, _softphone(tmp_path, quiet) as (phone_dir, phone_port):
        manager = runtime.manager
        # sipp calls the bridge and keeps streaming its tone for 14 s, then hangs up (the greeting, the
        # transfer and the briefing come first: ~4 s on a quiet machine; 8 s ran out beside other tests)
        sipp = asyncio.create_task(run_sipp(
            "uac_audio.xml", f"127.0.0.1:{raw['sip']['port']}", workdir=caller_dir, local_port=sipp_uac(),
            media_port=sipp_media(), hold_ms=14_000, timeout_s=40))
        await wait_for(lambda: any(c.direction is Direction.INBOUND for c in manager.calls.values()), 10)
        call = next(c for c in manager.calls.values() if c.direction is Direction.INBOUND)
        await wait_for(lambda: call.state == CallState.LISTENING, 10)
        result = await rpc_client(runtime).call("voicecall.transfer", {
            "callId": call.callId, "to": f"sip:softphone@127.0.0.1:{phone_port}", "mode": "warm", "summary": summary})
        assert result["success"] and result["transfer"]["joined"] == "relay", result
        person_call = manager.calls[call.transfer.personCallId]  # type: ignore[union-attr]
        briefing = runtime.settings.transfer.briefing.replace("{summary}", summary)
        assert [t.text for t in person_call.transcript if t.speaker == "bot"] == [briefing]
        # the caller hangs up (sipp's BYE): the relay stops, the person's call ends too
        await wait_for(lambda: call.terminal and person_call.terminal, 25)
        assert call.state is CallState.TRANSFERRED and call.metadata["relayEndedBy"] == "caller"
        assert (await sipp).ok
    await asyncio.sleep(0.2)  # baresip finishes its WAV when the call closes
    heard_files = sorted((phone_dir / "rec").glob("dump-*-dec.wav"))
    assert heard_files, (phone_dir / "baresip.log").read_text(errors="replace")[-2000:]
    heard, rate = read_pcm(heard_files[-1])
    tts = EspeakTts()
    ref = b"".join([chunk async for chunk in tts.synthesize(briefing)])
    ref = soxr.resample(np.frombuffer(ref, dtype="<i2"), tts.sample_rate, rate).astype(np.float64)
    # the briefing, first: espeak's rendering of it is in what baresip heard, near the start
    head = heard[: len(ref) + 3 * rate]
    median, _ = windowed_alignment(ref, head, rate)
    assert median > 0.8, f"the person did not hear the briefing (r={median:.3f})"
    # then the caller: after the briefing, what baresip heard is the caller's tone
    tail = heard[len(ref) + rate:]
    voiced = tail[np.abs(tail) > 300]
    assert len(voiced) > rate, f"only {len(voiced) / rate:.2f} s relayed"
    assert _band_share(tail, CALLER_HZ, rate) > 0.8
    print(f"\n[sip warm transfer] briefing r={median:.3f}; relayed caller audio {len(tail) / rate:.1f} s, "
          f"{100 * _band_share(tail, CALLER_HZ, rate):.0f}% at {CALLER_HZ:.0f} Hz")
