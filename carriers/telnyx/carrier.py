"""Telnyx Call Control v2: REST call control, Ed25519-signed JSON webhooks, and the media stream.

Outbound: `POST /calls` with our callId in the webhook URL and in `client_state` (base64), and the
bidirectional RTP stream attached at dial time. Inbound: `call.initiated` (direction `incoming`)
becomes an inbound event with from/to; the manager runs the policy and we send `answer` (with the
stream) or `reject`. Every command carries a fresh `command_id`, so Telnyx ignores a retried
duplicate and the HTTP client may retry it on 5xx/timeouts.

Webhooks may arrive out of order and more than once: each event's dedupe key is Telnyx's `data.id`,
so a redelivery (new timestamp and signature, same id) has no second effect. The stream codec is
PCMU or PCMA as the call negotiates (the caller's `offered_codecs` on inbound calls, or
`telnyx.streamCodec`); frames may arrive out of order, so they carry a sequence for the MediaPipeline
to reorder.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bridge.calls import TRANSFER_PARENT, CallRecord, CallState, Direction
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
from carriers.signatures import load_ed25519_public_key
from carriers.speech import wait_spoken
from carriers.telnyx.protocol import (
    DEFAULT_LANGUAGE,
    DEFAULT_VOICE,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    XFER_TAG,
    InboundOffered,
    TelnyxEvent,
    TelnyxStreamCodec,
    choose_codec,
    encode_state,
    errors_of,
    is_already_ended,
    split_text,
    translate,
    verify_request,
)
from carriers.telnyx.settings import TelnyxSettings

if TYPE_CHECKING:
    from bridge.config import Settings

log = logging.getLogger(__name__)

_SEEN_LIMIT = 4096
AMD_WAIT_S = 40  # Telnyx always reports a verdict (30 s analysis at most, unconfirmed default); then unknown
DTMF_CHARS = frozenset("0123456789*#ABCDwW")


# ------------------------------------------------------------------ the carrier


class TelnyxCarrier(Carrier):
    name = "telnyx"
    signature_headers = (SIGNATURE_HEADER, TIMESTAMP_HEADER)
    streams_media = True
    reports_dtmf = True
    sends_dtmf = True
    dtmf_pauses = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        tx = self.telnyx = settings.section(TelnyxSettings)
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
        self._speaks: dict[str, dict[str, asyncio.Future[str]]] = {}  # ccid -> tag -> waiter
        self._speak_ids = 0
        self._tasks = BackgroundTasks(log)

    # -------------------------------------------------------------- settings-derived choices

    @property
    def _carrier_transcribes(self) -> bool:
        """Streamed calls without a local STT engine get their transcripts from Telnyx, all call long
        (not in speech-to-speech mode: the realtime model hears the caller and transcribes)."""
        streaming = self.settings.streaming
        return streaming.enabled and streaming.provider in (None, "none") and not self.settings.realtime.enabled

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
        parent = self.host.get_call(str(call.metadata.get(TRANSFER_PARENT) or ""))
        if parent is not None and parent.providerCallId:  # a warm transfer's call to the person
            body["link_to"] = parent.providerCallId  # same call session as the caller, for the bridge
        if request.native_amd:
            body["answering_machine_detection"] = self._amd_mode(request.machine_detection)
        codec = choose_codec(self.telnyx.streamCodec)
        if request.stream:
            body.update(self._stream_params(call, codec))
            if self._carrier_transcribes:
                body.update(self._transcription_params())
        # Sent once: Telnyx dedupes `command_id` on call commands, not on the dial itself, so a retried
        # dial after a 5xx, a dropped connection or a timeout may ring the callee twice.
        result = await self.http.request("POST", "/calls", json_body=body, idempotent=False)
        data = result.body.get("data") if isinstance(result.body, dict) else None
        ccid = data.get("call_control_id") if isinstance(data, dict) else None
        if not isinstance(ccid, str) or not ccid:
            raise CarrierError("telnyx dial answered without a call_control_id")
        if request.stream:
            _put(self._codecs, ccid, codec)
        return ccid

    def _amd_mode(self, mode: str) -> str:
        """`greeting_end` (verdict, then the end of the greeting: beep or silence) where a message follows,
        else `detect`; `telnyx.answeringMachineDetection` overrides."""
        return self.telnyx.answeringMachineDetection or ("greeting_end" if mode == "leave-message" else "detect")

    def native_amd(self, mode: str) -> NativeAmd | None:
        amd = self._amd_mode(mode)
        if amd == "disabled":
            return None
        # plain `detect` and `detect_words`... say nothing of the greeting's end unless asked for it
        return NativeAmd(wait_s=AMD_WAIT_S, reports_greeting_end=amd in ("greeting_end", "detect_beep",
                                                                          "detect_words", "premium"))

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
            codec = choose_codec(self.telnyx.streamCodec, self._offered.pop(ccid, None))
            body.update(self._stream_params(call, codec))
            if self._carrier_transcribes:
                body.update(self._transcription_params())
            _put(self._codecs, ccid, codec)
        await self._command(ccid, "answer", body)

    async def reattach_media(self, call: CallRecord) -> bool:
        """`streaming_start` to our stream URL (Telnyx keeps the call up when a stream drops)."""
        ccid = call.providerCallId
        if not self.settings.streaming.enabled or not ccid:
            return False
        codec = self._codecs.get(ccid) or choose_codec(self.telnyx.streamCodec)
        _put(self._codecs, ccid, codec)
        return await self._command(ccid, "streaming_start", self._stream_params(call, codec), ended_ok=True)

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
                status = await wait_spoken(self.host.clock, waiter, piece, carrier=self.name, call_id=call.callId)
                if status is not None and status != "completed":
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
        if not digits or any(d.upper() not in DTMF_CHARS for d in digits):
            raise CarrierError("telnyx send_dtmf: digits must be 0-9, *, #, A-D, w or W (pauses)")
        await self._command(call.providerCallId, "send_dtmf", {"digits": digits, "duration_millis": 250})

    async def transfer_cold(self, call: CallRecord, to: str) -> None:
        """`actions/transfer`: Telnyx dials `to` and bridges the caller on answer. The new leg's webhooks
        carry our callId tagged `xfer` (target_leg_client_state); they give the outcome (protocol.py)."""
        ours = call.to if call.direction == Direction.INBOUND else call.from_
        body: dict[str, Any] = {
            "to": to,
            "timeout_secs": min(600, max(5, round(self.settings.transfer.ringTimeoutMs / 1000))),
            "target_leg_client_state": encode_state(call.callId, XFER_TAG),
            "webhook_url": self.host.webhook_url(callId=call.callId),
            "webhook_url_method": "POST",
        }
        if ours:
            body["from"] = ours
        await self._command(call.providerCallId, "transfer", body)

    async def join_legs(self, call: CallRecord, person: CallRecord) -> bool:
        """Warm transfer: `actions/bridge` the caller's leg with the person's (dialled with `link_to`),
        then stop our media streams on both: the bridge leaves."""
        await self._command(call.providerCallId, "bridge", {"call_control_id": person.providerCallId})
        if self.settings.streaming.enabled:
            for leg in (call, person):
                await self._command(leg.providerCallId, "streaming_stop", ended_ok=True)
        return True

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

    def parse_webhook(self, request: WebhookRequest, calls: CallLookup) -> WebhookResult:
        try:
            hook = TelnyxEvent.from_body(request.body)
        except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            return WebhookResult(reply=WebhookReply(400, f"bad telnyx webhook: {exc}"))
        event, effects = translate(hook, request.query_value("callId"), calls)
        return WebhookResult(events=[event] if event is not None else [], effects=list(effects))

    def apply_effects(self, effects: Sequence[object]) -> None:
        for effect in effects:
            if isinstance(effect, InboundOffered):
                _put(self._offered, effect.ccid, effect.offered_codecs)
            elif isinstance(effect, CallGone) and effect.provider_call_id:
                self._call_gone(effect.provider_call_id)
            elif isinstance(effect, SpeechHeard):
                self._speak_ended(effect.provider_call_id, effect.key, effect.status)

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
        return {"name": self.name, "apiBaseUrl": self.http.base_url, "streamCodec": self.telnyx.streamCodec}


def _put(table: OrderedDict[str, str], key: str, value: str) -> None:
    table[key] = value
    while len(table) > _SEEN_LIMIT:
        table.popitem(last=False)


def from_settings(settings: Settings) -> TelnyxCarrier:
    return TelnyxCarrier(settings)
