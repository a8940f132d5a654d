"""A carrier double for manager tests: records every request; no media leg (speech goes 'native')."""

from __future__ import annotations

from bridge.calls import CallRecord, CallState
from carriers.base import Carrier, CarrierError, OutboundRequest, ProviderStatus


class RecordingCarrier(Carrier):
    name = "fake"
    streams_media = False

    def __init__(self) -> None:
        self.initiated: list[OutboundRequest] = []
        self.hangups: list[tuple[str, CallState]] = []
        self.spoken: list[tuple[str, str]] = []
        self.listening: list[tuple[str, str]] = []
        self.answered: list[str] = []
        self.rejected: list[str | None] = []
        self.status: dict[str, ProviderStatus | None] = {}
        self.fail_initiate: str | None = None

    async def initiate_call(self, call: CallRecord, request: OutboundRequest) -> str:
        if self.fail_initiate:
            raise CarrierError(self.fail_initiate, status=400)
        self.initiated.append(request)
        return f"fake-{len(self.initiated)}"

    async def answer_call(self, call: CallRecord) -> None:
        self.answered.append(call.callId)

    async def reject_call(self, call: CallRecord) -> None:
        self.rejected.append(call.providerCallId)

    async def hangup_call(self, call: CallRecord, reason: CallState) -> None:
        self.hangups.append((call.callId, reason))

    async def speak_native(self, call: CallRecord, text: str) -> None:
        self.spoken.append((call.callId, text))

    async def start_listening(self, call: CallRecord, turn_token: str) -> None:
        self.listening.append((call.callId, turn_token))

    async def get_call_status(self, call: CallRecord) -> ProviderStatus | None:
        if call.providerCallId in self.status:
            return self.status[call.providerCallId]
        raise CarrierError("status unknown")


class SignedJsonCarrier(RecordingCarrier):
    """A carrier with an HMAC-signed JSON webhook and a JSON media-stream dialect, to exercise the
    server's generic webhook pipeline and stream limits without any one real carrier's quirks.

    Webhook: header X-Test-Signature = hex HMAC-SHA256(secret, public_url + body); body
    {"id", "callId"?, "providerCallId", "type", "direction"?, "from"?, "eventKey"?, "effects"?}.
    `eventKey` is a carrier-stable event id (its redeliveries share it, as Telnyx's `data.id`);
    `effects` (names) come back from parse and are recorded in `applied` when the server runs them.
    Stream frames: {"event": "start", "callSid", "token"}, {"event": "media", "payload": hex},
    {"event": "mark", "name"}, {"event": "stop"}.
    """

    name = "fake"
    signature_headers = ("X-Test-Signature",)
    applied: list[str]
    streams_media = True
    SECRET = b"test-secret"

    def __init__(self) -> None:
        super().__init__()
        self.applied = []

    def sign(self, url: str, body: bytes) -> str:
        import hashlib
        import hmac

        return hmac.new(self.SECRET, url.encode() + body, hashlib.sha256).hexdigest()

    def verify_webhook(self, request):  # type: ignore[no-untyped-def]
        import hmac

        from carriers.base import WebhookVerdict

        presented = request.header("X-Test-Signature") or ""
        for url in [request.public_url, *request.url_variants]:
            if hmac.compare_digest(self.sign(url, request.body), presented):
                return WebhookVerdict(ok=True, replay_key=presented)
        return WebhookVerdict(ok=False, reason="bad signature")

    def parse_webhook(self, request, calls):  # type: ignore[no-untyped-def]
        import json

        from bridge.calls import CallEvent, Direction, EventType
        from carriers.base import WebhookReply, WebhookResult

        data = json.loads(request.body)
        event = CallEvent(EventType(data["type"]), call_id=data.get("callId"),
                          provider_call_id=data.get("providerCallId"), id=data["id"],
                          direction=Direction(data["direction"]) if data.get("direction") else None,
                          from_number=data.get("from"), digits=data.get("digits"), dedupe_key=data.get("eventKey"))
        return WebhookResult(events=[event], respond=lambda call: WebhookReply(
            200, json.dumps({"callId": call.callId if call else None}), "application/json"),
            effects=list(data.get("effects", [])))

    def apply_effects(self, effects):  # type: ignore[no-untyped-def]
        self.applied.extend(effects)

    def open_stream(self):  # type: ignore[no-untyped-def]
        return JsonStreamCodec()


from carriers.base import (  # noqa: E402 - kept next to the codec that uses them
    MediaStreamCodec,
    StreamIgnored,
    StreamMark,
    StreamMedia,
    StreamProtocolError,
    StreamStart,
    StreamStop,
)
from media.formats import ULAW_8K  # noqa: E402


class JsonStreamCodec(MediaStreamCodec):
    def parse(self, text: str):  # type: ignore[no-untyped-def]
        import json

        try:
            data = json.loads(text)
            event = data["event"]
            if event == "start":
                return StreamStart(provider_call_id=data["callSid"], stream_id="s1", format=ULAW_8K,
                                   token=data.get("token"))
            if event == "media":
                return StreamMedia(bytes.fromhex(data["payload"]))
            if event == "mark":
                return StreamMark(data["name"])
            if event == "stop":
                return StreamStop()
            if event == "connected":
                return StreamIgnored("connected")
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamProtocolError(f"bad frame: {type(exc).__name__}") from None
        raise StreamProtocolError(f"unknown event {event!r}")

    def encode_media(self, payload: bytes) -> str:
        return f'{{"event":"media","payload":"{payload.hex()}"}}'

    def encode_mark(self, name: str) -> str:
        return f'{{"event":"mark","name":"{name}"}}'

    def encode_clear(self) -> str:
        return '{"event":"clear"}'
