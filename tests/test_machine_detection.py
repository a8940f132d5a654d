"""Machine detection in the manager, on the fake clock: the callee's audio goes in as u-law frames
through a real MediaPipeline (its caller-audio tap feeds the detector), 20 ms of audio per 20 ms of
clock. Then end to end on the mock carrier through the real server: a 0005 answering machine gets
the message after its beep and the call ends `voicemail`; a person gets the normal call."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soxr

from bridge.calls import CallEvent, CallRecord, CallState, EventType
from bridge.config import build_settings
from bridge.manager import CallManager
from bridge.responder import OfflineResponder
from bridge.store import CallStore
from bridge.voice import Spoken
from media import g711
from media.clock import FakeClock
from media.formats import ULAW_8K, AudioEncoding, AudioFormat
from media.pipeline import MediaPipeline
from tests.fakes.amd_set import MACHINE_TEXTS, human, machine, silence, tone
from tests.fakes.carrier import RecordingCarrier
from tests.fakes.report_receiver import SECRET, Receiver
from tests.harness import rpc_client, run_bridge, wait_for

FRAME = 320  # 20 ms of PCM16 at 8 kHz


class MediaCarrier(RecordingCarrier):
    """The recording carrier with a media leg, like SIP or the mock: audio flows through a bridge."""

    streams_media = True
    media_always = True


class SilentLeg:
    """The carrier side of the media leg: takes what the bridge plays (no marks)."""

    supports_marks = False

    def __init__(self, format: AudioFormat = ULAW_8K) -> None:
        self.format = format
        self.sent = 0

    async def send_media(self, payload: bytes) -> None:
        self.sent += 1

    async def send_mark(self, name: str) -> None:
        return None

    async def send_clear(self) -> None:
        return None


class FakeVoice:
    """A call voice whose `say` takes no time and records what was said, and when (fake clock)."""

    def __init__(self, clock: FakeClock, transport: SilentLeg) -> None:
        self.clock = clock
        self.bridge = MediaPipeline(transport, self, clock=clock, inband_dtmf=False, vad_barge_in=False)
        self.said: list[tuple[float, str]] = []

    def on_pipeline_audio(self, pcm: bytes) -> None:
        return None

    def on_dtmf(self, digit: str) -> None:
        return None

    def on_speech_started(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def say(self, text: str) -> Spoken:
        self.said.append((self.clock.monotonic(), text))
        return Spoken(text, text, False, 1000.0, 1000.0)

    async def close(self) -> None:
        await self.bridge.close()


def make(tmp_path: Path, mode: str, **amd: Any) -> tuple[CallManager, MediaCarrier, FakeClock, list[FakeVoice]]:
    raw = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "store": str(tmp_path),
           "outbound": {"notifyHangupDelaySec": 1, "machineDetection": mode}, "amd": amd}
    clock = FakeClock()
    voices: list[FakeVoice] = []

    def factory(call: CallRecord, transport: Any, emit: Any) -> FakeVoice:
        voices.append(FakeVoice(clock, transport))
        return voices[-1]

    carrier = MediaCarrier()
    manager = CallManager(build_settings(raw, {}), carrier, clock=clock, store=CallStore(tmp_path),
                          voice_factory=factory, responder=OfflineResponder())
    return manager, carrier, clock, voices


async def answer(manager: CallManager, message: str = "This is the pharmacy: your order is ready.",
                 mode: str = "notify", leg: SilentLeg | None = None) -> tuple[CallRecord, Any]:
    await manager.start()
    events = manager.subscribe()
    call = await manager.initiate(None, message, mode)
    bridge = manager.attach_media(call.callId, leg or SilentLeg())
    manager.process_event(CallEvent(EventType.ANSWERED, call_id=call.callId))
    await settle()
    return call, (bridge, events)


async def play(clock: FakeClock, bridge: MediaPipeline, pcm: bytes, until: Any = None) -> None:
    """Send the callee's audio in real-time frames on the fake clock (stop early once `until()`)."""
    wire = bridge.wire
    if wire.rate != 8000:
        pcm = soxr.resample(np.frombuffer(pcm, dtype="<i2"), 8000, wire.rate).astype("<i2").tobytes()
    frame = wire.rate // 50 * 2
    for offset in range(0, len(pcm), frame):
        bridge.receive(g711.encode(pcm[offset:offset + frame].ljust(frame, b"\0"), wire.encoding))
        await clock.advance(0.02)
        if until is not None and until():
            return


async def settle() -> None:
    """Let spawned work run its course up to its next wait on the fake clock."""
    for _ in range(20):
        await asyncio.sleep(0)


def published(events: asyncio.Queue[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    out = []
    while not events.empty():
        event = events.get_nowait()
        if event["type"] == kind:
            out.append(event)
    return out


async def test_hangup_mode_ends_a_machine_at_the_verdict(tmp_path: Path) -> None:
    manager, carrier, clock, voices = make(tmp_path, "hangup")
    call, (bridge, events) = await answer(manager)
    greeting = machine(MACHINE_TEXTS[1], "en-us", 165, beep_hz=1000.0, snr_db=20.0, seed=1)
    await play(clock, bridge, greeting.pcm, until=lambda: call.terminal)
    await settle()
    assert call.state == CallState.HANGUP_BOT and carrier.hangups == [(call.callId, CallState.HANGUP_BOT)]
    assert call.metadata["answeredBy"] == "machine" and call.metadata["amdCause"].startswith("MAXWORDS")
    assert voices[0].said == [], "nothing is said to a machine in hangup mode"
    # decided within the greeting, long before it ends
    assert call.metadata["amdDecisionMs"] < 3000 < greeting.speech_ms
    (event,) = published(events, "call.answered_by")
    assert event["answeredBy"] == "machine" and event["decisionMs"] == call.metadata["amdDecisionMs"]
    await manager.stop()


async def test_leave_message_speaks_after_the_beep_and_ends_voicemail(tmp_path: Path) -> None:
    manager, carrier, clock, voices = make(tmp_path, "leave-message")
    call, (bridge, events) = await answer(manager, "Hi, this is the clinic: please call us back.", "conversation")
    greeting = machine(MACHINE_TEXTS[3], "en-gb", 175, beep_hz=850.0, snr_db=None, seed=3)
    t0 = clock.monotonic()
    await play(clock, bridge, greeting.pcm[:len(greeting.pcm) // 2])
    assert call.metadata["answeredBy"] == "machine" and voices[0].said == []
    # a recognizer transcribes the greeting: a conversation call must not answer a machine
    manager.process_event(CallEvent(EventType.SPEECH, call_id=call.callId, transcript=MACHINE_TEXTS[3]))
    await play(clock, bridge, greeting.pcm[len(greeting.pcm) // 2:])
    await settle()
    ((spoken_at, text),) = voices[0].said
    assert text == "Hi, this is the clinic: please call us back."
    assert abs((spoken_at - t0) * 1000 - greeting.beep_end_ms) <= 100, "right after the beep, not before"
    assert call.state == CallState.VOICEMAIL and call.endReason == "voicemail"
    assert carrier.hangups == [(call.callId, CallState.VOICEMAIL)]
    assert call.metadata["answeredBy"] == "machine" and call.metadata["voicemailAfter"] == "beep"
    assert [e["reason"] for e in published(events, "call.ended")] == ["voicemail"]
    await manager.stop()


async def test_a_beep_under_way_at_the_verdict_still_marks_the_greeting_end(tmp_path: Path) -> None:
    """A short greeting whose beep starts before the detector has decided (the tone counts as voice)."""
    manager, _carrier, clock, voices = make(tmp_path, "leave-message")
    call, (bridge, _) = await answer(manager)
    t = np.arange(8000 * 1200 // 1000) / 8000
    voice = 3000 * sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8)) / 2
    audio = np.concatenate([silence(300), voice, silence(100), tone(1000.0, 400), silence(3000)])
    t0 = clock.monotonic()
    await play(clock, bridge, audio.astype("<i2").tobytes())
    await settle()
    assert call.metadata["amdCause"] == "LONGGREETING-1500-1500" and call.metadata["amdDecisionMs"] < 2000
    ((spoken_at, _),) = voices[0].said
    assert abs((spoken_at - t0) * 1000 - 2000) <= 100 and call.metadata["voicemailAfter"] == "beep"
    assert call.state == CallState.VOICEMAIL
    await manager.stop()


async def test_leave_message_without_a_beep_waits_for_the_greeting_silence(tmp_path: Path) -> None:
    manager, _carrier, clock, voices = make(tmp_path, "leave-message", greetingEndSilenceMs=1500,
                                           voicemailMessage="Please call the clinic back.")
    call, (bridge, _) = await answer(manager)
    greeting = machine(MACHINE_TEXTS[2], "en-us", 165, beep_hz=None, snr_db=20.0, seed=4, lead_ms=300)
    t0 = clock.monotonic()
    await play(clock, bridge, greeting.pcm)
    await settle()
    ((spoken_at, text),) = voices[0].said
    speech_end_ms = 300 + greeting.speech_ms
    assert text == "Please call the clinic back."
    assert abs((spoken_at - t0) * 1000 - (speech_end_ms + 1500)) <= 150
    assert call.state == CallState.VOICEMAIL and call.metadata["voicemailAfter"] == "silence"
    await manager.stop()


async def test_a_person_gets_the_normal_call_after_the_verdict(tmp_path: Path) -> None:
    manager, _carrier, clock, voices = make(tmp_path, "leave-message")
    call, (bridge, _events) = await answer(manager, "Your table is ready.", mode="conversation")
    opener = human("Yes, who is this?", "en-us", 165, snr_db=20.0, seed=2, lead_ms=400)
    manager.process_event(CallEvent(EventType.SPEECH, call_id=call.callId, transcript="Yes, who is this?"))
    await play(clock, bridge, opener.pcm, until=lambda: bool(voices[0].said))
    await settle()
    assert call.metadata["answeredBy"] == "human" and call.metadata["amdCause"].startswith("HUMAN")
    assert voices[0].said[0][1] == "Your table is ready."
    decided = call.metadata["amdDecisionMs"]
    assert abs(decided - (400 + opener.speech_ms + 800)) <= 200, "800 ms after the opener (its quiet tail is silence)"
    assert call.state == CallState.LISTENING and not call.terminal
    # the opener is in the transcript, but it did not trigger an automatic reply before the verdict
    assert [(t.speaker, t.text) for t in call.transcript] == [("user", "Yes, who is this?"),
                                                             ("bot", "Your table is ready.")]
    await manager.stop()


async def test_a_wideband_leg_is_resampled_for_the_detector(tmp_path: Path) -> None:
    manager, carrier, clock, _voices = make(tmp_path, "hangup")
    call, (bridge, _) = await answer(manager, leg=SilentLeg(AudioFormat(AudioEncoding.L16, 16000)))
    greeting = machine(MACHINE_TEXTS[1], "en-us", 165, beep_hz=None, snr_db=None, seed=1)
    narrow_manager, _, narrow_clock, _ = make(tmp_path / "narrow", "hangup")
    narrow_call, (narrow_bridge, _) = await answer(narrow_manager)
    await play(clock, bridge, greeting.pcm, until=lambda: call.terminal)
    await play(narrow_clock, narrow_bridge, greeting.pcm, until=lambda: narrow_call.terminal)
    await settle()
    assert call.metadata["answeredBy"] == "machine" and carrier.hangups == [(call.callId, CallState.HANGUP_BOT)]
    assert abs(call.metadata["amdDecisionMs"] - narrow_call.metadata["amdDecisionMs"]) <= 40, "same audio time"
    await manager.stop()
    await narrow_manager.stop()


async def test_a_leg_gone_quiet_is_a_machine_by_initial_silence_on_the_clock(tmp_path: Path) -> None:
    manager, _carrier, clock, voices = make(tmp_path, "detect")
    call, (bridge, _) = await answer(manager)
    await clock.advance(0.7)  # media set-up: not counted
    await play(clock, bridge, bytes(FRAME * 5))  # 100 ms of line silence, then nothing (silence suppression)
    await clock.advance(2.2)
    assert "answeredBy" not in call.metadata and voices[0].said == []
    await clock.advance(0.5)
    await settle()
    assert call.metadata["answeredBy"] == "machine" and call.metadata["amdCause"] == "INITIALSILENCE-2500-2500"
    assert voices[0].said[0][1] == "This is the pharmacy: your order is ready.", "detect mode still speaks"
    await manager.stop()


async def test_a_leg_that_never_sends_audio_is_unknown_and_gets_the_normal_call(tmp_path: Path) -> None:
    manager, carrier, clock, voices = make(tmp_path, "hangup")
    call, _ = await answer(manager)
    await clock.advance(4.9)
    assert "answeredBy" not in call.metadata
    await clock.advance(0.2)
    await settle()
    assert call.metadata["answeredBy"] == "unknown" and call.metadata["amdCause"].startswith("NOAUDIODATA-")
    assert carrier.hangups == [] and voices[0].said[0][1] == "This is the pharmacy: your order is ready."
    await manager.stop()


async def test_no_media_means_unknown_at_once_and_the_call_goes_on(tmp_path: Path) -> None:
    raw = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "store": str(tmp_path),
           "outbound": {"machineDetection": "hangup"}}
    carrier = RecordingCarrier()
    manager = CallManager(build_settings(raw, {}), carrier, clock=FakeClock(), store=CallStore(tmp_path))
    await manager.start()
    call = await manager.initiate(None, "Hello", "conversation")
    assert carrier.initiated[0].machine_detection == "hangup"
    manager.process_event(CallEvent(EventType.ANSWERED, call_id=call.callId))
    await settle()
    assert call.metadata["answeredBy"] == "unknown" and call.metadata["amdCause"] == "NOMEDIA"
    assert carrier.spoken == [(call.callId, "Hello")] and not call.terminal
    await manager.stop()


# ---------------------------------------------------------------------- end to end on the mock carrier

FAST_MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0,
             "calleeScript": []}
BASE = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "maxConcurrentCalls": 3,
        "streaming": {"enabled": True, "provider": "none"}, "tts": {"provider": "espeak"},
        "responseModel": "offline", "mock": FAST_MOCK, "outbound": {"notifyHangupDelaySec": 1}}


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(bytes(pcm), dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


async def test_mock_answering_machine_gets_the_message_after_its_beep(tmp_path: Path) -> None:
    receiver = Receiver()
    short = {**BASE, "mock": {**FAST_MOCK, "machineGreeting": "You have reached Alex. Leave a message after the tone."},
             "hooks": {"callEnded": {"url": await receiver.start(), "secret": SECRET}}}
    try:
        async with run_bridge(short, tmp_path) as runtime, aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"http://127.0.0.1:{runtime.port}/rpc")
            await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "voicecall.subscribe"})
            assert (await ws.receive_json())["result"] == {"subscribed": True}
            result = await rpc_client(runtime).call("voicecall.initiate", {
                "to": "+15550000005", "message": "Please call us back.",
                "mode": "notify", "machineDetection": "leave-message"})
            call = runtime.manager.calls[result["callId"]]
            await wait_for(lambda: call.terminal, timeout=40)
            assert call.state == CallState.VOICEMAIL
            meta = call.metadata
            assert meta["answeredBy"] == "machine" and meta["voicemailAfter"] == "beep"
            callee = runtime.carrier.callee(call.callId)
            assert len(callee.heard) / 16000 > 0.8 and rms(callee.heard) > 500, "the machine recorded the message"
            events: list[dict[str, Any]] = []
            while not any(e.get("type") == "call.ended" for e in events):
                msg = await asyncio.wait_for(ws.receive_json(), 5)
                if msg.get("method") == "voicecall.event":
                    events.append(msg["params"])
            kinds = [e["type"] for e in events]
            assert kinds.index("call.answered") < kinds.index("call.answered_by") < kinds.index("call.speaking")
            answered_by = next(e for e in events if e["type"] == "call.answered_by")
            assert answered_by["answeredBy"] == "machine" and answered_by["decisionMs"] < 4000
            assert events[-1]["reason"] == "voicemail"
            status = await rpc_client(runtime).call("voicecall.status", {"callId": call.callId})
            assert status["call"]["metadata"]["answeredBy"] == "machine" and status["call"]["state"] == "voicemail"
            await ws.close()
            await wait_for(lambda: len(receiver.accepted) == 1)
            (report,) = receiver.accepted.values()
            assert (report["answeredBy"], report["endReason"]) == ("machine", "voicemail")
            assert report["transcript"][-1]["text"] == "Please call us back."
    finally:
        await receiver.stop()


async def test_mock_person_is_detected_as_human_and_hears_the_message(tmp_path: Path) -> None:
    async with run_bridge(BASE, tmp_path) as runtime:
        result = await rpc_client(runtime).call("voicecall.initiate", {
            "to": "+15550007777", "message": "Your table is ready.", "mode": "notify", "machineDetection": "hangup"})
        call = runtime.manager.calls[result["callId"]]
        await wait_for(lambda: call.terminal, timeout=30)
        assert call.metadata["answeredBy"] == "human" and call.state == CallState.HANGUP_BOT
        assert [(t.speaker, t.text) for t in call.transcript] == [("user", "Hello?"), ("bot", "Your table is ready.")]
        assert rms(runtime.carrier.callee(call.callId).heard) > 500
