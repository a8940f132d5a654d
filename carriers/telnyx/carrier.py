"""Telnyx Call Control v2: REST call control, Ed25519-signed JSON webhooks, and the media stream.

Outbound: `POST /calls` with our callId in the webhook URL and in `client_state` (base64), and the
bidirectional RTP stream attached at dial time. Inbound: `call.initiated` (direction `incoming`)
becomes an inbound event with from/to; the manager runs the policy and we send `answer` (with the
stream) or `reject`. Every command carries a fresh `command_id`, so Telnyx ignores a retried
duplicate and the HTTP client may retry it on 5xx/timeouts.

Webhooks may arrive out of order and more than once: each event's dedupe key is Telnyx's `data.id`,
so a redelivery (new timestamp and signature, same id) has no second effect. The stream codec is
PCMU or PCMA as the call negotiates (the caller's `offered_codecs` on inbound calls, or
`telnyx.streamCodec`); frames may arrive out of order, so they carry a sequence for the MediaBridge
to reorder.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bridge.calls import CallEvent, CallRecord, CallState, Direction, EventType
from bridge.signatures import load_ed25519_public_key
from bridge.tasks import BackgroundTasks
from carriers.base import (
    Carrier,
    CarrierError,
    MediaStreamCodec,
    OutboundRequest,
    ProviderStatus,
    WebhookReply,
    WebhookRequest,
    WebhookResult,
    WebhookVerdict,
)
from carriers.http import CarrierHttp
from carriers.telnyx.protocol import (
    DEFAULT_LANGUAGE,
    DEFAULT_VOICE,
    DTMF_DIGITS,
    MACHINE_RESULTS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TelnyxEvent,
    TelnyxStreamCodec,
    choose_codec,
    decode_state,
    encode_state,
    end_reason,
    errors_of,
    is_already_ended,
    split_text,
    verify_request,
)

if TYPE_CHECKING:
    from bridge.config import Settings

log = logging.getLogger(__name__)

_SEEN_LIMIT = 4096


# ------------------------------------------------------------------ the carrier


class TelnyxCarrier(Carrier):
    name = "telnyx"
    signature_headers = (SIGNATURE_HEADER, TIMESTAMP_HEADER)
    streams_media = True
    reports_dtmf = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        tx = settings.telnyx
        self._public_key: Ed25519PublicKey | None = None
        if tx.publicKey:
            try:
                self._public_key = load_ed25519_public_key(tx.publicKey)
            except ValueError as exc:
                raise CarrierError(f"telnyx.publicKey: {exc}") from None
        api_key = tx.apiKey.get_secret_value() if tx.apiKey else ""
        self.http = CarrierHttp("telnyx", tx.apiBaseUrl, headers={"Authorization": f"Bearer {api_key}"})
        self.connection_id = tx.connectionId or ""
        self.voice = str(getattr(tx, "voice", None) or DEFAULT_VOICE)
        self.language = str(getattr(tx, "language", None) or DEFAULT_LANGUAGE)
        self._codecs: OrderedDict[str, str] = OrderedDict()  # call_control_id -> declared stream codec
        self._offered: OrderedDict[str, str] = OrderedDict()  # inbound call_control_id -> offered codecs
        # bounded (oldest dropped first): call_control_ids of inbound calls and of calls Telnyx
        # reported hung up, and the event ids whose side effects already ran
        self._inbound: OrderedDict[str, str] = OrderedDict()
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._effects: OrderedDict[str, str] = OrderedDict()
        self._speaks: dict[str, dict[str, asyncio.Future[str]]] = {}  # ccid -> tag -> waiter
        self._speak_ids = 0
        self._tasks = BackgroundTasks(log)

    # -------------------------------------------------------------- settings-derived choices

    @property
    def _carrier_transcribes(self) -> bool:
        """Streamed calls without a local STT engine get their transcripts from Telnyx, all call long."""
        streaming = self.settings.streaming
        return streaming.enabled and streaming.provider in (None, "none")

    def _stream_params(self, call: CallRecord, codec: str) -> dict[str, Any]:
        return {
            "stream_url": self.host.stream_url(),
            "stream_track": "inbound_track",
            "stream_codec": codec,
            "stream_bidirectional_mode": "rtp",
            "stream_bidirectional_codec": codec,
            "stream_auth_token": self.host.stream_token(call.callId),
        }

    def _transcription_params(self) -> dict[str, Any]:
        return {"transcription": True,
                "transcription_config": {"transcription_tracks": "inbound", "language": self._stt_language}}

    @property
    def _stt_language(self) -> str:
        return self.language.split("-", 1)[0]

    # -------------------------------------------------------------- REST

    async def initiate_call(self, call: CallRecord, request: OutboundRequest) -> str:
        ring_s = min(600, max(5, round(self.settings.ringTimeoutMs / 1000)))
        body: dict[str, Any] = {
            "connection_id": self.connection_id,
            "to": request.to,
            "from": request.from_number,
            "webhook_url": self.host.webhook_url(callId=call.callId),
            "webhook_url_method": "POST",
            "client_state": encode_state(call.callId),
            "command_id": str(uuid.uuid4()),
            "timeout_secs": ring_s,
            # a backstop should the bridge die mid-call; the manager enforces maxDurationSeconds itself
            "time_limit_secs": min(14_400, self.settings.maxDurationSeconds + 60),
        }
        amd = self.settings.telnyx.answeringMachineDetection
        if amd and amd != "disabled":
            body["answering_machine_detection"] = amd
        codec = choose_codec(self.settings.telnyx.streamCodec)
        if request.stream:
            body.update(self._stream_params(call, codec))
            if self._carrier_transcribes:
                body.update(self._transcription_params())
        # `command_id` makes a retried dial a no-op at Telnyx, so retrying it is safe
        result = await self.http.request("POST", "/calls", json_body=body, idempotent=True)
        data = result.body.get("data") if isinstance(result.body, dict) else None
        ccid = data.get("call_control_id") if isinstance(data, dict) else None
        if not isinstance(ccid, str) or not ccid:
            raise CarrierError("telnyx dial answered without a call_control_id")
        if request.stream:
            _put(self._codecs, ccid, codec)
        return ccid

    async def _command(self, ccid: str | None, command: str, body: dict[str, Any] | None = None,
                       *, ended_ok: bool = False) -> bool:
        """POST /calls/{id}/actions/{command} with a fresh command_id. Returns False when Telnyx
        says the call already ended and `ended_ok`; raises CarrierError otherwise."""
        if not ccid:
            raise CarrierError(f"telnyx {command}: the call has no call_control_id yet")
        payload = {**(body or {}), "command_id": str(uuid.uuid4())}
        path = f"/calls/{quote(ccid, safe=':')}/actions/{command}"
        result = await self.http.request("POST", path, json_body=payload, idempotent=True, ok_statuses=(404, 422))
        if result.ok:
            return True
        if ended_ok and is_already_ended(result.status, result.body):
            return False
        errors = errors_of(result.body)
        detail = str(errors[0].get("detail") or errors[0].get("title") or "")[:200] if errors else ""
        raise CarrierError(f"telnyx {command} answered HTTP {result.status}" + (f": {detail}" if detail else ""),
                           status=result.status)

    async def answer_call(self, call: CallRecord) -> None:
        ccid = call.providerCallId or ""
        body: dict[str, Any] = {
            "client_state": encode_state(call.callId),
            "webhook_url": self.host.webhook_url(callId=call.callId),
            "webhook_url_method": "POST",
        }
        if self.settings.streaming.enabled:
            codec = choose_codec(self.settings.telnyx.streamCodec, self._offered.pop(ccid, None))
            body.update(self._stream_params(call, codec))
            if self._carrier_transcribes:
                body.update(self._transcription_params())
            _put(self._codecs, ccid, codec)
        await self._command(ccid, "answer", body)

    async def reject_call(self, call: CallRecord) -> None:
        ccid = call.providerCallId
        self._offered.pop(ccid or "", None)
        try:
            await self._command(ccid, "reject", {"cause": "CALL_REJECTED"}, ended_ok=True)
        except CarrierError as exc:
            # `reject` only works on a call still ringing; one that got further is hung up instead
            log.info("telnyx reject refused (%s); hanging up instead", exc)
            await self._command(ccid, "hangup", ended_ok=True)

    async def hangup_call(self, call: CallRecord, reason: CallState) -> None:
        ccid = call.providerCallId
        if ccid is None:
            return
        await self._command(ccid, "hangup", ended_ok=True)
        self._call_gone(ccid)

    async def speak_native(self, call: CallRecord, text: str) -> None:
        """Telnyx `speak`; returns when `call.speak.ended` arrives (or an estimate of the speech time passes)."""
        ccid = call.providerCallId or ""
        for piece in split_text(text):
            self._speak_ids += 1
            tag = f"speak-{self._speak_ids}"
            waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._speaks.setdefault(ccid, {})[tag] = waiter
            try:
                await self._command(ccid, "speak", {
                    "payload": piece,
                    "payload_type": "text",
                    "voice": self.voice,
                    "language": self.language,
                    "client_state": encode_state(call.callId, tag),
                })
                # ~15 characters a second of speech, plus room for the webhook to arrive
                timeout = 10 + len(piece) / 15
                try:
                    status = await self.host.clock.wait_for(waiter, timeout)
                except TimeoutError:
                    log.warning("call %s: no call.speak.ended after %.0fs; going on", call.callId, timeout)
                    continue
                if status != "completed":
                    return  # the call hung up (or AMD cancelled it): say no more
            finally:
                self._speaks.get(ccid, {}).pop(tag, None)

    async def start_listening(self, call: CallRecord, turn_token: str) -> None:
        await self._command(call.providerCallId, "transcription_start", {
            "language": self._stt_language,
            "transcription_tracks": "inbound",
            "client_state": encode_state(call.callId, f"listen:{turn_token}"),
        })

    async def stop_listening(self, call: CallRecord) -> None:
        await self._command(call.providerCallId, "transcription_stop", ended_ok=True)

    async def send_dtmf(self, call: CallRecord, digits: str) -> None:
        if not digits or any(d not in DTMF_DIGITS for d in digits):
            raise CarrierError("telnyx send_dtmf: digits must be 0-9, *, #, A-D")
        await self._command(call.providerCallId, "send_dtmf", {"digits": digits, "duration_millis": 250})

    async def get_call_status(self, call: CallRecord) -> ProviderStatus | None:
        if not call.providerCallId:
            return None
        result = await self.http.request("GET", f"/calls/{quote(call.providerCallId, safe=':')}",
                                         ok_statuses=(404, 422))
        if not result.ok:
            return ProviderStatus(terminal=is_already_ended(result.status, result.body))
        data = result.body.get("data") if isinstance(result.body, dict) else None
        if not isinstance(data, dict) or "is_alive" not in data:
            return None
        return ProviderStatus(terminal=not bool(data["is_alive"]))

    # -------------------------------------------------------------- webhooks

    def verify_webhook(self, request: WebhookRequest) -> WebhookVerdict:
        if self._public_key is None:
            return WebhookVerdict(ok=False, reason="telnyx.publicKey is not configured")
        return verify_request(self._public_key, request, now=self.host.clock.time())

    def parse_webhook(self, request: WebhookRequest) -> WebhookResult:
        try:
            hook = TelnyxEvent.from_body(request.body)
        except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            return WebhookResult(reply=WebhookReply(400, f"bad telnyx webhook: {exc}"))
        event = self._translate(hook, request.query_value("callId"))
        return WebhookResult(events=[event] if event is not None else [])

    def _translate(self, hook: TelnyxEvent, query_call_id: str | None) -> CallEvent | None:
        p = hook.payload
        ccid = p.get("call_control_id") if isinstance(p.get("call_control_id"), str) else None
        state_call_id, tag = decode_state(p.get("client_state"))
        call_id = query_call_id or state_call_id
        first_time = hook.event_id not in self._effects
        if hook.event_id:
            _put(self._effects, hook.event_id, "")
        kind = hook.event_type

        def event(etype: EventType, **fields: Any) -> CallEvent:
            ev = CallEvent(etype, call_id=call_id, provider_call_id=ccid, **fields)
            if hook.event_id:
                ev.dedupe_key = f"telnyx:{hook.event_id}"
            return ev

        if kind == "call.initiated":
            if p.get("direction") != "incoming":
                return event(EventType.INITIATED)
            if ccid is None or ccid in self._ended:
                return None  # a late call.initiated for a call that already hung up
            _put(self._inbound, ccid, "")
            _put(self._offered, ccid, _text(p.get("offered_codecs")))
            return event(EventType.INITIATED, direction=Direction.INBOUND,
                         from_number=_text(p.get("from")), to_number=_text(p.get("to")))
        if kind == "call.answered":
            return event(EventType.ANSWERED)
        if kind == "call.bridged":
            return event(EventType.ACTIVE)
        if kind == "call.hangup":
            if ccid is not None:
                _put(self._ended, ccid, "")
                self._call_gone(ccid)
            call = self.host.get_call(call_id) if call_id else None
            direction = call.direction if call is not None else (Direction.INBOUND if ccid in self._inbound else None)
            return event(EventType.ENDED, reason=end_reason(p.get("hangup_cause"), p.get("hangup_source"), direction))
        if kind == "call.dtmf.received":
            call = self.host.get_call(call_id) if call_id else None
            if call is not None and call.metadata.get("mediaAttached"):
                return None  # the media stream reports the same key press (and in-band detection dedupes it)
            digit = _text(p.get("digit"))
            return event(EventType.DTMF, digits=digit) if digit else None
        if kind == "call.transcription":
            return self._speech(p, tag, event)
        if kind == "call.speak.ended":
            self._speak_ended(ccid, tag, str(p.get("status") or "completed"))
            return None
        if kind in ("call.machine.detection.ended", "call.machine.premium.detection.ended"):
            if p.get("result") not in MACHINE_RESULTS:
                return None
            if first_time and ccid:
                self._tasks.spawn(self._command(ccid, "hangup", ended_ok=True), f"telnyx-amd-hangup-{ccid}")
            return event(EventType.ENDED, reason=CallState.VOICEMAIL)
        if kind == "streaming.failed":
            log.warning("telnyx streaming failed on %s: %s", ccid, _text(p.get("failure_reason")) or "no reason")
        return None

    def _speech(self, p: dict[str, Any], tag: str | None,
                event: Callable[..., CallEvent]) -> CallEvent | None:
        data = p.get("transcription_data")
        if not isinstance(data, dict) or data.get("transcription_track", "inbound") != "inbound":
            return None
        transcript = _text(data.get("transcript")).strip()
        if not transcript:
            return None
        confidence = data.get("confidence")
        token = tag.removeprefix("listen:") if tag and tag.startswith("listen:") else None
        return event(EventType.SPEECH, transcript=transcript, is_final=bool(data.get("is_final", True)),
                     confidence=float(confidence) if isinstance(confidence, int | float) else None,
                     turn_token=token)

    def _speak_ended(self, ccid: str | None, tag: str | None, status: str) -> None:
        waiters = self._speaks.get(ccid or "", {})
        waiter = waiters.get(tag or "")
        if waiter is not None and not waiter.done():
            waiter.set_result(status)

    def _call_gone(self, ccid: str) -> None:
        for waiter in self._speaks.pop(ccid, {}).values():
            if not waiter.done():
                waiter.set_result("call_hangup")
        self._offered.pop(ccid, None)

    # -------------------------------------------------------------- media streams

    def open_stream(self) -> MediaStreamCodec:
        return TelnyxStreamCodec(self._codecs.get)

    # -------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        await self._tasks.cancel()
        for ccid in list(self._speaks):
            self._call_gone(ccid)
        await self.http.close()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "apiBaseUrl": self.http.base_url, "streamCodec": self.settings.telnyx.streamCodec}


def _put(table: OrderedDict[str, str], key: str, value: str) -> None:
    table[key] = value
    while len(table) > _SEEN_LIMIT:
        table.popitem(last=False)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def from_settings(settings: Settings) -> TelnyxCarrier:
    return TelnyxCarrier(settings)
