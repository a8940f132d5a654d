"""The API the RPC, the CLI and the agent tool use: initiate, speak, continue, end, status, subscribe."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from bridge.calls import CallMode, CallRecord, CallState, Direction
from bridge.config import is_destination, match_number
from bridge.logs import call_id_var
from bridge.manager_core import CallError, PendingTurn
from bridge.turns import Turns
from carriers.base import CarrierError, OutboundRequest

log = logging.getLogger(__name__)

DIAL_STRING_PROVIDERS = ("sip", "asterisk")  # these also dial extensions and dial strings; they check `to` themselves
MACHINE_DETECTION_MODES = ("off", "detect", "hangup", "leave-message")
DTMF_SEQUENCE_CHARS = frozenset("0123456789*#ABCDwW")
MAX_DTMF_SEQUENCE = 64


class CallApi(Turns):
    async def initiate(self, to: str | None, message: str, mode: str | None = None, *,
                       machine_detection: str | None = None, dtmf_sequence: str | None = None,
                       voicemail_message: str | None = None, from_number: str | None = None) -> CallRecord:
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
        caller = self._caller_id(from_number)
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
            from_=caller,
            to=to,
            startedAt=now,
            metadata={"initialMessage": message, "mode": str(mode), "turnCount": 0},
        )
        native = detection != "off" and self.settings.amd.detector == "auto" \
            and self.carrier.native_amd(detection) is not None
        if detection != "off":
            call.metadata["machineDetection"] = detection
            call.metadata["amdNative"] = native  # the carrier's own detector, asked for on the dial
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
                                  stream=self.settings.streaming.enabled, machine_detection=detection,
                                  native_amd=native)
        await self._dial(call, request, "Call could not be placed")
        if not call.terminal:
            self._start_ring_timeout(call)
        return call

    def _caller_id(self, from_number: str | None) -> str:
        """The `from` of an outbound call: fromNumber, or one of our `numbers` (whose agent then speaks)."""
        if not from_number:
            return self.settings.fromNumber or ""
        key = match_number(self.settings.number_keys(), from_number)
        if key is not None:
            return key
        if self.settings.fromNumber and match_number([self.settings.fromNumber], from_number):
            return self.settings.fromNumber
        raise CallError("`from` must be fromNumber or one of the `numbers` keys "
                        f"(got {from_number[:40]!r})")

    async def speak(self, call_id: str, message: str) -> None:
        call = self._answered_call(call_id)
        if not message or not message.strip():
            raise CallError("`message` must be a non-empty string")
        await self._say_for_api(call, message)

    async def continue_call(self, call_id: str, message: str) -> str:
        """Speak, listen, and return the caller's next final transcript."""
        call = self._answered_call(call_id)
        if call.callId in self._turns:
            raise CallError(f"A turn is already in progress on call {call.callId}")
        loop = asyncio.get_running_loop()
        turn = PendingTurn(token=uuid.uuid4().hex, future=loop.create_future(), started=self.clock.monotonic())
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

    def status(self, call_id: str) -> CallRecord | None:
        return self.find_call(call_id, call_id)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        return self.fanout.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.fanout.unsubscribe(queue)
