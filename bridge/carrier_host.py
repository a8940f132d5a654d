"""What carriers see (the CarrierHost): webhook and stream URLs, stream tokens, media legs attached and
detached, and the intake of their normalized events (dedupe, unknown and inbound calls, application
of each event to its call)."""

from __future__ import annotations

import hmac
import logging
import secrets
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit, urlunsplit

from bridge import inbound_policy
from bridge.answering import Answering
from bridge.calls import CallEvent, CallMode, CallRecord, CallState, Direction, EventType, TranscriptEntry
from bridge.logs import call_id_var
from bridge.manager_core import CallError
from bridge.store import is_safe_id
from carriers.base import CarrierError
from media.transport import MediaTransport
from media.tts.base import TtsError

if TYPE_CHECKING:
    from media.pipeline import MediaPipeline

log = logging.getLogger(__name__)

MAX_PROCESSED_IDS = 200_000
STT_LOST_MESSAGE = "Sorry, I can no longer hear you. Please call again later. Goodbye."


class CarrierHost(Answering):
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
        if self.transfers.is_leg(call):  # the person's "Hello?" must not cut the briefing short
            voice.bridge.barge_in_enabled = False
        self._spawn(voice.start(), f"voice-start-{call_id}")
        detection = self._machine.get(call_id)
        if detection is not None:
            detection.attach(voice.bridge)
        call.media_attached = True
        self._stream_restarts.pop(call_id, None)  # a replaced stream is back: the same call goes on
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
        restart_until = self._stream_restarts.get(call_id)
        if restart_until is not None:  # the carrier replaces the stream on purpose (keys out on Twilio)
            grace = max(grace, restart_until - self.clock.monotonic())

        def expire() -> None:
            if call.state == CallState.TRANSFERRING and not self.transfers.is_leg(call):
                return  # a cold transfer replaced the stream (Twilio <Dial>); its outcome decides
            if not call.terminal and call.callId not in self._voices:
                call.metadata["streamLost"] = True
                self._spawn(self._hangup(call, CallState.COMPLETED), f"stream-lost-{call_id}")

        self.clock.call_later(grace, expire)

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

    # ================================================================== events

    def has_processed(self, event: CallEvent) -> bool:
        """Whether an event with this key was applied already (a carrier's redelivery)."""
        return event.key in self._processed

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
        if event.type == EventType.SPEECH and not event.is_final:
            # a partial transcript (several a second while the caller talks) is only published: the
            # record does not change, so no call-log write (nor a redelivery to guard: it is our own)
            self._apply(call, event)
            return call
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
        agent = self.settings.for_number(event.to_number)  # the dialled number's agent (`numbers`)
        if event.direction == Direction.INBOUND:
            reason = inbound_policy.refusal(agent.inboundPolicy, agent.allowFrom, event.from_number,
                                            active=self._conversations(), limit=self.settings.maxConcurrentCalls)
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
            call.metadata["initialMessage"] = agent.inboundGreeting
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

    def _refuse(self, event: CallEvent, reason: str) -> None:
        provider_id = event.provider_call_id or event.call_id or ""
        log.info("inbound call from %s refused: %s", inbound_policy.mask_number(event.from_number), reason)
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
                if self.transfers.is_leg(call):
                    self.transfers.on_leg_answered(call)
                else:
                    self._spawn(self._after_answer(call), f"initial-{call.callId}")
        elif kind == EventType.SPEAKING:
            if event.text:  # a realtime model's own words, as the caller heard them
                call.transcript.append(TranscriptEntry(event.timestamp, "bot", event.text))
                self._publish("call.speaking", call, text=event.text)
            else:
                self._transition(call, CallState.SPEAKING)
        elif kind == EventType.SPEECH:
            self._on_speech(call, event)
        elif kind == EventType.MACHINE:
            if event.machine is not None:
                self._machine_report(call, event.machine)
        elif kind == EventType.DTMF:
            call.metadata.setdefault("dtmf", "")
            call.metadata["dtmf"] += event.digits or ""
            self._publish("call.dtmf", call, digits=event.digits)
        elif kind == EventType.ENDED:
            self._finalize(call, event.reason or CallState.COMPLETED)
        elif kind == EventType.TRANSFER:
            self.transfers.on_outcome(call, event.outcome, event.error)
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
        call.transcript.append(TranscriptEntry(event.timestamp, "user", text))
        self._publish("call.speech", call, transcript=text)
        if self._machine_pending(call):
            return  # "Hello?" while detection listens, or a machine's greeting: no reply to those
        if self.transfers.holds(call):
            return  # being transferred, talking to the person through the relay, or the person's own call
        if turn is not None:
            if not turn.future.done():
                turn.future.set_result(text)
            return
        if self._agent(call).realtime.enabled:
            return  # speech-to-speech: the realtime model answers the caller by itself
        if call.direction == Direction.INBOUND or call.metadata.get("mode") == CallMode.CONVERSATION:
            self._spawn(self._respond(call), f"respond-{call.callId}")

