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
