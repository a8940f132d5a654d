"""Saying and answering: speak on a call (its voice or the carrier's own), the first message, the reply
turns (streaming conversation or the batch responder), and what the conversation engine and its
tools may ask of the call's owner (TurnHost, ToolHost)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from bridge.calls import CallMode, CallRecord, CallState, TranscriptEntry
from bridge.lifecycle import Lifecycle
from bridge.manager_core import CallError
from bridge.responder import ResponderError
from carriers.base import CarrierError
from media.tts.base import TtsError

if TYPE_CHECKING:
    from bridge.voice import CallVoice

log = logging.getLogger(__name__)

MEDIA_WAIT_S = 10.0
STREAM_RESTART_S = 10.0  # a media stream the carrier replaces on purpose may be away this long
SUPERSEDE_GRACE_S = 0.5  # a superseded reply gets this long to finish its bookkeeping before it is cancelled


class Turns(Lifecycle):
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

    async def _say_for_api(self, call: CallRecord, text: str) -> None:
        """Speak for an API caller: a voice engine failing mid-call is a clear error, the call stays up."""
        try:
            await self._say(call, text)
        except TtsError as exc:
            raise CallError(f"Could not speak on call {call.callId}: {exc}") from None

    def _prewarm(self, call: CallRecord) -> None:
        """Let the voice factory open the call's model/STT session (and TTS connection), and the chat model
        its connection, while the call still rings."""
        prewarm = getattr(self._voice_factory, "prewarm", None)
        if prewarm is not None:
            prewarm(call)
        chat_warm = getattr(self.conversation, "prewarm", None)
        if chat_warm is not None and call.mode == CallMode.CONVERSATION and not self.settings.realtime.enabled:
            chat_warm(call)

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

    def _streaming_replies(self, call: CallRecord) -> bool:
        agent = self._agent(call).agent  # the call's number may have its own (`numbers`)
        return self.conversation is not None and agent.responseMode == "streaming" and agent.responseContract == "tools"

    async def _respond(self, call: CallRecord) -> None:
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
            if self._streaming_replies(call) and self.conversation is not None:
                await self.conversation.respond(call, self)
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
        voice = self._voices.get(call.callId)
        if voice is not None:
            voice.note_turn(mode="batch")
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

    def save_soon(self, call: CallRecord) -> None:
        self._save_soon(call)

    def publish(self, kind: str, call: CallRecord, **extra: Any) -> None:
        self._publish(kind, call, **extra)

    async def say(self, call: CallRecord, text: str) -> None:
        await self._say(call, text)

    async def hangup(self, call: CallRecord) -> None:
        await self._hangup(call, CallState.HANGUP_BOT)

    async def send_dtmf(self, call_id: str, digits: str) -> None:
        """Keys out: the carrier's own way where it has one (REST, RFC 4733), else in-band tones on the
        call's media leg. Where that replaces the media stream (Twilio), the call waits for the new one."""
        call = self._answered_call(call_id)
        voice = self._voices.get(call.callId)
        if voice is not None and not self.carrier.sends_dtmf:  # no keys of its own: tones on the media leg
            await voice.bridge.send_dtmf(digits)
            return
        if self.carrier.dtmf_restarts_stream and self._expects_media(call):
            self._expect_stream_restart(call)
        try:
            await self.carrier.send_dtmf(call, digits)
        except CarrierError as exc:
            self._stream_restarts.pop(call.callId, None)
            raise CallError(f"Keys not sent on call {call.callId}: {exc}") from None

    def _expect_stream_restart(self, call: CallRecord) -> None:
        """The carrier is about to end the call's media stream and open a new one: the old voice goes now
        (so nothing is said into a stream that is ending), what is said next waits for the new stream,
        and the call is not ended while the stream is away (up to STREAM_RESTART_S)."""
        self._stream_restarts[call.callId] = self.clock.monotonic() + STREAM_RESTART_S
        voice = self._voices.pop(call.callId, None)
        if voice is not None:
            self._spawn(voice.close(), f"close-voice-{call.callId}")
        call.media_attached = False

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
        if not self.fanout.has_subscribers:
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
