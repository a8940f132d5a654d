"""Transfer end to end on the mock carrier, through the real server and RPC: cold to a person who
answers (the call ends `transferred`), cold to a busy line (the caller is told and the call goes
on), warm to the 0006 person through the local relay (the person hears the briefing — checked by
correlating what reached the person's ear with espeak's rendering of it — then the caller's own
voice, a tone only the caller sends), and warm to a number that never answers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soxr

from bridge.calls import CallState
from media.tts.espeak import EspeakTts
from tests.harness import rpc_client, run_bridge, wait_for

pytestmark = pytest.mark.skipif(not EspeakTts.available(), reason="espeak-ng not installed")

FAST_MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0,
             "calleeScript": [], "noAnswerAfterMs": 300, "transferLine": "Hello?"}
BASE: dict[str, Any] = {
    "provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "maxConcurrentCalls": 2,
    "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
    "responseModel": "offline", "mock": FAST_MOCK, "outbound": {"notifyHangupDelaySec": 1},
    "transfer": {"ringTimeoutMs": 5000, "outcomeTimeoutMs": 5000, "holdMessage": "One moment.", "briefing": "{summary}", "failureMessage": "Sorry, {reason}."}}


async def live_call(runtime: Any) -> Any:
    result = await rpc_client(runtime).call("voicecall.initiate", {
        "to": "+15550007777", "message": "Hi.", "mode": "conversation"})
    call = runtime.manager.calls[result["callId"]]
    await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
    return call


async def events_of(ws: aiohttp.ClientWebSocketResponse, until: str, timeout: float = 20) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not out or out[-1].get("type") != until:
            msg = await ws.receive_json()
            if msg.get("method") == "voicecall.event":
                out.append(msg["params"])
    return out


async def test_cold_transfer_ends_the_call_transferred(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://127.0.0.1:{runtime.port}/rpc")
        await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "voicecall.subscribe"})
        assert (await ws.receive_json())["result"] == {"subscribed": True}
        call = await live_call(runtime)
        result = await rpc_client(runtime).call("voicecall.transfer", {
            "callId": call.callId, "to": "+15550009999", "mode": "cold"})
        assert result["success"] and result["outcome"] == "completed" and result["state"] == "transferred"
        assert call.state == CallState.TRANSFERRED and call.endReason == "transferred"
        assert call.transfer is not None and (call.transfer.mode, call.transfer.to) == ("cold", "+15550009999")
        assert call.metadata["transferredTo"] == "+15550009999"
        assert runtime.carrier.transfers == [(call.callId, "+15550009999", "completed")]
        assert runtime.carrier.callee(call.callId).transferred
        assert (call.callId, "transferred") not in runtime.carrier.hangups  # the bridge left; nobody was hung up
        events = await events_of(ws, "call.ended")
        transfer = [e for e in events if e["type"] == "call.transfer"]
        assert [(e["phase"], e.get("outcome")) for e in transfer] == [("started", None), ("outcome", "completed")]
        assert events[-1]["reason"] == "transferred"
        status = await rpc_client(runtime).call("voicecall.status", {"callId": call.callId})
        assert status["call"]["transfer"]["outcome"] == "completed"
        await ws.close()


async def test_cold_transfer_to_a_busy_line_comes_back_to_the_caller(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        call = await live_call(runtime)
        result = await rpc_client(runtime).call("voicecall.transfer", {
            "callId": call.callId, "to": "+15550000002", "mode": "cold"})
        assert not result["success"] and result["outcome"] == "busy"
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        assert "busy" in call.transcript[-1].text and call.transcript[-1].speaker == "bot"
        assert call.transfer is not None and call.transfer.outcome == "busy"
        # bad requests: one clear line each, nothing changes
        for params, words in (({"callId": call.callId, "to": "12"}, "E.164"),
                              ({"callId": call.callId, "to": "+15550009999", "mode": "lukewarm"}, "cold or warm")):
            with pytest.raises(Exception, match=words):
                await rpc_client(runtime).call("voicecall.transfer", params)
        assert call.state == CallState.LISTENING and call.transfer.outcome == "busy"
        # the call goes on: the bridge still speaks to the caller, then hangs up normally
        await rpc_client(runtime).call("voicecall.speak", {"callId": call.callId, "message": "Anything else?"})
        await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})
        assert call.state == CallState.HANGUP_BOT


def tone(hz: float, seconds: float, rate: int = 8000) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (9000 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def band_share(pcm: np.ndarray, hz: float, rate: int = 8000) -> float:
    """Share of the signal's energy within ±40 Hz of `hz`."""
    spectrum = np.abs(np.fft.rfft(pcm)) ** 2
    freqs = np.fft.rfftfreq(len(pcm), 1 / rate)
    return float(spectrum[np.abs(freqs - hz) < 40].sum() / max(spectrum.sum(), 1e-9))


def best_correlation(heard: np.ndarray, ref: np.ndarray) -> float:
    n = len(heard) + len(ref)
    size = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(heard, size) * np.conj(np.fft.rfft(ref, size)), size)
    lag = int(np.argmax(xc))
    if lag > size // 2:
        lag -= size
    a, b = heard[max(0, lag):], ref[max(0, -lag):]
    m = min(len(a), len(b))
    return float(np.corrcoef(a[:m], b[:m])[0, 1])


async def test_warm_transfer_briefs_the_person_then_relays_the_caller(tmp_path: Path) -> None:
    summary = "Sam, about Thursday."
    async with run_bridge(BASE, tmp_path) as runtime:
        call = await live_call(runtime)
        result = await rpc_client(runtime).call("voicecall.transfer", {
            "callId": call.callId, "to": "+15550000006", "mode": "warm", "summary": summary})
        assert result["success"] and result["transfer"]["joined"] == "relay"
        record = call.transfer
        assert record is not None and record.summary == summary and record.personCallId
        person_call = runtime.manager.calls[record.personCallId]
        assert person_call.metadata["transferOf"] == call.callId and person_call.state != CallState.TRANSFERRED
        briefing = runtime.settings.transfer.briefing.replace("{summary}", summary)
        assert [t.text for t in person_call.transcript if t.speaker == "bot"] == [briefing]
        assert call.transcript[-1].text == runtime.settings.transfer.holdMessage
        assert call.state == CallState.TRANSFERRING and not call.terminal
        person = runtime.carrier.callee(person_call.callId)
        caller = runtime.carrier.callee(call.callId)
        briefed = len(person.heard)
        # what reached the person's ear is the briefing: espeak's own rendering of it, at 8 kHz
        tts = EspeakTts()
        ref = b"".join([chunk async for chunk in tts.synthesize(briefing)])
        ref8k = soxr.resample(np.frombuffer(ref, dtype="<i2"), tts.sample_rate, 8000).astype(np.float64)
        heard = np.frombuffer(bytes(person.heard), dtype="<i2").astype(np.float64)
        assert best_correlation(heard, ref8k) > 0.8
        # now the caller's own voice (a 700 Hz tone nobody else sends) reaches the person
        await caller.play(tone(700, 0.6), 8000)
        await wait_for(lambda: len(person.heard) - briefed >= 8000 * 2 * 0.5, timeout=10)
        relayed = np.frombuffer(bytes(person.heard[briefed:]), dtype="<i2").astype(np.float64)
        assert band_share(relayed, 700) > 0.8
        # and the person's voice reaches the caller
        caller_heard = len(caller.heard)
        await person.play(tone(1100, 0.6), 8000)
        await wait_for(lambda: len(caller.heard) - caller_heard >= 8000 * 2 * 0.5, timeout=10)
        back = np.frombuffer(bytes(caller.heard[caller_heard:]), dtype="<i2").astype(np.float64)
        assert band_share(back, 1100) > 0.8
        # the person hangs up: both calls end, the caller's `transferred`
        person.hang_up()
        await wait_for(lambda: call.terminal, timeout=10)
        assert call.state == CallState.TRANSFERRED and call.metadata["relayEndedBy"] == "person"
        assert person_call.terminal


async def test_warm_transfer_nobody_answers_back_to_the_caller(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        call = await live_call(runtime)
        result = await rpc_client(runtime).call("voicecall.transfer", {
            "callId": call.callId, "to": "+15550000003", "mode": "warm", "summary": "A question."})
        assert result["outcome"] == "no-answer" and not result["success"]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
        assert "nobody answered" in call.transcript[-1].text
        person_call = runtime.manager.calls[call.transfer.personCallId]
        assert person_call.state == CallState.NO_ANSWER
        assert not call.terminal


async def test_warm_transfer_in_speech_to_speech_mode_mutes_the_model(tmp_path: Path) -> None:
    """The person's call gets a plain TTS voice for the briefing (no realtime session of its own), and
    once the two are relayed the caller's model hears nothing more."""
    from bridge.voice import CallVoice
    from tests.fakes.openai_realtime_server import FakeOpenAIRealtime

    rt = await FakeOpenAIRealtime(transcripts=[], replies=[]).start()
    try:
        config = {**BASE, "realtime": {"enabled": True, "provider": "openai", "apiKey": rt.api_key,
                                       "baseUrl": rt.base_url, "model": "gpt-realtime", "instructions": "Be brief."}}
        async with run_bridge(config, tmp_path) as runtime:
            result = await rpc_client(runtime).call("voicecall.initiate", {"message": "Hi.", "mode": "conversation"})
            call = runtime.manager.calls[result["callId"]]
            await wait_for(lambda: call.state == CallState.LISTENING, timeout=20)
            result = await rpc_client(runtime).call("voicecall.transfer", {
                "callId": call.callId, "to": "+15550000006", "mode": "warm", "summary": "Sam, about Thursday."})
            assert result["transfer"]["joined"] == "relay"
            person_call = runtime.manager.calls[call.transfer.personCallId]
            assert isinstance(runtime.manager.voice(person_call.callId), CallVoice)
            assert len(rt.sessions) == 1, "only the caller's call has a model session"
            caller_voice = runtime.manager.voice(call.callId)
            assert caller_voice.muted
            caller = runtime.carrier.callee(call.callId)
            person = runtime.carrier.callee(person_call.callId)
            briefed = len(person.heard)
            await caller.play(tone(700, 0.6), 8000)
            await wait_for(lambda: len(person.heard) - briefed >= 8000 * 2 * 0.5, timeout=10)
            relayed = np.frombuffer(bytes(person.heard[briefed:]), dtype="<i2").astype(np.float64)
            assert band_share(relayed, 700) > 0.8
            session = rt.sessions[0]
            model_heard = np.frombuffer(bytes(session.audio), dtype="<i2").astype(np.float64)
            assert session.rate == 8000 and band_share(model_heard, 700) < 0.05, \
                "the muted model got none of the caller's words to the person"
    finally:
        await rt.stop()
