"""The manager's part for transfers (a CallManager base, like bridge/turns.py): the API method
`transfer`, and the surface the TransferController uses (`TransferHost`): the person's call as a
linked record, ending a call without a hang-up, waiting for a re-opened media stream."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from bridge.calls import TRANSFER_PARENT, CallMode, CallRecord, CallState, Direction, TransferRecord
from bridge.manager_core import CallError
from bridge.transfer.controller import TransferError
from bridge.turns import Turns
from carriers.base import OutboundRequest

if TYPE_CHECKING:
    from bridge.conversation.chat import ChatModel
    from bridge.voice import CallVoice

log = logging.getLogger(__name__)

MEDIA_WAIT_S = 10.0  # a carrier re-opens the caller's stream after a failed cold transfer within this


class TransferCalls(Turns):
    async def transfer(self, call_id: str, to: str, mode: str | None = None,
                       summary: str | None = None) -> TransferRecord:
        """Hand the caller to a person; returns the transfer record once the outcome is known."""
        try:
            return await self.transfers.transfer(call_id, to, mode, summary)
        except TransferError as exc:
            raise CallError(str(exc)) from None

    async def place_leg(self, parent: CallRecord, to: str) -> CallRecord:
        """A warm transfer's call to the person: linked to `parent`, no greeting, no replies, no report,
        no capacity slot."""
        ours = parent.to if parent.direction == Direction.INBOUND else parent.from_
        call = CallRecord(callId=str(uuid.uuid4()), provider=self.carrier.name, direction=Direction.OUTBOUND,
                          state=CallState.INITIATED, from_=ours or self.settings.fromNumber or "", to=to,
                          startedAt=self.clock.time(),
                          metadata={TRANSFER_PARENT: parent.callId, "mode": str(CallMode.CONVERSATION),
                                    "turnCount": 0, "initialMessageSpoken": True})
        self._stamp_node(call)
        self.calls[call.callId] = call
        self._save(call)
        self._publish("call.created", call, transferOf=parent.callId)
        request = OutboundRequest(to=to, from_number=call.from_, message="", mode=str(CallMode.CONVERSATION),
                                  stream=self.settings.streaming.enabled)
        await self._dial(call, request, "The person's call could not be placed")
        return call

    def finish(self, call: CallRecord, state: CallState) -> None:
        """Final without a hang-up: the carrier carries the call on without the bridge."""
        self._finalize(call, state)

    async def end_call_as(self, call: CallRecord, state: CallState) -> None:
        await self._hangup(call, state)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        return self._spawn(coro, name)

    def summary_model(self) -> ChatModel | None:
        """The conversation's model writes the briefing; the offline one cannot (it only echoes)."""
        from bridge.conversation.chat import OfflineChatModel

        model = self.conversation.model if self.conversation is not None else None
        return None if isinstance(model, OfflineChatModel) else model

    async def wait_new_media(self, call: CallRecord, old: CallVoice) -> None:
        """Until a media leg other than `old` is attached (the carrier re-opened the stream)."""
        current = self._voices.get(call.callId)
        if (current is not None and current is not old) or call.terminal:
            return
        future: asyncio.Future[CallVoice | None] = asyncio.get_running_loop().create_future()
        self._media_waiters.setdefault(call.callId, []).append(future)
        try:
            await self.clock.wait_for(future, MEDIA_WAIT_S)
        except TimeoutError:
            log.warning("call %s: no new media stream after the transfer", call.callId)
