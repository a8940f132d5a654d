"""Twilio Programmable Voice: REST call control, TwiML answers, verified webhooks, Media Streams.

How a call runs here:
- Outbound: `POST Calls.json` with `Url=<webhook>?callId=…` (the answer TwiML) and
  `StatusCallback=<webhook>?callId=…&type=status`. Inbound: Twilio fetches the number's voice URL
  (our webhook, no callId); the manager runs the inbound policy and `respond` answers with TwiML,
  or `<Reject/>`.
- With `streaming.enabled` the answer is `<Connect><Stream>` to our `/voice/stream`, the per-call
  token in a `<Parameter>` (Twilio drops the stream URL's query string); speech then flows
  through the MediaPipeline and TwiML is never replaced while the stream is up.
- Without streaming, the call speaks with `<Say>` and listens with `<Gather input="speech">`. Each
  `<Say>` is followed by a `<Redirect>` to our webhook (`type=said`), so we know exactly when Twilio
  finished saying it: `speak_native` returns then, as a streamed play returns when its mark comes
  back. The first message (notify text, conversation opener, inbound greeting) is part of the
  answer TwiML, served once; the manager's later `speak_native` of that same text waits for it
  instead of saying it again (the seed system spoke notify messages twice). After a notify
  message Twilio pauses and hangs up by itself only as a safety net: the manager hangs up
  `notifyHangupDelaySec` after the message ended.
- TwiML too long for the REST `Twiml` parameter (4000 characters) is served from our webhook
  instead (`Url=…type=twiml`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.calls import CallEvent, CallMode, CallRecord, CallState, Direction, EventType
from carriers.base import (
    CallGone,
    CallLookup,
    Carrier,
    CarrierError,
    MediaStreamCodec,
    NativeAmd,
    OutboundRequest,
    ProviderStatus,
    SpeechHeard,
    WebhookReply,
    WebhookRequest,
    WebhookResult,
    WebhookVerdict,
)
from carriers.http import CarrierHttp
from carriers.speech import wait_spoken
from carriers.twilio.protocol import (
    EMPTY_TWIML,
    HANGUP_TWIML,
    LIVE_STATUS,
    REJECT_TWIML,
    SIGNATURE_HEADER,
    TERMINAL_STATUS,
    XML,
    TwilioStreamCodec,
    amd_events,
    conference_verb,
    dial_outcome,
    dial_verb,
    direction,
    float_param,
    gather_verb,
    inbound_events,
    play_digits_verb,
    redirect_verb,
    say_verb,
    say_voice,
    status_events,
    stream_verb,
    transfer_event,
    twiml,
    verify_request,
)
from carriers.twilio.settings import TwilioSettings

if TYPE_CHECKING:
    from bridge.config import Settings

log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
PURGE_AT = 1024  # per-call bookkeeping entries before ended calls are swept
TWIML_PARAM_MAX = 4000  # Calls API: longer TwiML must come from a URL
AMD_TIMEOUT_S = 30  # MachineDetectionTimeout (Twilio's default): then AnsweredBy=unknown
AMD_CALLBACK_SLACK_S = 10  # the async callback may lag the timeout; after both the manager says unknown
DTMF_CHARS = frozenset("0123456789*#wW")


# ====================================================================== the carrier


@dataclass(slots=True)
class _Say:
    """One `<Say>` we handed Twilio; `done` resolves when Twilio fetched the Redirect after it."""

    call_id: str
    text: str
    done: asyncio.Future[None]
    served: bool = False  # part of an answer TwiML already returned to Twilio
    claimed: bool = False  # the manager's speak_native for it is waiting

    @classmethod
    def new(cls, call_id: str, text: str) -> _Say:
        return cls(call_id, text, asyncio.get_running_loop().create_future())


@dataclass(slots=True)
class _CallState:
    initial: _Say | None = None
    says: dict[str, _Say] = field(default_factory=dict)
    documents: dict[str, str] = field(default_factory=dict)  # TwiML served by URL (too long to send)


class TwilioCarrier(Carrier):
    name = "twilio"
    signature_headers = (SIGNATURE_HEADER,)
    streams_media = True
    transfer_ends_stream = True
    reports_dtmf = True
    sends_dtmf = True
    dtmf_pauses = True
    dtmf_restarts_stream = True  # <Play digits> replaces the TwiML, so <Connect><Stream> ends (and is restarted)

    def __init__(self, settings: Settings) -> None:
        twilio = self.twilio = settings.section(TwilioSettings)
        if not twilio.accountSid or twilio.authToken is None:
            raise CarrierError("twilio: accountSid and authToken are required")
        self.settings = settings
        self.account_sid = twilio.accountSid
        self._token = twilio.authToken.get_secret_value()
        self.http = CarrierHttp("twilio", twilio.apiBaseUrl, basic_auth=(self.account_sid, self._token),
                                headers={"Accept": "application/json"})
        self._calls: dict[str, _CallState] = {}
        self.voice = say_voice(settings.effective_tts)

    # ------------------------------------------------------------------ helpers

    def _path(self, suffix: str) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}/{suffix}"

    def _state(self, call_id: str) -> _CallState:
        state = self._calls.get(call_id)
        if state is None:
            if len(self._calls) >= PURGE_AT:
                self._purge()
            state = self._calls[call_id] = _CallState()
        return state

    def _new_say(self, call_id: str, text: str) -> tuple[str, _Say]:
        say = _Say.new(call_id, text)
        say_id = uuid.uuid4().hex[:16]
        self._state(call_id).says[say_id] = say
        return say_id, say

    def _said_url(self, call_id: str, say_id: str) -> str:
        return self.host.webhook_url(callId=call_id, type="said", say=say_id)

    def _say_twiml(self, call_id: str, say_id: str, text: str) -> str:
        return say_verb(text, self.voice) + redirect_verb(self._said_url(call_id, say_id))

    def listen_twiml(self, call_id: str, turn_token: str | None = None) -> str:
        """Gather speech; with no speech Twilio falls through to the Redirect, which listens again."""
        action = (self.host.webhook_url(callId=call_id, turnToken=turn_token) if turn_token
                  else self.host.webhook_url(callId=call_id, type="gather"))
        again = self.host.webhook_url(callId=call_id, type="listen", **({"turnToken": turn_token} if turn_token else {}))
        return twiml(gather_verb(action), redirect_verb(again))

    def _after_say_twiml(self, call: CallRecord | None, call_id: str) -> str:
        if call is not None and call.mode == CallMode.NOTIFY and call.direction == Direction.OUTBOUND:
            # The manager hangs up notifyHangupDelaySec after the message; this is only a safety net.
            pause = self.settings.outbound.notifyHangupDelaySec + 2
            return twiml(f'<Pause length="{pause}"/>', "<Hangup/>")
        return self.listen_twiml(call_id)

    def _purge(self) -> None:
        """Drop what we keep for calls that ended without telling us (an inbound caller hanging up
        on a number with no status callback configured)."""
        for call_id in list(self._calls):
            call = self.host.get_call(call_id)
            if call is None or call.terminal:
                self._finish_says(call_id)

    def _finish_says(self, call_id: str) -> None:
        state = self._calls.pop(call_id, None)
        if state is None:
            return
        for say in [*state.says.values(), *([state.initial] if state.initial else [])]:
            if not say.done.done():
                say.done.set_result(None)

    async def _update(self, call: CallRecord, form: dict[str, str] | list[tuple[str, str]]) -> Any:
        if not call.providerCallId:
            raise CarrierError(f"twilio: call {call.callId} has no CallSid yet")
        pairs = list(form.items()) if isinstance(form, dict) else list(form)
        if call.direction == Direction.INBOUND and any(k in ("Twiml", "Url") for k, _ in pairs):
            # An inbound call's status callback is whatever the number is configured with (maybe
            # none); ask for ours, so a caller hanging up is seen even without a media stream.
            pairs.append(("StatusCallback", self.host.webhook_url(callId=call.callId, type="status")))
        result = await self.http.request("POST", self._path(f"Calls/{call.providerCallId}.json"), form=pairs,
                                         idempotent=True)
        return result.body

    async def _set_twiml(self, call: CallRecord, document: str) -> None:
        """Redirect the live call to this TwiML: inline, or by URL when it is too long to send."""
        if len(document) <= TWIML_PARAM_MAX:
            await self._update(call, {"Twiml": document})
            return
        doc_id = uuid.uuid4().hex[:16]
        self._state(call.callId).documents[doc_id] = document
        await self._update(call, {"Url": self.host.webhook_url(callId=call.callId, type="twiml", doc=doc_id),
                                  "Method": "POST"})

    # ------------------------------------------------------------------ call control

    async def initiate_call(self, call: CallRecord, request: OutboundRequest) -> str:
        form: list[tuple[str, str]] = [
            ("To", request.to),
            ("From", request.from_number),
            ("Url", self.host.webhook_url(callId=call.callId)),
            ("Method", "POST"),
            ("StatusCallback", self.host.webhook_url(callId=call.callId, type="status")),
            ("StatusCallbackMethod", "POST"),
            *(("StatusCallbackEvent", event) for event in STATUS_EVENTS),
            ("Timeout", str(min(600, max(1, math.ceil(self.settings.ringTimeoutMs / 1000))))),
        ]
        if request.native_amd:
            # Asynchronous: the call's TwiML (the stream) runs at once; the verdict comes to type=amd.
            form += [("MachineDetection", self._amd_flavor(request.machine_detection)),
                     ("MachineDetectionTimeout", str(AMD_TIMEOUT_S)),
                     ("AsyncAmd", "true"),
                     ("AsyncAmdStatusCallback", self.host.webhook_url(callId=call.callId, type="amd")),
                     ("AsyncAmdStatusCallbackMethod", "POST")]
        if not request.stream and request.message:
            # Said by the answer TwiML (fetched once the callee picks up), not by a second request.
            self._state(call.callId).initial = _Say.new(call.callId, request.message)
        try:
            result = await self.http.request("POST", self._path("Calls.json"), form=form)
        except CarrierError:
            self._calls.pop(call.callId, None)
            raise
        sid = result.body.get("sid") if isinstance(result.body, dict) else None
        if not sid:
            self._calls.pop(call.callId, None)
            raise CarrierError("twilio: create-call answer has no sid")
        return str(sid)

    def _amd_flavor(self, mode: str) -> str:
        """DetectMessageEnd (machine_end_* when the greeting is over) where a message follows, else Enable
        (the verdict as soon as Twilio knows); `twilio.machineDetection` overrides."""
        return self.twilio.machineDetection or ("DetectMessageEnd" if mode == "leave-message" else "Enable")

    def native_amd(self, mode: str) -> NativeAmd:
        return NativeAmd(wait_s=AMD_TIMEOUT_S + AMD_CALLBACK_SLACK_S,
                         reports_greeting_end=self._amd_flavor(mode) == "DetectMessageEnd")

    async def hangup_call(self, call: CallRecord, reason: CallState) -> None:
        self._finish_says(call.callId)
        if not call.providerCallId:
            return
        path = self._path(f"Calls/{call.providerCallId}.json")
        # A call not answered yet is cancelled; `completed` only ends an in-progress call.
        status = "canceled" if call.answeredAt is None and call.direction == Direction.OUTBOUND else "completed"
        result = await self.http.request("POST", path, form={"Status": status}, idempotent=True, ok_statuses=(404,))
        body = result.body if isinstance(result.body, dict) else {}
        if status == "canceled" and result.status != 404 and body.get("status") == "in-progress":
            await self.http.request("POST", path, form={"Status": "completed"}, idempotent=True, ok_statuses=(404,))

    async def reject_call(self, call: CallRecord) -> None:
        return None  # the voice-URL reply is <Reject/>: Twilio never answers the call

    async def reattach_media(self, call: CallRecord) -> bool:
        """A call update whose TwiML opens a new stream (the answer's own document, token included)."""
        if not self.settings.streaming.enabled or not call.providerCallId:
            return False
        await self._update(call, {"Twiml": self._answer_reply(call, inbound=False).body})
        return True

    async def speak_native(self, call: CallRecord, text: str) -> None:
        if call.media_attached:
            raise CarrierError("twilio: a media stream is active; replacing its TwiML would cut the stream")
        state = self._state(call.callId)
        initial = state.initial
        if initial is not None and initial.text == text and not initial.claimed:
            initial.claimed = True  # the answer TwiML says it: wait for Twilio to finish, don't say it twice
            await self._wait_said(initial)
            return
        say_id, say = self._new_say(call.callId, text)
        await self._set_twiml(call, twiml(self._say_twiml(call.callId, say_id, text)))
        await self._wait_said(say)

    async def _wait_said(self, say: _Say) -> None:
        await wait_spoken(self.host.clock, say.done, say.text, carrier=self.name, call_id=say.call_id)

    async def start_listening(self, call: CallRecord, turn_token: str) -> None:
        if call.media_attached:
            return  # the stream's own STT listens; never replace live TwiML under a stream
        await self._set_twiml(call, self.listen_twiml(call.callId, turn_token))

    async def send_dtmf(self, call: CallRecord, digits: str) -> None:
        """`<Play digits>`. It replaces the call's TwiML, so what ran goes on after it: the media stream
        (a new `<Connect><Stream>` with the call's token; Twilio stops the old stream first), or
        listening."""
        if not digits or any(d not in DTMF_CHARS for d in digits):
            raise CarrierError("twilio: DTMF digits must be 0-9, *, #, w or W (pauses)")
        if self.settings.streaming.enabled:
            parameters = {"token": self.host.stream_token(call.callId), "callId": call.callId}
            after = stream_verb(self.host.stream_url(), parameters)
        else:
            after = redirect_verb(self.host.webhook_url(callId=call.callId, type="listen"))
        await self._set_twiml(call, twiml(play_digits_verb(digits), after))

    async def transfer_cold(self, call: CallRecord, to: str) -> None:
        """Replace the call's TwiML with `<Dial>` (its `<Connect><Stream>` ends). The person's answer
        (`type=xfer-leg`) completes the transfer; a `<Dial action>` (`type=dial`) without one fails it
        and gets the stream back as its TwiML."""
        ring_s = min(600, max(5, math.ceil(self.settings.transfer.ringTimeoutMs / 1000)))
        ours = call.to if call.direction == Direction.INBOUND else call.from_
        document = twiml(dial_verb(to, action=self.host.webhook_url(callId=call.callId, type="dial"),
                                   leg_callback=self.host.webhook_url(callId=call.callId, type="xfer-leg"),
                                   timeout_s=ring_s, caller_id=ours or None))
        await self._set_twiml(call, document)

    async def join_legs(self, call: CallRecord, person: CallRecord) -> bool:
        """Warm transfer: the person's call, then the caller's, into one conference; both streams end."""
        name = f"voicecall-{call.callId}"
        await self._set_twiml(person, twiml(conference_verb(name)))
        await self._set_twiml(call, twiml(conference_verb(name)))
        return True

    async def get_call_status(self, call: CallRecord) -> ProviderStatus | None:
        if not call.providerCallId:
            return None
        result = await self.http.request("GET", self._path(f"Calls/{call.providerCallId}.json"), ok_statuses=(404,))
        if result.status == 404:
            return ProviderStatus(terminal=True, state=CallState.COMPLETED)
        status = str(result.body.get("status", "")) if isinstance(result.body, dict) else ""
        if status in TERMINAL_STATUS:
            return ProviderStatus(terminal=True, state=TERMINAL_STATUS[status])
        return ProviderStatus(terminal=False, state=LIVE_STATUS.get(status))

    async def close(self) -> None:
        for call_id in list(self._calls):
            self._finish_says(call_id)
        await self.http.close()

    # ------------------------------------------------------------------ webhooks

    def verify_webhook(self, request: WebhookRequest) -> WebhookVerdict:
        return verify_request(self._token, request)

    def parse_webhook(self, request: WebhookRequest, calls: CallLookup) -> WebhookResult:
        kind = request.query_value("type")
        call_id = request.query_value("callId")
        sid = request.param("CallSid")
        status = (request.param("CallStatus") or "").lower()
        if kind == "said":
            return WebhookResult(respond=self._after_said, effects=[SpeechHeard(request.query_value("say"), call_id=call_id)])
        if kind == "amd":
            return WebhookResult(events=amd_events(request, call_id, sid), reply=WebhookReply(200, EMPTY_TWIML, XML))
        if kind == "twiml":
            doc_id = request.query_value("doc") or ""
            return WebhookResult(respond=lambda _: self._document(call_id or "", doc_id))
        if kind == "reattach":  # the stream dropped (its node died or shut down): open a new one
            return WebhookResult(respond=lambda call: self._answer_reply(call, inbound=False))
        if kind == "xfer-leg":  # the dialed person's progress (a cold transfer)
            if status != "in-progress":
                return WebhookResult(reply=WebhookReply(200, EMPTY_TWIML, XML))
            event = transfer_event(call_id, dial_outcome("answered"), f"twilio:{sid}:xfer-answered")
            return WebhookResult(events=[event], reply=WebhookReply(200, EMPTY_TWIML, XML))
        if kind == "dial":  # <Dial action>: the dialed leg ended, or never connected
            dial_status = request.param("DialCallStatus")
            outcome = dial_outcome(dial_status)
            key = f"twilio:{sid}:dial:{request.param('DialCallSid') or dial_status}"
            event = transfer_event(call_id, outcome, key, error=None if outcome.value == "completed"
                                   else f"DialCallStatus {dial_status}")
            return WebhookResult(events=[event], respond=lambda call: self._after_dial(call, outcome.value))
        if kind == "listen":
            token = request.query_value("turnToken")
            return WebhookResult(respond=lambda call: self._listen_reply(call, token))
        speech = request.param("SpeechResult")
        digits = request.param("Digits")
        if kind == "gather" or request.query_value("turnToken") is not None or speech is not None or digits:
            return self._on_gather(request, call_id, sid, speech, digits)
        events = status_events(request, call_id, sid, status)
        # a speak_native waiting for a <Say> returns once the call ended
        ended = call_id and any(e.type == EventType.ENDED for e in events)
        effects: list[object] = [CallGone(call_id=call_id)] if call_id and ended else []
        if kind == "status" or status in TERMINAL_STATUS:
            return WebhookResult(events=events, reply=WebhookReply(200, EMPTY_TWIML, XML), effects=effects)
        # The voice URL: Twilio asks what to do with a call it just connected. (When the `answered`
        # callback came first, this ANSWERED has the same key and the manager skips it.)
        inbound = direction(request.param("Direction")) == Direction.INBOUND and not call_id
        if inbound and sid:
            events = inbound_events(request, sid, events)

        def respond(processed: CallRecord | None) -> WebhookReply:
            return self._answer_reply(processed, inbound)

        return WebhookResult(events=events, respond=respond, effects=effects)

    def apply_effects(self, effects: Sequence[object]) -> None:
        for effect in effects:
            if isinstance(effect, SpeechHeard) and effect.call_id:
                self._said(effect.call_id, effect.key)
            elif isinstance(effect, CallGone) and effect.call_id:
                self._finish_says(effect.call_id)

    def _said(self, call_id: str, say_id: str | None) -> None:
        state = self._calls.get(call_id)
        say = None
        if state is not None:
            say = state.says.pop(say_id or "", None)
            if say is None and say_id == "initial":
                say = state.initial
        if say is not None and not say.done.done():
            say.done.set_result(None)

    def _after_said(self, call: CallRecord | None) -> WebhookReply:
        if call is None or call.terminal:
            return WebhookReply(200, HANGUP_TWIML, XML)
        return WebhookReply(200, self._after_say_twiml(call, call.callId), XML)

    def _after_dial(self, call: CallRecord | None, outcome: str) -> WebhookReply:
        """After a cold transfer's `<Dial>`: the person took the call (hang up our side), or the caller
        comes back to the bridge (its media stream again, or listening)."""
        if call is None or call.terminal or outcome == "completed":
            return WebhookReply(200, HANGUP_TWIML, XML)
        return self._answer_reply(call, inbound=False, resume=True)

    def _document(self, call_id: str, doc_id: str) -> WebhookReply:
        """TwiML too long for the REST parameter, served once by URL."""
        state = self._calls.get(call_id)
        document = state.documents.pop(doc_id, None) if state else None
        return WebhookReply(200, document or HANGUP_TWIML, XML)

    def _listen_reply(self, call: CallRecord | None, token: str | None) -> WebhookReply:
        if call is None or call.terminal:
            return WebhookReply(200, HANGUP_TWIML, XML)
        return WebhookReply(200, self.listen_twiml(call.callId, token), XML)

    def _on_gather(self, request: WebhookRequest, call_id: str | None, sid: str | None, speech: str | None,
                   digits: str | None) -> WebhookResult:
        token = request.query_value("turnToken")
        events: list[CallEvent] = []
        if speech:
            confidence = float_param(request.param("Confidence"), 0.9)
            events.append(CallEvent(EventType.SPEECH, call_id=call_id, provider_call_id=sid, transcript=speech,
                                    is_final=True, confidence=confidence, turn_token=token))
        if digits:
            events.append(CallEvent(EventType.DTMF, call_id=call_id, provider_call_id=sid, digits=digits))

        def respond(call: CallRecord | None) -> WebhookReply:
            if call is None or call.terminal:
                return WebhookReply(200, HANGUP_TWIML, XML)
            # Keep listening: a reply or the next turn replaces this TwiML through the REST API.
            return WebhookReply(200, self.listen_twiml(call.callId), XML)

        return WebhookResult(events=events, respond=respond)

    def _answer_reply(self, call: CallRecord | None, inbound: bool, resume: bool = False) -> WebhookReply:
        if call is None:
            return WebhookReply(200, REJECT_TWIML if inbound else HANGUP_TWIML, XML)
        if call.terminal:  # voicemail, rejected, already hung up
            return WebhookReply(200, HANGUP_TWIML, XML)
        if self.settings.streaming.enabled:
            parameters = {"token": self.host.stream_token(call.callId), "callId": call.callId}
            verbs = [stream_verb(self.host.stream_url(), parameters)]
            if self.settings.cluster is not None:
                # Twilio runs the next verb when a stream's socket closes: on a cluster that asks
                # (through the balancer) for a new stream, so a surviving node re-attaches the call
                verbs.append(redirect_verb(self.host.webhook_url(callId=call.callId, type="reattach")))
            return WebhookReply(200, twiml(*verbs), XML)
        if resume:
            return WebhookReply(200, self.listen_twiml(call.callId), XML)
        state = self._state(call.callId)
        message = call.initial_message
        if state.initial is None and message and not call.initial_message_spoken:
            state.initial = _Say.new(call.callId, message)
        initial = state.initial
        if initial is None or initial.served:
            return WebhookReply(200, self.listen_twiml(call.callId), XML)  # served once, never twice
        initial.served = True
        return WebhookReply(200, twiml(self._say_twiml(call.callId, "initial", initial.text)), XML)

    # ------------------------------------------------------------------ media streams

    def open_stream(self) -> MediaStreamCodec:
        return TwilioStreamCodec()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "accountSid": self.account_sid, "apiBaseUrl": self.http.base_url}


def from_settings(settings: Settings) -> TwilioCarrier:
    return TwilioCarrier(settings)
