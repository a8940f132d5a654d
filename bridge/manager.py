"""CallManager: the one place that decides what happens to calls.

initiate / speak / continue / end / status; event processing (dedupe, inbound policy, state
transitions, timers, turn waiters, auto-responses); limits; the reaper; restart recovery.
It implements `CarrierHost`, the only surface carriers see.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from bridge.calls import (
    CallEvent,
    CallMode,
    CallRecord,
    CallState,
    Direction,
    EventType,
    TranscriptEntry,
    can_transition,
)
from bridge.config import MachineDetectionMode, Settings, is_destination
from bridge.conversation.engine import ConversationEngine
from bridge.hooks import ReportSender
from bridge.logs import call_id_var
from bridge.machine import MachineDetection
from bridge.report import build_report
from bridge.responder import Responder, ResponderError
from bridge.store import CallStore, SharedStore, Store, is_safe_id
from bridge.tasks import BackgroundTasks
from carriers.base import Carrier, CarrierError, OutboundRequest
from media.amd import AmdVerdict
from media.clock import Clock, RealClock, TimerHandle
from media.transport import MediaTransport
from media.tts.base import TtsError

if TYPE_CHECKING:
    from bridge.voice import CallVoice
    from media.pipeline import MediaPipeline

log = logging.getLogger(__name__)

REAPER_INTERVAL_S = 30.0
MEDIA_WAIT_S = 10.0
MAX_PROCESSED_IDS = 200_000
# Ended calls kept in memory for status/list; older ones are dropped (calls.jsonl keeps them all).
ENDED_CALLS_KEPT = 1000
STT_LOST_MESSAGE = "Sorry, I can no longer hear you. Please call again later. Goodbye."
STORE_RETRY_S = 5.0
RING_TIMEOUT_SLACK_S = 10.0  # the carrier's own ring timeout should normally win
HANGUP_ATTEMPT_S = 8.0  # one hang-up attempt (the carrier client's own retries included) before we back off
HANGUP_RETRY_FIRST_S = 1.0
HANGUP_RETRY_MAX_S = 60.0
DIAL_STRING_PROVIDERS = ("sip", "asterisk")  # these also dial extensions and dial strings; they check `to` themselves
SUPERSEDE_GRACE_S = 0.5  # a superseded reply gets this long to finish its bookkeeping before it is cancelled
MACHINE_DETECTION_MODES = ("off", "detect", "hangup", "leave-message")
DTMF_SEQUENCE_CHARS = frozenset("0123456789*#ABCDwW")
MAX_DTMF_SEQUENCE = 64


class CallError(Exception):
    """A request about a call that cannot be carried out; the message is shown to the caller of the API."""


@dataclass(slots=True)
class _Turn:
    token: str
    future: asyncio.Future[str]
    started: float


# Sees every call event (kind, call, extra fields) as it is published: metrics, traces, turn timing.
CallObserver = Callable[[str, CallRecord, dict[str, Any]], None]

# Builds a call's voice (a CallVoice: MediaPipeline + STT + TTS) from its media leg; the manager starts it.
VoiceFactory = Callable[[CallRecord, MediaTransport, Callable[[CallEvent], None]], "CallVoice"]


class CallManager:
    def __init__(
        self,
        settings: Settings,
        carrier: Carrier,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        responder: Responder | None = None,
        voice_factory: VoiceFactory | None = None,
        conversation: ConversationEngine | None = None,
    ) -> None:
        self.settings = settings
        self.carrier = carrier
        self.clock: Clock = clock or RealClock()
        self.store: Store = store or CallStore(settings.store_dir)
        # Several nodes on one Redis: capacity and events are shared through it (bridge/cluster/)
        self.shared: SharedStore | None = self.store if isinstance(self.store, SharedStore) else None
        self._bus: asyncio.Task[None] | None = None
        # On a cluster: sends an event for a call this node does not carry to the node that does (True: sent)
        self.event_forwarder: Callable[[CallEvent], Awaitable[bool]] | None = None
        self.responder = responder
        # Streaming replies with tools (the default); None or agent.responseMode batch: the Responder path.
        self.conversation = conversation
        self._replies: dict[str, asyncio.Task[Any]] = {}  # call id -> its running reply turn
        self._consults: dict[str, tuple[str, asyncio.Future[str]]] = {}  # consult id -> (call id, answer)
        self._voice_factory = voice_factory
        self.calls: dict[str, CallRecord] = {}
        self.ended_calls_kept = ENDED_CALLS_KEPT
        self._ended: OrderedDict[str, None] = OrderedDict()  # ended call ids, oldest first
        self._by_provider_id: dict[str, str] = {}
        self._processed: set[str] = set()
        self._turns: dict[str, _Turn] = {}
        self._timers: dict[str, TimerHandle] = {}
        self._hangup_retries: dict[str, TimerHandle] = {}
        self._voices: dict[str, CallVoice] = {}
        self._media_waiters: dict[str, list[asyncio.Future[CallVoice | None]]] = {}
        self._machine: dict[str, MachineDetection] = {}
        hook = settings.hooks.callEnded
        self.reports = ReportSender(hook, settings.store_dir, self.clock) if hook else None
        self._rejected_provider_ids: set[str] = set()
        self._tasks = BackgroundTasks(log, level=logging.ERROR)
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.observers: list[CallObserver] = []
        self._reaper: TimerHandle | None = None
        self.public_base: str | None = None  # public origin, e.g. https://host.example (set by server)
        self.started = False
        self.stopping = False  # shutting down: a dropped media stream no longer ends its call

    # ================================================================== lifecycle

    async def start(self) -> None:
        self.store.open()
        if self.shared is not None:
            stream = await self.shared.subscribe()
            self._bus = asyncio.get_running_loop().create_task(self._relay_bus(self.shared, stream), name="event-bus")
        if self.reports is not None:
            await self.reports.start()
        await self._recover()
        await self.carrier.start(self)
        if self.settings.staleCallReaperSeconds > 0:
            self._schedule_reaper()
        self.started = True

    async def stop(self) -> None:
        self.stopping = True
        if self._reaper is not None:
            self._reaper.cancel()
        for timer in [*self._timers.values(), *self._hangup_retries.values()]:
            timer.cancel()
        self._timers.clear()
        self._hangup_retries.clear()
        for voice in list(self._voices.values()):
            await voice.close()
        self._voices.clear()
        await self.carrier.close()
        await self._tasks.cancel()
        if self.reports is not None:
            await self.reports.close()
        if self.responder is not None:
            await self.responder.close()
        if self.conversation is not None:
            await self.conversation.close()
        if self._bus is not None:
            self._bus.cancel()
            await asyncio.gather(self._bus, return_exceptions=True)
            self._bus = None
        if self.shared is not None:
            await self.shared.aclose()
        else:
            self.store.close()
        self.started = False

    # ================================================================== CarrierHost

    def webhook_url(self, **query: str) -> str:
        base = self.settings.publicUrl or f"{self._origin()}{self.settings.serve.path}"
        parts = urlsplit(base)
        extra = urlencode(query)
        merged = f"{parts.query}&{extra}" if parts.query and extra else (parts.query or extra)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, merged, ""))

    def stream_url(self) -> str:
        base = urlsplit(self.settings.publicUrl or self._origin())
        scheme = "wss" if base.scheme == "https" else "ws"
        return urlunsplit((scheme, base.netloc, self.settings.streaming.streamPath, "", ""))

    def _origin(self) -> str:
        if self.public_base:
            return self.public_base
        return f"http://{self.settings.serve.bind}:{self.settings.serve.port}"

    def stream_token(self, call_id: str) -> str:
        call = self.calls[call_id]
        token = call.metadata.get("streamToken")
        if not token:
            token = call.metadata["streamToken"] = secrets.token_urlsafe(16)
            self._save(call)
        return str(token)

    def emit(self, event: CallEvent) -> None:
        self.process_event(event)

    def get_call(self, call_id: str) -> CallRecord | None:
        return self.calls.get(call_id)

    def find_call(self, call_id: str | None = None, provider_call_id: str | None = None) -> CallRecord | None:
        if call_id and call_id in self.calls:
            return self.calls[call_id]
        if provider_call_id and provider_call_id in self._by_provider_id:
            return self.calls.get(self._by_provider_id[provider_call_id])
        return None

    def attach_media(self, call_id: str, transport: MediaTransport) -> MediaPipeline | None:
        """Create the call's voice (MediaPipeline + STT + TTS) and return its MediaPipeline."""
        call = self.calls.get(call_id)
        if call is None or call.terminal or self._voice_factory is None:
            return None
        call_id_var.set(call_id)  # this stream's task (and the voice's tasks) log with the call id
        old = self._voices.pop(call_id, None)
        if old is not None:
            self._spawn(old.close(), f"close-voice-{call_id}")
        voice = self._voice_factory(call, transport, self.emit)
        self._voices[call_id] = voice
        self._spawn(voice.start(), f"voice-start-{call_id}")
        detection = self._machine.get(call_id)
        if detection is not None:
            detection.attach(voice.bridge)
        call.media_attached = True
        for waiter in self._media_waiters.pop(call_id, []):
            if not waiter.done():
                waiter.set_result(voice)
        return voice.bridge

    def detach_media(self, call_id: str) -> None:
        voice = self._voices.pop(call_id, None)
        if voice is not None:
            self._spawn(voice.close(), f"detach-{call_id}")
        call = self.calls.get(call_id)
        if call is not None:
            call.media_attached = False

    def media_disconnected(self, call_id: str, bridge: MediaPipeline | None = None) -> None:
        """A media stream went away: end the call after a grace period unless a new stream attaches."""
        current = self._voices.get(call_id)
        if current is not None and bridge is not None and current.bridge is not bridge:
            return  # a newer stream already took over
        self.detach_media(call_id)
        call = self.calls.get(call_id)
        if call is None or call.terminal or self.stopping:
            return
        grace = self.settings.streaming.disconnectGraceMs / 1000

        def expire() -> None:
            if not call.terminal and call.callId not in self._voices:
                call.metadata["streamLost"] = True
                self._spawn(self._hangup(call, CallState.COMPLETED), f"stream-lost-{call_id}")

        self.clock.call_later(grace, expire)

    def voice(self, call_id: str) -> CallVoice | None:
        return self._voices.get(call_id)

    def accept_stream(self, provider: str, provider_call_id: str | None, call_id: str | None,
                      token: str | None) -> CallRecord | None:
        """A media stream's `start`: known, live call of this provider, and the right token (constant time)."""
        call = self.find_call(call_id, provider_call_id)
        if call is None or call.terminal or call.provider != provider:
            return None
        expected = str(call.metadata.get("streamToken") or "")
        if not expected or not token or not hmac.compare_digest(expected.encode(), token.encode()):
            return None
        return call

    # ================================================================== API

    def active_calls(self) -> list[CallRecord]:
        return [c for c in self.calls.values() if not c.terminal]

    async def initiate(self, to: str | None, message: str, mode: str | None = None, *,
                       machine_detection: str | None = None, dtmf_sequence: str | None = None,
                       voicemail_message: str | None = None) -> CallRecord:
        to = to or self.settings.toNumber
        if not to:
            raise CallError("No destination: pass `to` or set toNumber in the config")
        if self.settings.provider not in DIAL_STRING_PROVIDERS and not is_destination(to):
            raise CallError(f"`to` must be an E.164 number like +15550001234 or a sip: URI (got {to[:40]!r})")
        if not message or not message.strip():
            raise CallError("`message` must be a non-empty string")
        mode = mode or self.settings.outbound.defaultMode
        if mode not in (CallMode.NOTIFY, CallMode.CONVERSATION):
            raise CallError(f"`mode` must be notify or conversation (got {mode!r})")
        detection = machine_detection or self.settings.outbound.machineDetection
        if detection not in MACHINE_DETECTION_MODES:
            raise CallError(f"`machineDetection` must be one of {', '.join(MACHINE_DETECTION_MODES)} "
                            f"(got {detection!r})")
        if dtmf_sequence is not None and (not dtmf_sequence or len(dtmf_sequence) > MAX_DTMF_SEQUENCE
                                          or not set(dtmf_sequence) <= DTMF_SEQUENCE_CHARS):
            raise CallError(f"`dtmfSequence` must be 1-{MAX_DTMF_SEQUENCE} of 0-9 * # A-D, "
                            "w (0.5 s pause) or W (1 s pause)")
        self._check_capacity()
        call_id = str(uuid.uuid4())
        if self.shared is not None and not await self.shared.reserve(call_id, self.settings.maxConcurrentCalls):
            raise CallError(f"Maximum concurrent calls ({self.settings.maxConcurrentCalls}) reached on the cluster")
        now = self.clock.time()
        call = CallRecord(
            callId=call_id,
            provider=self.carrier.name,
            direction=Direction.OUTBOUND,
            state=CallState.INITIATED,
            from_=self.settings.fromNumber or "",
            to=to,
            startedAt=now,
            metadata={"initialMessage": message, "mode": str(mode), "turnCount": 0},
        )
        if detection != "off":
            call.metadata["machineDetection"] = detection
        if dtmf_sequence:
            call.metadata["dtmfSequence"] = dtmf_sequence
        if voicemail_message:
            call.metadata["voicemailMessage"] = voicemail_message
        self._stamp_node(call)
        self.calls[call.callId] = call
        call_id_var.set(call.callId)
        self._save(call)
        self._publish("call.created", call)
        self._prewarm(call)
        request = OutboundRequest(to=to, from_number=call.from_, message=message, mode=str(mode),
                                  stream=self.settings.streaming.enabled, machine_detection=detection)
        try:
            provider_id = await self.carrier.initiate_call(call, request)
        except CarrierError as exc:
            self._finalize(call, CallState.FAILED, error=str(exc))
            raise CallError(f"Call could not be placed: {exc}") from None
        if not call.terminal:
            self._link_provider_id(call, provider_id)
            self._save(call)
            self._start_ring_timeout(call)
        return call

    def _check_capacity(self) -> None:
        active = len(self.active_calls())
        if active >= self.settings.maxConcurrentCalls:
            raise CallError(f"Maximum concurrent calls ({self.settings.maxConcurrentCalls}) reached")

    def _live_call(self, call_id: str) -> CallRecord:
        call = self.find_call(call_id, call_id)
        if call is None:
            raise CallError(f"Call not found: {call_id}")
        if call.terminal:
            raise CallError(f"Call {call.callId} has ended ({call.state})")
        call_id_var.set(call.callId)
        return call

    def answered_call(self, call_id: str) -> CallRecord:
        """The live, answered call with this id; CallError otherwise."""
        return self._answered_call(call_id)

    def _answered_call(self, call_id: str) -> CallRecord:
        call = self._live_call(call_id)
        if call.answeredAt is None:
            raise CallError(f"Call {call.callId} is not answered yet ({call.state})")
        return call

    async def speak(self, call_id: str, message: str) -> None:
        call = self._answered_call(call_id)
        if not message or not message.strip():
            raise CallError("`message` must be a non-empty string")
        await self._say_for_api(call, message)

    async def _say_for_api(self, call: CallRecord, text: str) -> None:
        """Speak for an API caller: a voice engine failing mid-call is a clear error, the call stays up."""
        try:
            await self._say(call, text)
        except TtsError as exc:
            raise CallError(f"Could not speak on call {call.callId}: {exc}") from None

    async def continue_call(self, call_id: str, message: str) -> str:
        """Speak, listen, and return the caller's next final transcript."""
        call = self._answered_call(call_id)
        if call.callId in self._turns:
            raise CallError(f"A turn is already in progress on call {call.callId}")
        loop = asyncio.get_running_loop()
        turn = _Turn(token=uuid.uuid4().hex, future=loop.create_future(), started=self.clock.monotonic())
        self._turns[call.callId] = turn
        try:
            await self._say_for_api(call, message)
            listen_started = self.clock.monotonic()
            self._move(call, CallState.LISTENING)
            if call.callId not in self._voices:
                await self.carrier.start_listening(call, turn.token)
            timeout_ms = self.settings.transcriptTimeoutMs
            try:
                transcript = await self.clock.wait_for(turn.future, timeout_ms / 1000)
            except TimeoutError:
                raise CallError(f"Timed out waiting for transcript after {timeout_ms}ms") from None
            done = self.clock.monotonic()
            meta = call.metadata
            meta["turnCount"] = int(meta.get("turnCount", 0)) + 1
            meta["lastTurnLatencyMs"] = round((done - turn.started) * 1000, 1)
            meta.setdefault("turnLatenciesMs", []).append(meta["lastTurnLatencyMs"])
            meta["lastTurnListenWaitMs"] = round((done - listen_started) * 1000, 1)
            meta["lastTurnCompletedAt"] = self.clock.time()
            self._save(call)
            return transcript
        finally:
            if turn.future.done() and not turn.future.cancelled():
                turn.future.exception()  # the call may have ended before anyone awaited the turn
            if self._turns.get(call.callId) is turn:
                del self._turns[call.callId]
            if call.callId not in self._voices and not call.terminal:
                try:
                    await self.carrier.stop_listening(call)
                except CarrierError as exc:
                    log.warning("call %s: stop listening failed: %s", call.callId, exc)

    async def end(self, call_id: str) -> CallRecord:
        """Hang up, and say so only once the carrier has: a failed hang-up is retried in the
        background (with backoff) and reported as an error, never as success."""
        call = self.find_call(call_id, call_id)
        if call is None:
            raise CallError(f"Call not found: {call_id}")
        if call.terminal:
            return call
        call_id_var.set(call.callId)
        if not await self._hangup(call, CallState.HANGUP_BOT):
            raise CallError(f"Call {call.callId} is still up: the carrier did not confirm the hang-up "
                            f"({call.metadata.get('hangupError')}); retrying in the background")
        return call

    async def send_dtmf(self, call_id: str, digits: str) -> None:
        call = self._answered_call(call_id)
        voice = self._voices.get(call.callId)
        if voice is not None:
            await voice.bridge.send_dtmf(digits)
        else:
            await self.carrier.send_dtmf(call, digits)

    def status(self, call_id: str) -> CallRecord | None:
        return self.find_call(call_id, call_id)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    # ================================================================== speaking

    async def _say(self, call: CallRecord, text: str) -> None:
        self._transition(call, CallState.SPEAKING)
        entry = TranscriptEntry(self.clock.time(), "bot", text)
        call.transcript.append(entry)
        self._save(call)
        self._publish("call.speaking", call, text=text)
        voice = self._voices.get(call.callId)
        if voice is None and self._expects_media(call):
            voice = await self._wait_for_media(call)
        try:
            if voice is not None:
                spoken = await voice.say(text)
                if spoken.interrupted:
                    entry.text = spoken.heard_text
                    call.metadata["lastInterruptedText"] = text
                    self._save(call)
            else:
                await self.carrier.speak_native(call, text)
        except CarrierError as exc:  # (a TtsError goes up: the reply path apologizes or hangs up)
            raise CallError(f"Could not speak on call {call.callId}: {exc}") from None
        except (TtsError, TimeoutError) as exc:  # the speech engine failed or stalled
            self._publish("call.error", call, error=f"tts: {exc}", engine="tts")
            raise CallError(f"Could not speak on call {call.callId}: {exc}") from None
        if call.terminal:
            raise CallError(f"Call {call.callId} ended while speaking ({call.state})")

    def _prewarm(self, call: CallRecord) -> None:
        """Let the voice factory open the call's model/STT session while the call still rings."""
        prewarm = getattr(self._voice_factory, "prewarm", None)
        if prewarm is not None:
            prewarm(call)

    def _expects_media(self, call: CallRecord) -> bool:
        return self.carrier.streams_media and (self.settings.streaming.enabled or self.carrier.media_always)

    async def _wait_for_media(self, call: CallRecord) -> CallVoice | None:
        if call.callId in self._voices:
            return self._voices[call.callId]
        future: asyncio.Future[CallVoice | None] = asyncio.get_running_loop().create_future()
        self._media_waiters.setdefault(call.callId, []).append(future)
        try:
            return await self.clock.wait_for(future, MEDIA_WAIT_S)
        except TimeoutError:
            log.warning("call %s: no media stream after %.0fs; using the carrier's own voice", call.callId, MEDIA_WAIT_S)
            return None

    async def _speak_initial(self, call: CallRecord) -> None:
        """The first message once the call is answered: notify speaks then hangs up; conversation keeps going."""
        if call.metadata.get("initialMessageSpoken"):
            return
        call.metadata["initialMessageSpoken"] = True
        message = str(call.metadata.get("initialMessage") or "")
        try:
            if message:
                await self._say_for_api(call, message)
            if call.terminal:
                return
            if call.metadata.get("mode") == CallMode.NOTIFY:
                # the delay counts from the END of playback (the seed started it at playback start)
                await self.clock.sleep(self.settings.outbound.notifyHangupDelaySec)
                if not call.terminal:
                    await self._hangup(call, CallState.HANGUP_BOT)
            else:
                self._move(call, CallState.LISTENING)
        except CallError as exc:
            log.warning("call %s: initial message failed: %s", call.callId, exc)

    def _streaming_replies(self) -> bool:
        agent = self.settings.agent
        return self.conversation is not None and agent.responseMode == "streaming" and agent.responseContract == "tools"

    async def _respond(self, call: CallRecord, heard_at: float) -> None:
        """One reply turn per call at a time: newer caller words supersede a reply still running."""
        old = self._replies.get(call.callId)
        if old is not None and not old.done():
            voice = self._voices.get(call.callId)
            if voice is not None:
                voice.interrupt()  # a reply that is speaking ends at once, keeping what was heard
            settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            def settle(_: object) -> None:
                if not settled.done():
                    settled.set_result(None)

            old.add_done_callback(settle)
            try:
                await self.clock.wait_for(settled, SUPERSEDE_GRACE_S)
            except TimeoutError:  # still waiting on the model or a tool: stop it
                old.cancel()
                await asyncio.wait({old})
        me = asyncio.current_task()
        if me is not None:
            self._replies[call.callId] = me
        try:
            if self._streaming_replies() and self.conversation is not None:
                await self.conversation.respond(call, self, heard_at)
            else:
                await self._auto_respond(call)
        except CallError as exc:
            log.warning("call %s: reply not spoken: %s", call.callId, exc)
        finally:
            if self._replies.get(call.callId) is me:
                del self._replies[call.callId]

    async def _auto_respond(self, call: CallRecord) -> None:
        """The batch path: the whole reply (JSON contract), then speak it."""
        if self.responder is None or call.terminal:
            return
        started = self.clock.monotonic()
        try:
            reply = await self.responder.reply(call.transcript)
        except ResponderError as exc:
            self._publish("call.error", call, error=f"responder: {exc}", engine="responder")
            if self.conversation is not None:
                await self.conversation.failed(call, self, str(exc))
            else:
                log.warning("call %s: responder failed: %s", call.callId, exc)
            return
        if call.terminal or not reply.spoken:
            return
        call.metadata["lastResponseLatencyMs"] = round((self.clock.monotonic() - started) * 1000, 1)
        try:
            await self._say(call, reply.spoken)
        except CallError as exc:
            log.warning("call %s: reply not spoken: %s", call.callId, exc)
            return
        except (TimeoutError, OSError, TtsError) as exc:  # the voice failed: apologize or hang up, never silence
            if self.conversation is not None:
                await self.conversation.failed(call, self, str(exc) or type(exc).__name__)
            else:
                log.warning("call %s: reply not spoken: %s", call.callId, exc)
            return
        if reply.end_call and not call.terminal:
            await self.clock.sleep(self.settings.outbound.notifyHangupDelaySec)
            if not call.terminal:
                await self._hangup(call, CallState.HANGUP_BOT)
        elif not call.terminal:
            self._move(call, CallState.LISTENING)

    # ================================================================== conversation host (TurnHost, ToolHost)

    def transition(self, call: CallRecord, state: CallState) -> bool:
        return self._transition(call, state)

    def save(self, call: CallRecord) -> None:
        self._save(call)

    def publish(self, kind: str, call: CallRecord, **extra: Any) -> None:
        self._publish(kind, call, **extra)

    async def say(self, call: CallRecord, text: str) -> None:
        await self._say(call, text)

    async def hangup(self, call: CallRecord) -> None:
        await self._hangup(call, CallState.HANGUP_BOT)

    async def say_filler(self, call_id: str, text: str) -> None:
        call = self.calls.get(call_id)
        if call is None or call.terminal:
            return
        try:
            await self._say(call, text)
        except CallError as exc:
            log.info("call %s: filler not spoken: %s", call_id, exc)

    async def consult(self, call_id: str, question: str) -> str:
        """Ask the agent (RPC subscribers) through a `call.consult` event; wait for voicecall.consult.reply."""
        call = self._live_call(call_id)
        if not self._subscribers:
            return "No agent is listening right now; answer without it."
        consult_id = uuid.uuid4().hex
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._consults[consult_id] = (call.callId, answer)
        timeout_ms = self.settings.agent.consultTimeoutMs
        self._publish("call.consult", call, consultId=consult_id, question=question)
        try:
            return await self.clock.wait_for(answer, timeout_ms / 1000)
        except TimeoutError:
            log.info("call %s: consult %s unanswered after %d ms", call.callId, consult_id, timeout_ms)
            return f"The agent did not answer within {timeout_ms / 1000:g} seconds."
        finally:
            self._consults.pop(consult_id, None)

    def consult_reply(self, call_id: str, consult_id: str, answer: str) -> None:
        pending = self._consults.get(consult_id)
        if pending is None or pending[0] != call_id or pending[1].done():
            raise CallError(f"No open consult {consult_id} on call {call_id} (answered, timed out or never asked)")
        pending[1].set_result(answer)

    # ================================================================== after answer: keys out, machines

    async def _after_answer(self, call: CallRecord) -> None:
        """dtmfSequence first (an extension, an IVR menu), then machine detection or the first message."""
        sequence = call.metadata.get("dtmfSequence")
        if sequence and not call.metadata.get("dtmfSequenceSent"):
            try:
                await self._send_sequence(call, str(sequence))
            except CallError as exc:
                log.warning("call %s: dtmfSequence not sent: %s", call.callId, exc)
            call.metadata["dtmfSequenceSent"] = True
            self._save(call)
        if call.terminal:
            return
        mode = call.metadata.get("machineDetection")
        if mode and call.direction == Direction.OUTBOUND and "answeredBy" not in call.metadata:
            self._start_machine_detection(call, mode)
            return
        await self._speak_initial(call)

    async def _send_sequence(self, call: CallRecord, sequence: str) -> None:
        """Digits through send_dtmf; `w` pauses 0.5 s and `W` 1 s, on the manager's clock."""
        digits = ""
        for ch in sequence:
            if ch in "wW":
                if digits:
                    await self.send_dtmf(call.callId, digits)
                    digits = ""
                await self.clock.sleep(0.5 if ch == "w" else 1.0)
            else:
                digits += ch
        if digits:
            await self.send_dtmf(call.callId, digits)

    def _machine_pending(self, call: CallRecord) -> bool:
        """Detection still listening, a machine's greeting still playing, or a voicemail being left."""
        return call.callId in self._machine or "voicemailAfter" in call.metadata

    def _start_machine_detection(self, call: CallRecord, mode: MachineDetectionMode) -> None:
        if not self._expects_media(call):
            # no audio reaches us, and this carrier has no detector of its own
            self._machine_verdict(call, mode, AmdVerdict("unknown", "NOMEDIA", 0))
            return
        detection = MachineDetection(
            self.settings.amd, self.clock, wants_message_point=mode == "leave-message",
            on_verdict=lambda verdict: self._machine_verdict(call, mode, verdict),
            on_message_point=lambda reason: self._spawn(self._leave_message(call, reason),
                                                        f"voicemail-{call.callId}"))
        self._machine[call.callId] = detection
        voice = self._voices.get(call.callId)
        if voice is not None:
            detection.attach(voice.bridge)

    def _machine_verdict(self, call: CallRecord, mode: MachineDetectionMode, verdict: AmdVerdict) -> None:
        if call.terminal:
            return
        meta = call.metadata
        meta["answeredBy"] = verdict.answered_by
        meta["amdCause"] = verdict.cause
        meta["amdDecisionMs"] = verdict.at_ms
        self._save(call)
        log.info("call %s answered by %s (%s)", call.callId, verdict.answered_by, verdict.cause)
        self._publish("call.answered_by", call, answeredBy=verdict.answered_by, cause=verdict.cause,
                      decisionMs=verdict.at_ms)
        if verdict.answered_by == "machine" and mode == "hangup":
            self._spawn(self._hangup(call, CallState.HANGUP_BOT), f"amd-hangup-{call.callId}")
            return
        if verdict.answered_by == "machine" and mode == "leave-message":
            return  # the detector goes on listening for the end of the greeting
        self._machine.pop(call.callId, None)
        self._spawn(self._speak_initial(call), f"initial-{call.callId}")

    async def _leave_message(self, call: CallRecord, after: str) -> None:
        """The greeting is over (its beep ended, or a long silence): speak the message, hang up."""
        self._machine.pop(call.callId, None)
        if call.terminal:
            return
        call.metadata["voicemailAfter"] = after
        call.initial_message_spoken = True
        text = call.metadata.get("voicemailMessage") or self.settings.amd.voicemailMessage or call.initial_message
        voice = self._voices.get(call.callId)
        if voice is not None:
            voice.bridge.barge_in_enabled = False  # the machine's own sounds must not cut the message
        try:
            await self._say(call, text)
        except CallError as exc:
            log.warning("call %s: voicemail message failed: %s", call.callId, exc)
            return
        if not call.terminal:
            await self._hangup(call, CallState.VOICEMAIL)

    # ================================================================== events

    def has_processed(self, event: CallEvent) -> bool:
        """Whether an event with this key was applied already (a carrier's redelivery)."""
        return event.key in self._processed

    async def forward_event(self, event: CallEvent) -> bool:
        """On a cluster, an event for another node's call goes to that node; True when it went there."""
        if self.event_forwarder is None or self.find_call(event.call_id, event.provider_call_id) is not None:
            return False
        return await self.event_forwarder(event)

    def process_event(self, event: CallEvent) -> CallRecord | None:
        """Apply one normalized event. Sync: side effects that need I/O are spawned as tasks."""
        if event.key in self._processed:
            return self.find_call(event.call_id, event.provider_call_id)
        self._remember(event.key)
        token = call_id_var.set(event.call_id)
        try:
            return self._process(event)
        finally:
            call_id_var.reset(token)

    def _process(self, event: CallEvent) -> CallRecord | None:
        call = self.find_call(event.call_id, event.provider_call_id)
        if call is None and event.previous_provider_call_id:
            call = self.find_call(None, event.previous_provider_call_id)
        if call is None and event.type == EventType.ENDED and event.provider_call_id:
            self._remember(f"ended:{event.provider_call_id}")  # its INITIATED may still come, late
        if call is None:
            call = self._register_unknown(event)
            if call is None:
                return None
        if event.provider_call_id and call.providerCallId != event.provider_call_id:
            self._link_provider_id(call, event.provider_call_id)
        if call.terminal:
            return call
        call_id_var.set(call.callId)  # tasks spawned while applying the event inherit it
        call.processedEventIds.append(event.key)
        del call.processedEventIds[:-500]
        self._apply(call, event)
        self._save(call)
        return call

    def _remember(self, key: str) -> None:
        if len(self._processed) >= MAX_PROCESSED_IDS:
            self._processed.clear()  # a full reset is rare and only re-opens very old ids
        self._processed.add(key)

    def _register_unknown(self, event: CallEvent) -> CallRecord | None:
        if event.direction is None or event.type == EventType.ENDED:
            log.info("event %s for unknown call %s ignored", event.type, event.provider_call_id or event.call_id)
            return None
        if f"ended:{event.provider_call_id}" in self._processed:
            log.info("late %s for call %s that already ended ignored", event.type, event.provider_call_id)
            return None
        provider_id = event.provider_call_id or ""
        if event.direction == Direction.INBOUND:
            reason = self._inbound_refusal(event.from_number)
            if reason is not None:
                self._refuse(event, reason)
                return None
        call = CallRecord(
            callId=event.call_id if event.call_id and is_safe_id(event.call_id) else str(uuid.uuid4()),
            provider=self.carrier.name,
            direction=event.direction,
            state=CallState.RINGING,
            from_=event.from_number or "",
            to=event.to_number or "",
            startedAt=self.clock.time(),
            providerCallId=provider_id or None,
            metadata={"mode": CallMode.CONVERSATION.value, "turnCount": 0},
        )
        if event.direction == Direction.INBOUND:
            call.metadata["initialMessage"] = self.settings.inboundGreeting
        self._stamp_node(call)
        call_id_var.set(call.callId)
        self.calls[call.callId] = call
        if provider_id:
            self._by_provider_id[provider_id] = call.callId
        self._save(call)
        self._publish("call.created", call)
        if event.direction == Direction.INBOUND:
            self._prewarm(call)
            self._spawn(self._answer(call), f"answer-{call.callId}")
        return call

    def _inbound_refusal(self, caller: str | None) -> str | None:
        policy = self.settings.inboundPolicy
        if policy == "disabled":
            return "inbound calls are disabled"
        if policy in ("allowlist", "pairing"):
            if not caller:
                return "no caller id"
            if not any(_same_caller(caller, allowed) for allowed in self.settings.allowFrom):
                return "caller not in allowFrom"
        if len(self.active_calls()) >= self.settings.maxConcurrentCalls:
            return f"maximum concurrent calls ({self.settings.maxConcurrentCalls}) reached"
        return None

    def _refuse(self, event: CallEvent, reason: str) -> None:
        provider_id = event.provider_call_id or event.call_id or ""
        log.info("inbound call from %s refused: %s", _mask_number(event.from_number), reason)
        if provider_id in self._rejected_provider_ids:
            return  # one hang-up per rejected call, however many webhooks it sends
        if len(self._rejected_provider_ids) >= MAX_PROCESSED_IDS:
            self._rejected_provider_ids.clear()
        self._rejected_provider_ids.add(provider_id)
        ghost = CallRecord(
            callId=event.call_id if event.call_id and is_safe_id(event.call_id) else f"rejected-{uuid.uuid4().hex[:12]}",
            provider=self.carrier.name,
            direction=Direction.INBOUND,
            state=CallState.HANGUP_BOT,
            from_=event.from_number or "",
            to=event.to_number or "",
            startedAt=self.clock.time(),
            providerCallId=provider_id or None,
            endedAt=self.clock.time(),
            endReason=CallState.HANGUP_BOT.value,
            metadata={"rejected": reason},
        )
        self._publish("call.rejected", ghost, reason=reason)
        self._spawn(self.carrier.reject_call(ghost), f"reject-{provider_id}")

    async def _answer(self, call: CallRecord) -> None:
        if self.shared is not None and not await self.shared.reserve(call.callId, self.settings.maxConcurrentCalls):
            log.info("inbound call %s refused: maximum concurrent calls reached on the cluster", call.callId)
            self._spawn(self.carrier.reject_call(call), f"reject-{call.callId}")
            self._finalize(call, CallState.HANGUP_BOT, error="maximum concurrent calls reached on the cluster")
            return
        try:
            await self.carrier.answer_call(call)
        except CarrierError as exc:
            log.warning("call %s: answer failed: %s", call.callId, exc)
            self._finalize(call, CallState.ERROR, error=str(exc))

    def _apply(self, call: CallRecord, event: CallEvent) -> None:
        kind = event.type
        if kind == EventType.INITIATED:
            self._transition(call, CallState.INITIATED)
        elif kind == EventType.RINGING:
            self._transition(call, CallState.RINGING)
        elif kind in (EventType.ANSWERED, EventType.ACTIVE):
            first_answer = call.answeredAt is None
            self._transition(call, CallState.ANSWERED if kind == EventType.ANSWERED else CallState.ACTIVE)
            if first_answer:
                call.answeredAt = self.clock.time()
                self._start_max_duration(call, self.settings.maxDurationSeconds)
                self._publish("call.answered", call)
                self._spawn(self._after_answer(call), f"initial-{call.callId}")
        elif kind == EventType.SPEAKING:
            if event.text:  # a realtime model's own words, as the caller heard them
                call.transcript.append(TranscriptEntry(event.timestamp, "bot", event.text))
                self._publish("call.speaking", call, text=event.text)
            else:
                self._transition(call, CallState.SPEAKING)
        elif kind == EventType.SPEECH:
            self._on_speech(call, event)
        elif kind == EventType.DTMF:
            call.metadata.setdefault("dtmf", "")
            call.metadata["dtmf"] += event.digits or ""
            self._publish("call.dtmf", call, digits=event.digits)
        elif kind == EventType.ENDED:
            self._finalize(call, event.reason or CallState.COMPLETED)
        elif kind == EventType.ERROR:
            self._publish("call.error", call, error=event.error)
            if not event.retryable:
                self._finalize(call, CallState.ERROR, error=event.error)
            elif (event.error or "").startswith("stt lost:"):
                self._stt_lost(call, event.error or "stt lost")

    def _stt_lost(self, call: CallRecord, error: str) -> None:
        """The STT session gave up (its engine already retried): the bot can no longer hear the caller.
        A conversation would go silent, so it says so and hangs up; recorded as `sttLost`."""
        if call.terminal or call.metadata.get("sttLost"):
            return
        call.metadata["sttLost"] = error
        self._save(call)
        if call.mode == CallMode.CONVERSATION:
            self._spawn(self._goodbye_deaf(call), f"stt-lost-{call.callId}")

    async def _goodbye_deaf(self, call: CallRecord) -> None:
        reply = self._replies.get(call.callId)
        if reply is not None:
            reply.cancel()
        try:
            await self._say(call, STT_LOST_MESSAGE)
        except (CallError, TimeoutError, OSError, TtsError) as exc:
            log.warning("call %s: could not say goodbye after losing speech recognition: %s", call.callId, exc)
        if not call.terminal:
            await self._hangup(call, CallState.HANGUP_BOT)

    def _on_speech(self, call: CallRecord, event: CallEvent) -> None:
        text = (event.transcript or "").strip()
        if not event.is_final:
            self._publish("call.partial", call, transcript=text)
            return
        if not text:
            return
        turn = self._turns.get(call.callId)
        if turn is not None and event.turn_token is not None and event.turn_token != turn.token:
            # an answer to an earlier question: kept out of the turn AND of the transcript the model reads
            log.info("call %s: stale transcript (old turn token) dropped", call.callId)
            call.metadata["staleTranscripts"] = int(call.metadata.get("staleTranscripts", 0)) + 1
            return
        heard_at = self.clock.monotonic()
        call.transcript.append(TranscriptEntry(event.timestamp, "user", text))
        self._publish("call.speech", call, transcript=text)
        if self._machine_pending(call):
            return  # "Hello?" while detection listens, or a machine's greeting: no reply to those
        if turn is not None:
            if not turn.future.done():
                turn.future.set_result(text)
            return
        if self.settings.realtime.enabled:
            return  # speech-to-speech: the realtime model answers the caller by itself
        if call.direction == Direction.INBOUND or call.metadata.get("mode") == CallMode.CONVERSATION:
            self._spawn(self._respond(call, heard_at), f"respond-{call.callId}")

    def _transition(self, call: CallRecord, target: CallState) -> bool:
        if call.state == target:
            return True
        if not can_transition(call.state, target):
            log.info("call %s: transition %s -> %s refused", call.callId, call.state, target)
            return False
        call.state = target
        self._publish("call.state", call)
        return True

    def _move(self, call: CallRecord, target: CallState) -> None:
        """A transition outside event processing (which saves after applying): written at once, so a
        restart never brings the call back in an older state."""
        if call.state != target and self._transition(call, target):
            self._save(call)

    async def _hangup(self, call: CallRecord, reason: CallState) -> bool:
        """Ask the carrier to hang up; the call is final only once it has (or says it no longer has
        the call). Otherwise the call stays live, and the hang-up is retried with backoff."""
        if await self._try_hangup(call, reason):
            return True
        if call.callId not in self._hangup_retries:
            self._schedule_hangup_retry(call, reason, 0)
        return False

    async def _try_hangup(self, call: CallRecord, reason: CallState) -> bool:
        if call.terminal:
            return True
        try:
            await self._bounded(self.carrier.hangup_call(call, reason), HANGUP_ATTEMPT_S)
        except CarrierError as exc:
            if exc.status == 404:  # the carrier has no such call (any more): nothing is up
                log.info("call %s: carrier no longer has the call", call.callId)
            else:
                return self._hangup_failed(call, reason, str(exc))
        except TimeoutError:
            return self._hangup_failed(call, reason, f"no answer from the carrier in {HANGUP_ATTEMPT_S:.0f}s")
        self._finalize(call, reason)
        return True

    def _hangup_failed(self, call: CallRecord, reason: CallState, error: str) -> bool:
        log.warning("call %s: hang-up not confirmed (%s); will retry", call.callId, error)
        call.metadata["hangupError"] = error
        call.metadata["hangupPending"] = reason.value
        self._save(call)
        return False

    def _schedule_hangup_retry(self, call: CallRecord, reason: CallState, attempt: int) -> None:
        delay = min(HANGUP_RETRY_MAX_S, HANGUP_RETRY_FIRST_S * 2 ** attempt)

        async def retry() -> None:
            if call.terminal or self.stopping:
                self._hangup_retries.pop(call.callId, None)
                return
            if await self._try_hangup(call, reason):
                self._hangup_retries.pop(call.callId, None)
            else:
                self._schedule_hangup_retry(call, reason, attempt + 1)

        self._hangup_retries[call.callId] = self.clock.call_later(
            delay, lambda: self._spawn(retry(), f"hangup-retry-{call.callId}"))

    async def _bounded(self, awaitable: Awaitable[Any], seconds: float) -> Any:
        """Await with a limit on the manager's clock; the work is cancelled when the limit passes."""
        task = asyncio.ensure_future(awaitable)
        expired: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def expire() -> None:
            if not expired.done():
                expired.set_result(None)

        timer = self.clock.call_later(seconds, expire)
        try:
            await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise TimeoutError
        return task.result()

    def _finalize(self, call: CallRecord, reason: CallState, *, error: str | None = None) -> None:
        if call.terminal:
            return
        call.state = reason
        call.endedAt = self.clock.time()
        call.endReason = reason.value
        if error:
            call.metadata["error"] = error
        timer = self._timers.pop(call.callId, None)
        if timer is not None:
            timer.cancel()
        retry = self._hangup_retries.pop(call.callId, None)
        if retry is not None:
            retry.cancel()
        call.metadata.pop("hangupPending", None)
        detection = self._machine.pop(call.callId, None)
        if detection is not None:
            detection.close()
        turn = self._turns.get(call.callId)
        if turn is not None and not turn.future.done():
            turn.future.set_exception(CallError(f"Call ended ({reason}) before a transcript arrived"))
        for waiter in self._media_waiters.pop(call.callId, []):
            if not waiter.done():
                waiter.set_result(None)
        voice = self._voices.pop(call.callId, None)
        if voice is not None:
            self._spawn(voice.close(), f"close-voice-{call.callId}")
        discard = getattr(self._voice_factory, "discard", None)
        if discard is not None:
            discard(call.callId)  # a pre-warmed session the call never used
        for owner, answer in list(self._consults.values()):
            if owner == call.callId and not answer.done():
                answer.set_result("The call has ended.")
        if self.conversation is not None:
            self.conversation.forget(call.callId)
        self._save(call)
        self._publish("call.ended", call, reason=reason.value)
        self._report(call)
        self._remember_ended(call)

    def _remember_ended(self, call: CallRecord) -> None:
        """Keep only the last `ended_calls_kept` ended calls in memory."""
        self._ended[call.callId] = None
        while len(self._ended) > self.ended_calls_kept:
            old_id, _ = self._ended.popitem(last=False)
            old = self.calls.pop(old_id, None)
            if old is None:
                continue
            for provider_id in [old.providerCallId, *old.metadata.get("previousProviderCallIds", [])]:
                if provider_id and self._by_provider_id.get(provider_id) == old_id:
                    del self._by_provider_id[provider_id]

    def _report(self, call: CallRecord) -> None:
        """The after-call report: to subscribers as `call.report`, to hooks.callEnded via the outbox."""
        if self.reports is None and not self._subscribers and self.shared is None:
            return
        recording = None
        if self.settings.recording.enabled and "mediaAttached" in call.metadata:  # a leg was attached once
            recording = str(self.settings.store_dir / "recordings" / f"{call.callId}.wav")
        report = build_report(call, delivery_id=uuid.uuid4().hex, recording=recording)
        self._publish("call.report", call, report=report)
        if self.reports is not None:
            self.reports.submit(report)

    # ================================================================== timers

    def _start_max_duration(self, call: CallRecord, seconds: float) -> None:
        old = self._timers.pop(call.callId, None)
        if old is not None:
            old.cancel()

        def expire() -> None:
            self._timers.pop(call.callId, None)
            if not call.terminal:
                log.info("call %s: max duration reached", call.callId)
                self._spawn(self._hangup(call, CallState.TIMEOUT), f"timeout-{call.callId}")

        self._timers[call.callId] = self.clock.call_later(max(0.0, seconds), expire)

    def _start_ring_timeout(self, call: CallRecord, *, already: float = 0.0) -> None:
        """Our own limit on ringing, beside the carrier's: if its no-answer never reaches us (a webhook
        that cannot be verified, a lost callback), the call must not hold a slot forever. Answering
        replaces this timer with the max-duration one."""
        seconds = self.settings.ringTimeoutMs / 1000 + RING_TIMEOUT_SLACK_S
        remaining = max(0.0, seconds - already)

        def expire() -> None:
            self._timers.pop(call.callId, None)
            if not call.terminal and call.answeredAt is None:
                log.info("call %s: not answered within %.0fs", call.callId, seconds)
                call.metadata["ringTimeout"] = True
                self._spawn(self._hangup(call, CallState.NO_ANSWER), f"ring-timeout-{call.callId}")

        self._timers[call.callId] = self.clock.call_later(remaining, expire)

    def _schedule_reaper(self) -> None:
        self._reaper = self.clock.call_later(REAPER_INTERVAL_S, self._reap)

    def _reap(self) -> None:
        limit = self.settings.staleCallReaperSeconds
        now = self.clock.time()
        for call in self.active_calls():
            if now - call.startedAt >= limit:
                log.info("call %s: stale for %.0fs, reaping", call.callId, now - call.startedAt)
                call.metadata["reaped"] = True
                self._spawn(self._hangup(call, CallState.TIMEOUT), f"reap-{call.callId}")
        self._schedule_reaper()

    # ================================================================== restart recovery

    async def _recover(self) -> None:
        replay = await self.store.load()
        if replay.skipped_lines:
            log.warning("call log: %d unreadable line(s) skipped", replay.skipped_lines)
        now = self.clock.time()
        for call in replay.calls.values():
            self.calls[call.callId] = call
            if call.providerCallId:
                self._by_provider_id[call.providerCallId] = call.callId
            self._processed.update(call.processedEventIds)
        for call in sorted((c for c in replay.calls.values() if c.terminal), key=lambda c: c.endedAt or 0):
            self._remember_ended(call)
        for call in [c for c in replay.calls.values() if not c.terminal]:
            if not call.providerCallId:
                self._finalize(call, CallState.ERROR, error="lost on restart (never reached the carrier)")
                continue
            if now - call.startedAt > self.settings.maxDurationSeconds:
                self._finalize(call, CallState.TIMEOUT, error="older than maxDurationSeconds at restart")
                continue
            try:
                status = await self.carrier.get_call_status(call)
            except CarrierError as exc:
                log.warning("call %s: status check failed on restart (%s); keeping it", call.callId, exc)
                status = None
            if status is not None and status.terminal:
                self._finalize(call, status.state or CallState.COMPLETED)
                continue
            # initial message was already handled before the restart; do not speak it again
            call.metadata["initialMessageSpoken"] = True
            if call.answeredAt is not None:
                elapsed = now - call.answeredAt
                self._start_max_duration(call, self.settings.maxDurationSeconds - elapsed)
            elif call.direction == Direction.OUTBOUND:
                self._start_ring_timeout(call, already=now - call.startedAt)
            log.info("call %s restored in state %s", call.callId, call.state)

    # ================================================================== bookkeeping

    def _link_provider_id(self, call: CallRecord, provider_id: str) -> None:
        if call.providerCallId and call.providerCallId != provider_id:
            call.metadata.setdefault("previousProviderCallIds", []).append(call.providerCallId)
        call.providerCallId = provider_id
        self._by_provider_id[provider_id] = call.callId

    def _save(self, call: CallRecord) -> None:
        was_degraded = self.store.degraded
        if self.store.append(call) or was_degraded:
            return
        log.error("call log write failed (%s); keeping records in memory and retrying", self.store.last_error)
        self._schedule_store_retry()

    def _schedule_store_retry(self) -> None:
        def retry() -> None:
            if self.store.flush():
                log.warning("call log writable again; kept records written")
            elif not self.stopping:
                self._schedule_store_retry()

        self.clock.call_later(STORE_RETRY_S, retry)

    def announce_ended(self, call: CallRecord) -> None:
        """Another node's call that this node ended (failover): its subscribers learn of it too."""
        self._publish("call.ended", call, reason=call.endReason or "")

    async def hangup_orphan(self, call: CallRecord) -> None:
        """End at the carrier a call whose node is gone (failover); a failed request is logged, not raised."""
        try:
            await self.carrier.hangup_call(call, CallState.HANGUP_BOT)
        except CarrierError as exc:
            log.warning("call %s: failover hang-up failed: %s", call.callId, exc)

    def _stamp_node(self, call: CallRecord) -> None:
        if self.shared is not None:
            call.metadata["node"] = self.shared.node_id

    def _publish(self, kind: str, call: CallRecord, **extra: Any) -> None:
        for observer in self.observers:
            try:
                observer(kind, call, extra)
            except Exception:  # noqa: BLE001 - monitoring must never break a call
                log.exception("call observer failed on %s", kind)
        if self.shared is not None:  # every node's subscribers get it from the bus, this node's too
            self.shared.publish({"type": kind, "callId": call.callId, "state": str(call.state), **extra})
            return
        if not self._subscribers:
            return
        self._fan_out({"type": kind, "callId": call.callId, "state": str(call.state), **extra})

    def _fan_out(self, message: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                log.warning("event subscriber too slow; dropping it")
                self._subscribers.discard(queue)

    async def _relay_bus(self, shared: SharedStore, stream: AsyncIterator[dict[str, Any]]) -> None:
        while True:
            try:
                async for message in stream:
                    self._fan_out(message)
                stream = await shared.subscribe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: resubscribe when it is back
                log.warning("event bus lost (%s); resubscribing", type(exc).__name__)
                await self.clock.sleep(0.5)
                try:
                    stream = await shared.subscribe()
                except Exception:  # noqa: BLE001, S112 - still away: the next round tries again
                    continue

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name)

    async def drain(self) -> None:
        """Wait for spawned side effects (tests)."""
        await self._tasks.drain()


def _digits(number: str) -> str:
    return "".join(ch for ch in number if ch.isdigit())


def _same_caller(caller: str, allowed: str) -> bool:
    if allowed.startswith(("sip:", "sips:")) or caller.startswith(("sip:", "sips:")):
        return _sip_identity(caller) == _sip_identity(allowed)
    return bool(_digits(caller)) and _digits(caller) == _digits(allowed)


def _sip_identity(uri: str) -> str:
    uri = uri.split(";", 1)[0].strip("<>").lower()
    for prefix in ("sips:", "sip:"):
        uri = uri.removeprefix(prefix)
    return uri.split(":", 1)[0] if "@" in uri else uri


def _mask_number(number: str | None) -> str:
    if not number:
        return "(unknown)"
    return number[:-4] + "****" if len(number) > 6 else "****"
