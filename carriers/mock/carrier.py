"""The offline loopback carrier: a simulated phone network and a simulated person at the other end.

Outbound calls ring and are answered after configurable delays; numbers ending in the configured
suffixes are busy (0002), never answer (0003) or fail (0004); 0005 is an answering machine (a spoken
greeting, a beep, then silence, sent as audio so the bridge's local detector does the work), 0006
a person who answers transfers (says one line, then listens). Inbound calls are injected (RPC
`mock.inject` / `voicecall inject`). Media loops back: every frame the bridge plays is what the
callee hears (u-law 8 kHz, paced like a real carrier, marks echoed when the audio before them has
played), and the callee's speech (offline TTS, or a WAV) goes into the bridge like a caller's.
Like carriers with their own recognizer (Telnyx transcription, Twilio Gather), the mock reports
what its callee said as a `call.speech` event once the audio has been sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from bridge.calls import CallEvent, CallRecord, CallState, Direction, EventType, TransferOutcome
from carriers.base import (
    CallLookup,
    Carrier,
    OutboundRequest,
    ProviderStatus,
    WebhookReply,
    WebhookRequest,
    WebhookResult,
    WebhookVerdict,
)
from carriers.mock.settings import MockSettings
from media import g711
from media.dtmf import DtmfDetector
from media.formats import FRAME_MS, ULAW_8K
from media.resample import StreamResampler
from media.tts.base import TtsEngine
from media.untrusted import loads

log = logging.getLogger(__name__)

ENDED_CALLEES_KEPT = 8  # the last few ended callees stay inspectable (tests, `mock.callee`); older ones go
HISTORY = 256  # hangups / rejections remembered for inspection
MAX_EVENTS_PER_WEBHOOK = 100
ENDPOINT_SILENCE_MS = 200


class MockCallee:
    """The person on the other end, and their phone's media leg (a MediaTransport)."""

    format = ULAW_8K
    supports_marks = True

    def __init__(self, carrier: MockCarrier, call_id: str, script: list[str]) -> None:
        self.carrier = carrier
        self.call_id = call_id
        self.script = deque(script)
        self.bridge: Any = None
        self._heard = bytearray()  # PCM16 8 kHz of everything the bridge played that was not cleared
        self.frames_received = 0
        self.marks_echoed: list[str] = []
        self.clears = 0
        self.said: list[str] = []
        # Keys the bridge sent, as a phone's IVR would find them: in-band tones in what it played.
        self.keys_heard = ""
        self._keys = DtmfDetector(self.format.rate)
        self.alive = True
        self.transferred = False  # handed to a person by a cold transfer
        self._sequence = 0
        self._loop = asyncio.get_running_loop()
        self._playout_end = 0.0  # loop time when the audio queued so far has played
        self._pending_marks: list[tuple[str, asyncio.TimerHandle]] = []
        self._queued: deque[tuple[float, bytes]] = deque()  # (play time, pcm) not yet "heard"
        self._speaking: asyncio.Task[None] | None = None
        self._reply: asyncio.TimerHandle | None = None
        self._idle_hangup: asyncio.TimerHandle | None = None

    @property
    def heard(self) -> bytearray:
        """What has played out at the callee's ear so far (audio still queued at the 'carrier' is not heard yet)."""
        self._play_out(self._loop.time())
        return self._heard

    def _play_out(self, now: float) -> None:
        while self._queued and self._queued[0][0] <= now + 1e-6:
            self._heard += self._queued.popleft()[1]

    # ------------------------------------------------------------ MediaTransport (bridge -> callee)
    async def send_media(self, payload: bytes) -> None:
        if not self.alive:
            return
        now = self._loop.time()
        self._play_out(now)
        start = max(now, self._playout_end)
        self._playout_end = start + self.format.ms_of(payload) / 1000
        pcm = g711.decode(payload, self.format.encoding)
        self._queued.append((start, pcm))
        self.keys_heard += "".join(self._keys.process(pcm))
        self.frames_received += 1
        self._cancel_reply()

    async def send_mark(self, name: str) -> None:
        delay = max(0.0, self._playout_end - self._loop.time())
        handle = self._loop.call_later(delay, self._echo_mark, name)
        self._pending_marks.append((name, handle))

    async def send_clear(self) -> None:
        self.clears += 1
        self._play_out(self._loop.time())
        self._queued.clear()
        self._playout_end = self._loop.time()
        for name, handle in self._pending_marks:  # like Twilio: clear returns pending marks
            handle.cancel()
            self._loop.call_soon(self._echo_mark, name)
        self._pending_marks.clear()

    def _echo_mark(self, name: str) -> None:
        self._pending_marks = [(n, h) for n, h in self._pending_marks if n != name]
        self._play_out(self._loop.time())
        self.marks_echoed.append(name)
        if self.bridge is not None and self.alive:
            self.bridge.on_mark(name)
        if not self._queued and not self._pending_marks:
            self._bot_turn_ended()

    # ------------------------------------------------------------ the person
    def _bot_turn_ended(self) -> None:
        if not self.alive or (self._speaking and not self._speaking.done()):
            return
        self._cancel_reply()
        if self.script:
            delay = self.carrier.settings.replyDelayMs / 1000
            self._reply = self._loop.call_later(delay, self._reply_next)
        elif self.carrier.settings.calleeHangupAfterMs:
            self._idle_hangup = self._loop.call_later(
                self.carrier.settings.calleeHangupAfterMs / 1000, self.hang_up)

    def _cancel_reply(self) -> None:
        for handle in (self._reply, self._idle_hangup):
            if handle is not None:
                handle.cancel()
        self._reply = self._idle_hangup = None

    def _reply_next(self) -> None:
        if self.script and self.alive:
            self.say(self.script.popleft())

    def say(self, text: str) -> asyncio.Task[None]:
        """Speak `text` into the call (offline TTS, real-time paced), then report it as a transcript."""
        self._speaking = asyncio.ensure_future(self._say(text))
        return self._speaking

    async def _say(self, text: str) -> None:
        pcm, rate = await self.carrier.synthesize(text)
        # A recognizer reports after some silence (endpointing), and that silence reaches the bridge
        # too, so its VAD hears the speech end as on a real line (TTS tails alone are ~0.3 s).
        await self.play(pcm + bytes(rate * 2 * ENDPOINT_SILENCE_MS // 1000), rate)
        if self.alive:
            self.said.append(text)
            self.carrier.host.emit(CallEvent(EventType.SPEECH, call_id=self.call_id,
                                             provider_call_id=self.carrier.provider_id(self.call_id),
                                             transcript=text, is_final=True))

    async def play(self, pcm: bytes, rate: int) -> None:
        """Send PCM16 audio as this caller's voice: resample to 8 kHz, u-law, 20 ms frames in real time."""
        resampler = StreamResampler(rate, self.format.rate)
        audio = resampler.process(pcm) + resampler.flush()
        frame = self.format.rate * FRAME_MS // 1000 * 2
        start = self._loop.time()
        for index, offset in enumerate(range(0, len(audio), frame)):
            if not self.alive:
                return
            chunk = audio[offset:offset + frame].ljust(frame, b"\x00")
            if self.bridge is not None:
                self._sequence += 1  # one counter for the whole call, like a carrier's media chunks
                self.bridge.receive(g711.encode(chunk, self.format.encoding), self._sequence)
            delay = start + (index + 1) * FRAME_MS / 1000 - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    def answer_as_machine(self, greeting: str) -> asyncio.Task[None]:
        """An answering machine: the greeting, a short pause, a 1 kHz beep, then it records (silence)."""
        self._speaking = asyncio.ensure_future(self._machine(greeting))
        return self._speaking

    async def _machine(self, greeting: str) -> None:
        pcm, rate = await self.carrier.synthesize(greeting)
        await self.play(pcm, rate)
        await self.play(_beep(self.format.rate, pause_ms=500, beep_ms=400) + bytes(self.format.rate * 2), self.format.rate)

    def play_later(self, pcm: bytes, rate: int) -> asyncio.Task[None]:
        """Speak recorded audio (a WAV's samples) into the call, without a transcript."""
        self._speaking = asyncio.ensure_future(self.play(pcm, rate))
        return self._speaking

    def press(self, digits: str) -> None:
        """Out-of-band DTMF, as carriers report key presses."""
        for digit in digits:
            if self.bridge is not None:
                self.bridge.on_dtmf(digit)

    def hang_up(self) -> None:
        if not self.alive:
            return
        self.stop()
        self.carrier.host.emit(CallEvent(EventType.ENDED, call_id=self.call_id,
                                         provider_call_id=self.carrier.provider_id(self.call_id),
                                         reason=CallState.HANGUP_USER))

    def stop(self) -> None:
        if self.alive:
            self.carrier.release(self.call_id)
        self.alive = False
        self._cancel_reply()
        for _, handle in self._pending_marks:
            handle.cancel()
        self._pending_marks.clear()
        if self._speaking is not None and not self._speaking.done():
            self._speaking.cancel()


class MockCarrier(Carrier):
    name = "mock"
    signature_headers = ()
    streams_media = True
    media_always = True

    def __init__(self, settings: MockSettings, voice_factory: Callable[[], TtsEngine]) -> None:
        self.settings = settings
        self._voice_factory = voice_factory
        self._voice: TtsEngine | None = None
        self.callees: dict[str, MockCallee] = {}  # live callees
        self.ended: OrderedDict[str, MockCallee] = OrderedDict()  # the last ENDED_CALLEES_KEPT ended ones
        self.rejected: list[str] = []  # the last HISTORY of each
        self.hangups: list[tuple[str, str]] = []
        self.transfers: list[tuple[str, str, str]] = []  # (call id, to, outcome) of cold transfers
        self._scripts: OrderedDict[str, list[str]] = OrderedDict()
        self._personas: dict[str, str] = {}  # call id -> "machine" | "transfer" | "human" | "human-opener"
        self._timers: dict[str, set[asyncio.TimerHandle]] = {}  # call id -> its pending carrier timers

    @staticmethod
    def provider_id(call_id: str) -> str:
        return f"mock-{call_id}"

    async def synthesize(self, text: str) -> tuple[bytes, int]:
        if self._voice is None:
            self._voice = self._voice_factory()
        chunks = [chunk async for chunk in self._voice.synthesize(text)]
        return b"".join(chunks), self._voice.sample_rate

    def _later(self, delay_ms: int, callback: Callable[..., object], call_id: str, *args: Any) -> None:
        def fire() -> None:
            self._forget_timer(call_id, handle)
            callback(call_id, *args)

        handle = asyncio.get_running_loop().call_later(delay_ms / 1000, fire)
        self._timers.setdefault(call_id, set()).add(handle)

    def _forget_timer(self, call_id: str, handle: asyncio.TimerHandle) -> None:
        pending = self._timers.get(call_id)
        if pending is not None:
            pending.discard(handle)
            if not pending:
                del self._timers[call_id]

    def _cancel_timers(self, call_id: str) -> None:
        for timer in self._timers.pop(call_id, ()):
            timer.cancel()

    def release(self, call_id: str) -> None:
        """The call ended: its callee (and the audio it heard) leaves the live table."""
        callee = self.callees.pop(call_id, None)
        if callee is None:
            return
        self.ended[call_id] = callee
        while len(self.ended) > ENDED_CALLEES_KEPT:
            self.ended.popitem(last=False)

    async def initiate_call(self, call: CallRecord, request: OutboundRequest) -> str:
        provider_id = self.provider_id(call.callId)
        number = request.to
        settings = self.settings
        self._later(0, self._emit, call.callId, EventType.INITIATED)
        if number.endswith(settings.failSuffix):
            self._later(settings.ringDelayMs, self._emit, call.callId, EventType.ENDED, CallState.FAILED)
            return provider_id
        self._later(settings.ringDelayMs, self._emit, call.callId, EventType.RINGING)
        if number.endswith(settings.busySuffix):
            self._later(settings.ringDelayMs + 200, self._emit, call.callId, EventType.ENDED, CallState.BUSY)
        elif number.endswith(settings.noAnswerSuffix):
            self._later(settings.ringDelayMs + settings.noAnswerAfterMs, self._emit, call.callId,
                        EventType.ENDED, CallState.NO_ANSWER)
        else:
            if number.endswith(settings.machineSuffix):
                self._personas[call.callId] = "machine"
            elif number.endswith(settings.transferSuffix):
                self._personas[call.callId] = "transfer"
            elif request.machine_detection != "off" and settings.calleeOpener:
                self._personas[call.callId] = "human-opener"
            self._later(settings.ringDelayMs + settings.answerDelayMs, self._connect, call.callId)
        return provider_id

    def _emit(self, call_id: str, kind: EventType, reason: CallState | None = None) -> None:
        self.host.emit(CallEvent(kind, call_id=call_id, provider_call_id=self.provider_id(call_id), reason=reason))

    def _connect(self, call_id: str) -> None:
        call = self.host.get_call(call_id)
        if call is None or call.terminal or call_id in self.callees:
            self._personas.pop(call_id, None)
            return
        script = self._scripts.pop(call.providerCallId or "", None)
        persona = self._personas.pop(call_id, "human")
        if persona in ("machine", "transfer"):
            script = []
        callee = MockCallee(self, call_id, list(self.settings.calleeScript) if script is None else script)
        self.callees[call_id] = callee
        callee.bridge = self.host.attach_media(call_id, callee)
        self._emit(call_id, EventType.ANSWERED)
        if persona == "machine":
            callee.answer_as_machine(self.settings.machineGreeting)
        elif persona == "transfer":
            callee.say(self.settings.transferLine)
        elif persona == "human-opener":
            callee.say(self.settings.calleeOpener)

    def inject_inbound(self, from_number: str, to_number: str, script: list[str] | None = None) -> str:
        """A call from `from_number` arrives; the manager runs the inbound policy on it."""
        provider_id = f"mock-in-{uuid.uuid4().hex[:16]}"
        if script is not None:
            self._scripts[provider_id] = script
            while len(self._scripts) > HISTORY:  # scripts of calls the policy never let through
                self._scripts.popitem(last=False)
        self.host.emit(CallEvent(EventType.INITIATED, provider_call_id=provider_id, direction=Direction.INBOUND,
                                 from_number=from_number, to_number=to_number))
        return provider_id

    async def answer_call(self, call: CallRecord) -> None:
        self._later(self.settings.answerDelayMs if call.direction == Direction.OUTBOUND else 0,
                    self._connect, call.callId)

    async def reject_call(self, call: CallRecord) -> None:
        self.rejected.append(call.providerCallId or call.callId)
        del self.rejected[:-HISTORY]
        self._scripts.pop(call.providerCallId or "", None)

    async def hangup_call(self, call: CallRecord, reason: CallState) -> None:
        self.hangups.append((call.callId, reason.value))
        del self.hangups[:-HISTORY]
        self._personas.pop(call.callId, None)  # hung up before it connected
        self._cancel_timers(call.callId)  # its ring/answer steps will not happen now
        callee = self.callees.get(call.callId)
        if callee is not None:
            callee.stop()

    async def transfer_cold(self, call: CallRecord, to: str) -> None:
        """The network dials `to` for the callee: 0002 busy, 0003 no answer, 0004 fails, anything else
        answers, and the callee then talks to that person (the bridge's leg goes quiet)."""
        settings = self.settings
        if to.endswith(settings.busySuffix):
            outcome, delay = TransferOutcome.BUSY, settings.ringDelayMs + 200
        elif to.endswith(settings.noAnswerSuffix):
            outcome, delay = TransferOutcome.NO_ANSWER, settings.ringDelayMs + settings.noAnswerAfterMs
        elif to.endswith(settings.failSuffix):
            outcome, delay = TransferOutcome.FAILED, settings.ringDelayMs
        else:
            outcome, delay = TransferOutcome.COMPLETED, settings.ringDelayMs + settings.answerDelayMs
        self.transfers.append((call.callId, to, outcome.value))
        del self.transfers[:-HISTORY]
        self._later(delay, self._transfer_outcome, call.callId, outcome)

    def _transfer_outcome(self, call_id: str, outcome: TransferOutcome) -> None:
        if outcome == TransferOutcome.COMPLETED:
            callee = self.callees.get(call_id)
            if callee is not None:  # now on the line with the person, no longer with the bridge
                callee.transferred = True
                callee.stop()
        self.host.emit(CallEvent(EventType.TRANSFER, call_id=call_id, provider_call_id=self.provider_id(call_id),
                                 outcome=outcome.value))

    async def get_call_status(self, call: CallRecord) -> ProviderStatus | None:
        callee = self.callees.get(call.callId)
        return ProviderStatus(terminal=callee is None or not callee.alive)

    def callee(self, call_id: str) -> MockCallee | None:
        """A live callee, or one of the last few ended ones."""
        return self.callees.get(call_id) or self.ended.get(call_id)

    # Seed behaviour: mock webhooks are JSON `{event}` or `{events: [...]}`, always verified.
    def verify_webhook(self, request: WebhookRequest) -> WebhookVerdict:
        return WebhookVerdict(ok=True)

    def parse_webhook(self, request: WebhookRequest, calls: CallLookup) -> WebhookResult:
        try:
            data = loads(request.body or b"{}")
            if not isinstance(data, dict):
                raise TypeError("not an object")
            items = data["events"] if "events" in data else [data["event"]]
            if not isinstance(items, list) or len(items) > MAX_EVENTS_PER_WEBHOOK:
                raise TypeError("events must be a list of at most 100 objects")
            events = [_event_from_json(item) for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            return WebhookResult(reply=WebhookReply(400, f"bad mock event: {type(exc).__name__}"))
        return WebhookResult(events=events)

    async def close(self) -> None:
        for call_id in list(self._timers):
            self._cancel_timers(call_id)
        for callee in list(self.callees.values()):
            callee.stop()


def _beep(rate: int, *, pause_ms: int, beep_ms: int, hz: float = 1000.0) -> bytes:
    """`pause_ms` of silence, then a steady tone with 5 ms edges (PCM16)."""
    t = np.arange(rate * beep_ms // 1000) / rate
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)
    tone = (8000 * ramp * np.sin(2 * np.pi * hz * t)).astype("<i2")
    return bytes(rate * pause_ms // 1000 * 2) + tone.tobytes()


_CALL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # reaches file names (recordings): no dots, no slashes


def _text(item: dict[str, Any], key: str, limit: int = 1024) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise TypeError(f"{key} must be a string of at most {limit} characters")
    return value


def _event_from_json(item: Any) -> CallEvent:
    """One mock event, every field type-checked (a wrong type is a 400, never a 500 later)."""
    if not isinstance(item, dict):
        raise TypeError("event must be an object")
    kind = EventType(_text(item, "type") or "")
    call_id = _text(item, "callId", 64)
    if call_id is not None and not _CALL_ID.match(call_id):
        raise ValueError("callId may hold only letters, digits, - and _")
    event = CallEvent(kind, call_id=call_id, provider_call_id=_text(item, "providerCallId", 128))
    if "id" in item:
        if isinstance(item["id"], bool) or not isinstance(item["id"], (str, int)):
            raise TypeError("id must be a string or an integer")
        event.id = str(item["id"])[:128]
    if item.get("direction"):
        event.direction = Direction(_text(item, "direction") or "")
    event.from_number = _text(item, "from", 256)
    event.to_number = _text(item, "to", 256)
    event.transcript = _text(item, "transcript", 10_000)
    is_final = item.get("isFinal", True)
    if not isinstance(is_final, bool):
        raise TypeError("isFinal must be true or false")
    event.is_final = is_final
    event.digits = _text(item, "digits", 64)
    event.turn_token = _text(item, "turnToken", 128)
    if item.get("reason"):
        event.reason = CallState(_text(item, "reason") or "")
    event.error = _text(item, "error")
    return event


def from_settings(settings: Any) -> MockCarrier:
    from media.tts.factory import create_tts

    return MockCarrier(settings.section(MockSettings), lambda: create_tts({"provider": "espeak"}))
