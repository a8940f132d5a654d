"""Plivo: Voice API call control (JSON REST), XML answers, signed callbacks and the Audio Stream.

Every callback comes to the one webhook URL; its query says which flow it is (`flow=answer`,
`hangup`, `ring`, `machine`, `xml-speak`, `xml-listen`, `spoken`, `getinput`) and, for our own
outbound calls, our `callId`. Plivo signs the whole URL with the query (V3), so both are trusted
once the signature checks out.

Plivo's create-call reply has only a `request_uuid`; the call's `CallUUID` arrives in the ring,
answer and hang-up callbacks, which name the request (`RequestUUID`) so the manager can move its
mapping over (`previous_provider_call_id`).

Without a media stream, speech is Plivo's own: `<Speak>` followed by a `<Redirect>` back to us
(`flow=spoken`), which tells us when the caller has heard it all; listening is `<GetInput
inputType="speech">` whose action carries the turn token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.calls import (
    CallMode,
    CallRecord,
    CallState,
    Direction,
)
from bridge.tasks import BackgroundTasks
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
from carriers.plivo.protocol import (
    FLOW_ANSWER,
    FLOW_CONFERENCE,
    FLOW_GETINPUT,
    FLOW_HANGUP,
    FLOW_LISTEN,
    FLOW_MACHINE,
    FLOW_RING,
    FLOW_SPEAK,
    FLOW_SPOKEN,
    FLOW_XFER_DIAL,
    FLOW_XFER_DONE,
    FLOW_XFER_LEG,
    MAX_WAIT_S,
    SIG_MA_V3,
    SIG_V2,
    SIG_V2_NONCE,
    SIG_V3,
    PlivoCallback,
    PlivoStreamCodec,
    callback_events,
    encode_extra_headers,
    parse_callback,
    transfer_event,
    verify_request,
    xml_conference,
    xml_dial,
    xml_hangup,
    xml_hold,
    xml_listen,
    xml_speak_then_redirect,
    xml_stream,
    xml_wait_then_hangup,
)
from carriers.plivo.settings import PlivoSettings
from carriers.speech import wait_spoken

if TYPE_CHECKING:
    from bridge.config import Settings

AMD_CALLBACK_SLACK_S = 2.0  # after machine_detection_time with no callback, the callee is taken for a person
DTMF_CHARS = frozenset("0123456789*#ABCD")
V2_NONCES_KEPT = 100_000  # with allowV2Signatures: nonces remembered (about 4 MB at most)

log = logging.getLogger(__name__)

# ============================================================================ the carrier


@dataclass(slots=True)
class _Speech:
    call_id: str
    text: str
    done: asyncio.Future[None]
    hangup_after_s: int | None = None  # notify: the XML ends the call this long after the speech


@dataclass(slots=True)
class _CallState:
    """What the carrier remembers of one call between callbacks (lost on restart, harmlessly)."""

    initial_sid: str | None = None  # the <Speak> of the initial message we served in the answer XML
    initial_text: str | None = None
    speeches: dict[str, _Speech] = field(default_factory=dict)


class PlivoCarrier(Carrier):
    name = "plivo"
    signature_headers = (SIG_V3, SIG_MA_V3, SIG_V2)
    streams_media = True
    transfer_ends_stream = True
    reports_dtmf = True
    sends_dtmf = True

    def __init__(self, settings: Settings) -> None:
        plivo = self.plivo = settings.section(PlivoSettings)
        if not plivo.authId or not plivo.authToken:
            raise CarrierError("plivo: authId and authToken are required")
        self.settings = settings
        self.auth_id = plivo.authId
        self._token = plivo.authToken.get_secret_value()
        base = f"{plivo.apiBaseUrl.rstrip('/')}/v1/Account/{self.auth_id}"
        self.http = CarrierHttp("plivo", base, basic_auth=(self.auth_id, self._token),
                                headers={"Accept": "application/json"})
        self._calls: dict[str, _CallState] = {}
        self._rejected: set[str] = set()  # CallUUIDs we already refused in the answer XML
        self._v2_nonces: OrderedDict[str, None] = OrderedDict()  # with allowV2Signatures: each nonce once
        self._tasks = BackgroundTasks(log)

    async def close(self) -> None:
        await self._tasks.cancel()
        for state in self._calls.values():
            for speech in state.speeches.values():
                if not speech.done.done():
                    speech.done.cancel()
        await self.http.close()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "authId": self.auth_id, "apiBaseUrl": self.plivo.apiBaseUrl}

    # ------------------------------------------------------------------ helpers

    def _state(self, call_id: str) -> _CallState:
        return self._calls.setdefault(call_id, _CallState())

    def _url(self, call_id: str, flow: str, **extra: str) -> str:
        return self.host.webhook_url(callId=call_id, flow=flow, **extra)

    @property
    def _hold_s(self) -> int:
        return min(MAX_WAIT_S, self.settings.maxDurationSeconds)

    @property
    def _listen_timeout_s(self) -> int:
        # Plivo's GetInput executionTimeout runs 5..60 s; the manager's own turn timeout still applies.
        return max(5, min(60, math.ceil(self.settings.transcriptTimeoutMs / 1000)))

    def _new_speech(self, call_id: str, text: str, hangup_after_s: int | None = None) -> str:
        sid = secrets.token_hex(8)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._state(call_id).speeches[sid] = _Speech(call_id, text, future, hangup_after_s)
        return sid

    def _forget(self, call_id: str | None) -> None:
        state = self._calls.pop(call_id, None) if call_id else None
        if state is None:
            return
        for speech in state.speeches.values():
            if not speech.done.done():
                speech.done.set_result(None)

    @staticmethod
    def _request_uuid(call: CallRecord) -> str | None:
        previous = call.previous_provider_call_ids
        return previous[0] if previous else call.providerCallId

    # ------------------------------------------------------------------ REST

    async def initiate_call(self, call: CallRecord, request: OutboundRequest) -> str:
        body: dict[str, Any] = {
            "from": request.from_number,
            "to": request.to,
            "answer_url": self._url(call.callId, FLOW_ANSWER),
            "answer_method": "POST",
            "hangup_url": self._url(call.callId, FLOW_HANGUP),
            "hangup_method": "POST",
            "ring_url": self._url(call.callId, FLOW_RING),
            "ring_method": "POST",
            "ring_timeout": max(1, math.ceil(self.settings.ringTimeoutMs / 1000)),
            # A safety net: Plivo ends the call itself if the bridge is gone when it should have.
            "time_limit": self.settings.maxDurationSeconds + 60,
        }
        if request.native_amd:
            body["machine_detection"] = self.plivo.machineDetection or "true"
            body["machine_detection_time"] = self.plivo.machineDetectionTime
            body["machine_detection_url"] = self._url(call.callId, FLOW_MACHINE)
            body["machine_detection_method"] = "POST"
        result = await self.http.request("POST", "/Call/", json_body=body)
        data = result.body if isinstance(result.body, dict) else {}
        request_uuid = data.get("request_uuid")
        if isinstance(request_uuid, list):
            request_uuid = request_uuid[0] if request_uuid else None
        if not isinstance(request_uuid, str) or not request_uuid:
            raise CarrierError("plivo: the create-call reply has no request_uuid")
        return request_uuid

    def native_amd(self, mode: str) -> NativeAmd | None:
        if self.plivo.machineDetection == "disabled":
            return None
        # Plivo reports machines only, and never the end of a greeting: the local detector finds it.
        return NativeAmd(wait_s=self.plivo.machineDetectionTime / 1000 + AMD_CALLBACK_SLACK_S,
                         silent_means="human", reports_greeting_end=False)

    async def hangup_call(self, call: CallRecord, reason: CallState) -> None:
        self._forget(call.callId)
        call_uuid = call.providerCallId
        if not call_uuid:
            return
        if call.direction == Direction.OUTBOUND and call.answeredAt is None:
            # Queued or ringing: cancel the request. A 404 means it was answered meanwhile (or is over).
            request_uuid = self._request_uuid(call)
            if request_uuid:
                cancelled = await self.http.request("DELETE", f"/Request/{request_uuid}/", ok_statuses=(404,))
                if cancelled.ok:
                    return
        # 404: the call has already ended, which is what we wanted.
        await self.http.request("DELETE", f"/Call/{call_uuid}/", ok_statuses=(404,))

    async def reject_call(self, call: CallRecord) -> None:
        if call.providerCallId in self._rejected:
            self._rejected.discard(call.providerCallId)
            return  # the answer XML already said <Hangup reason="rejected"/>
        await self.hangup_call(call, CallState.HANGUP_BOT)

    async def _transfer(self, call: CallRecord, url: str) -> None:
        if not call.providerCallId:
            raise CarrierError("plivo: the call has no CallUUID yet")
        # Re-sending the same transfer is harmless, so 5xx/timeouts may be retried.
        await self.http.request("POST", f"/Call/{call.providerCallId}/",
                                json_body={"legs": "aleg", "aleg_url": url, "aleg_method": "POST"},
                                idempotent=True)

    async def transfer_cold(self, call: CallRecord, to: str) -> None:
        """Transfer API: the caller's leg goes to our `<Dial>` XML (its <Stream> ends). The Dial's
        callbackUrl says when the person answers; its action gets DialStatus and, when the person
        was not reached, answers with the stream again."""
        await self._transfer(call, self._url(call.callId, FLOW_XFER_DIAL, to=to))

    async def join_legs(self, call: CallRecord, person: CallRecord) -> bool:
        """Warm transfer: the person's leg, then the caller's, into one conference (Transfer API)."""
        room = f"voicecall-{call.callId}"
        await self._transfer(person, self._url(person.callId, FLOW_CONFERENCE, room=room))
        await self._transfer(call, self._url(call.callId, FLOW_CONFERENCE, room=room))
        return True

    async def speak_native(self, call: CallRecord, text: str) -> None:
        state = self._state(call.callId)
        sid = state.initial_sid
        if sid is not None and state.initial_text == text:
            # The answer XML already speaks the initial message; do not say it twice.
            state.initial_sid = state.initial_text = None
            await self._await_spoken(state.speeches.get(sid))
            return
        sid = self._new_speech(call.callId, text)
        try:
            await self._transfer(call, self._url(call.callId, FLOW_SPEAK, sid=sid))
        except CarrierError:
            state.speeches.pop(sid, None)
            raise
        await self._await_spoken(state.speeches.get(sid))

    async def _await_spoken(self, speech: _Speech | None) -> None:
        """Until Plivo follows the <Redirect> after the <Speak> (or the call ends)."""
        if speech is not None:
            await wait_spoken(self.host.clock, speech.done, speech.text, carrier=self.name, call_id=speech.call_id)

    async def start_listening(self, call: CallRecord, turn_token: str) -> None:
        await self._transfer(call, self._url(call.callId, FLOW_LISTEN, turnToken=turn_token))

    async def send_dtmf(self, call: CallRecord, digits: str) -> None:
        if not call.providerCallId:
            raise CarrierError("plivo: the call has no CallUUID yet")
        if not digits or any(d.upper() not in DTMF_CHARS for d in digits):
            raise CarrierError("plivo: DTMF digits must be 0-9, *, # or A-D")
        await self.http.request("POST", f"/Call/{call.providerCallId}/DTMF/",
                                json_body={"digits": digits, "leg": "aleg"})

    async def get_call_status(self, call: CallRecord) -> ProviderStatus | None:
        if not call.providerCallId:
            return None
        live = await self.http.request("GET", f"/Call/{call.providerCallId}/?status=live", ok_statuses=(404,))
        if live.ok:
            status = str(live.body.get("call_status", "")) if isinstance(live.body, dict) else ""
            state = CallState.RINGING if status == "ringing" else CallState.ANSWERED if status else None
            return ProviderStatus(terminal=False, state=state)
        request_uuid = self._request_uuid(call)
        if call.answeredAt is None and request_uuid:
            queued = await self.http.request("GET", f"/Call/{request_uuid}/?status=queued", ok_statuses=(404,))
            if queued.ok:
                return ProviderStatus(terminal=False, state=CallState.INITIATED)
        return ProviderStatus(terminal=True)

    # ------------------------------------------------------------------ webhooks

    def verify_webhook(self, request: WebhookRequest) -> WebhookVerdict:
        verdict = verify_request(self._token, request, allow_v2=self.plivo.allowV2Signatures)
        if verdict.ok and verdict.reason == "v2":
            nonce = request.header(SIG_V2_NONCE) or ""
            if nonce in self._v2_nonces:  # V2 does not sign the body: a reused nonce vouches for nothing
                return WebhookVerdict(False, "V2 nonce reused")
            self._v2_nonces[nonce] = None
            while len(self._v2_nonces) > V2_NONCES_KEPT:
                self._v2_nonces.popitem(last=False)
        return verdict

    def parse_webhook(self, request: WebhookRequest, calls: CallLookup) -> WebhookResult:
        query = dict(request.query)
        params = dict(request.form) if request.form else ({} if request.method.upper() == "POST" else query)
        transfer = self._parse_transfer(query, params)
        if transfer is not None:
            return transfer
        cb = parse_callback(query, params)
        events = callback_events(cb)
        flow = cb.flow
        if flow == FLOW_ANSWER:
            return WebhookResult(events, respond=lambda call: self._answer_xml(cb, call))
        if flow == FLOW_SPEAK:
            return WebhookResult(events, respond=lambda _: self._speak_xml(cb))
        if flow == FLOW_SPOKEN:
            effects: list[object] = [SpeechHeard(cb.speech_id, call_id=cb.call_id)] if cb.call_id else []
            return WebhookResult(events, respond=lambda _: self._spoken_xml(cb), effects=effects)
        if flow == FLOW_LISTEN:
            token = cb.turn_token or uuid.uuid4().hex
            return WebhookResult(events, respond=lambda _: self._listen_xml(cb.call_id, token, None))
        if flow == FLOW_GETINPUT:
            return WebhookResult(events, reply=xml_hold(self._hold_s))
        if flow == FLOW_HANGUP:
            return WebhookResult(events, respond=self._after_end, effects=[CallGone(call_id=cb.call_id)] if cb.call_id else [])
        return WebhookResult(events)

    def apply_effects(self, effects: Sequence[object]) -> None:
        for effect in effects:
            if isinstance(effect, SpeechHeard) and effect.call_id:
                self._speech_done(effect.call_id, effect.key)
            elif isinstance(effect, CallGone):
                self._forget(effect.call_id)

    def _parse_transfer(self, query: dict[str, str], params: dict[str, str]) -> WebhookResult | None:
        flow, call_id = query.get("flow"), query.get("callId") or None
        if flow == FLOW_XFER_DIAL:
            to = query.get("to") or ""
            return WebhookResult(respond=lambda call: self._dial_xml(call, to))
        if flow == FLOW_CONFERENCE:
            room = query.get("room") or ""
            return WebhookResult(respond=lambda call: xml_conference(room) if call is not None and room
                                 else xml_hangup())
        if flow in (FLOW_XFER_LEG, FLOW_XFER_DONE):
            event = transfer_event(flow, call_id, params)
            events = [event] if event is not None else []
            if flow == FLOW_XFER_LEG:
                return WebhookResult(events, reply=WebhookReply())
            outcome = event.outcome if event is not None else None
            return WebhookResult(events, respond=lambda call: self._after_dial(call, outcome))
        return None

    def _dial_xml(self, call: CallRecord | None, to: str) -> WebhookReply:
        if call is None or call.terminal or not to:
            return xml_hangup()
        ours = call.to if call.direction == Direction.INBOUND else call.from_
        ring_s = max(5, min(600, math.ceil(self.settings.transfer.ringTimeoutMs / 1000)))
        return xml_dial(to, action=self._url(call.callId, FLOW_XFER_DONE),
                        callback=self._url(call.callId, FLOW_XFER_LEG), timeout_s=ring_s, caller_id=ours or None)

    def _after_dial(self, call: CallRecord | None, outcome: str | None) -> WebhookReply:
        """The person took the call (our part is over), or the caller comes back to the bridge."""
        if call is None or call.terminal or outcome == "completed":
            return xml_hangup()
        if self.settings.streaming.enabled:
            extra = encode_extra_headers({"token": self.host.stream_token(call.callId), "callId": call.callId})
            return xml_stream(self.host.stream_url(), extra)
        return self._listen_xml(call.callId, uuid.uuid4().hex, None)

    def _after_end(self, call: CallRecord | None) -> WebhookReply:
        if call is not None:
            self._forget(call.callId)
        return WebhookReply()

    def _answer_xml(self, cb: PlivoCallback, call: CallRecord | None) -> WebhookReply:
        if call is None:
            if cb.call_uuid and cb.direction == "inbound":
                self._rejected.add(cb.call_uuid)
            return xml_hangup("rejected")
        if call.terminal:
            return xml_hangup()
        if self.settings.streaming.enabled:
            token = self.host.stream_token(call.callId)
            extra = encode_extra_headers({"token": token, "callId": call.callId})
            return xml_stream(self.host.stream_url(), extra)
        message = call.initial_message
        state = self._state(call.callId)
        if call.mode == CallMode.NOTIFY and call.direction == Direction.OUTBOUND:
            if not message:
                return xml_wait_then_hangup(self.settings.outbound.notifyHangupDelaySec)
            sid = state.initial_sid or self._new_speech(call.callId, message,
                                                        hangup_after_s=self.settings.outbound.notifyHangupDelaySec)
            state.initial_sid, state.initial_text = sid, message
            return xml_speak_then_redirect(message, self._url(call.callId, FLOW_SPOKEN, sid=sid))
        # Conversation: greet and listen at once; the first transcript may answer the greeting.
        if message:
            sid = state.initial_sid or self._new_speech(call.callId, message)
            state.initial_sid, state.initial_text = sid, message
            speech = state.speeches[sid]
            if not speech.done.done():
                speech.done.set_result(None)  # listening starts with the prompt; nothing to wait for
        return self._listen_xml(call.callId, uuid.uuid4().hex, message or None)

    def _listen_xml(self, call_id: str | None, turn_token: str, prompt: str | None) -> WebhookReply:
        if not call_id:
            return xml_hold(self._hold_s)
        action = self._url(call_id, FLOW_GETINPUT, turnToken=turn_token)
        return xml_listen(action, prompt=prompt, execution_timeout_s=self._listen_timeout_s, hold_s=self._hold_s)

    def _find_speech(self, cb: PlivoCallback) -> _Speech | None:
        state = self._calls.get(cb.call_id or "")
        return state.speeches.get(cb.speech_id or "") if state else None

    def _speak_xml(self, cb: PlivoCallback) -> WebhookReply:
        speech = self._find_speech(cb)
        if speech is None or cb.call_id is None or cb.speech_id is None:
            return xml_hold(self._hold_s)
        return xml_speak_then_redirect(speech.text, self._url(cb.call_id, FLOW_SPOKEN, sid=cb.speech_id))

    def _spoken_xml(self, cb: PlivoCallback) -> WebhookReply:
        speech = self._find_speech(cb)
        if speech is None:
            return xml_hold(self._hold_s)
        if speech.hangup_after_s is not None:
            return xml_wait_then_hangup(speech.hangup_after_s)
        return xml_hold(self._hold_s)

    def _speech_done(self, call_id: str, speech_id: str | None) -> None:
        """Plivo followed the Redirect after a <Speak>: the caller heard it all."""
        state = self._calls.get(call_id)
        speech = state.speeches.get(speech_id or "") if state else None
        if state is None or speech is None:
            return
        if state.initial_sid != speech_id:
            state.speeches.pop(speech_id or "", None)
        if not speech.done.done():
            speech.done.set_result(None)

    def open_stream(self) -> MediaStreamCodec:
        return PlivoStreamCodec()


def from_settings(settings: Settings) -> PlivoCarrier:
    return PlivoCarrier(settings)
