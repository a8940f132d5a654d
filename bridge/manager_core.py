"""The calls in memory and the bookkeeping every part of the manager shares: the call tables, lookups,
state transitions, the call log writes, event publication and background tasks."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from bridge.agents import agent_number
from bridge.calls import CallEvent, CallRecord, CallState, can_transition
from bridge.config import Settings
from bridge.fanout import CallObserver, EventFanout
from bridge.hooks import ReportSender
from bridge.logs import call_id_var
from bridge.machine import MachineDetection, NativeMachineDetection
from bridge.responder import Responder
from bridge.store import CallStore, SharedStore, Store
from bridge.tasks import BackgroundTasks
from bridge.transfer.controller import TransferController, TransferHost
from carriers.base import Carrier
from media.clock import Clock, RealClock, TimerHandle
from media.transport import MediaTransport

if TYPE_CHECKING:
    from bridge.agents import Conversation
    from bridge.voice import CallVoice

log = logging.getLogger(__name__)

# Ended calls kept in memory for status/list; older ones are dropped (calls.jsonl keeps them all).
ENDED_CALLS_KEPT = 1000
STORE_RETRY_S = 5.0
# A save that need not reach the disk at once (a turn's timing record, due at its first audio, when
# other calls' first audio is due too) rides on the call's next save, or is written after this long.
SAVE_SOON_S = 3.0


class CallError(Exception):
    """A request about a call that cannot be carried out; the message is shown to the caller of the API."""


@dataclass(slots=True)
class PendingTurn:
    """A `continue_call` waiting for the caller's next final transcript."""

    token: str
    future: asyncio.Future[str]
    started: float


# Builds a call's voice (a CallVoice: MediaPipeline + STT + TTS) from its media leg; the manager starts it.
VoiceFactory = Callable[[CallRecord, MediaTransport, Callable[[CallEvent], None]], "CallVoice"]


class ManagerCore:
    def __init__(
        self,
        settings: Settings,
        carrier: Carrier,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        responder: Responder | None = None,
        voice_factory: VoiceFactory | None = None,
        conversation: Conversation | None = None,
    ) -> None:
        self.settings = settings
        self.carrier = carrier
        self.clock: Clock = clock or RealClock()
        self.store: Store = store or CallStore(settings.store_dir)
        # Several nodes on one Redis: capacity and events are shared through it (bridge/cluster/)
        self.shared: SharedStore | None = self.store if isinstance(self.store, SharedStore) else None
        self.responder = responder
        # Streaming replies with tools (the default); None or agent.responseMode batch: the Responder path.
        self.conversation = conversation
        self._replies: dict[str, asyncio.Task[Any]] = {}  # call id -> its running reply turn
        self._consults: dict[str, tuple[str, asyncio.Future[str]]] = {}  # consult id -> (call id, answer)
        self._voice_factory = voice_factory
        self.calls: dict[str, CallRecord] = {}
        self.ended_calls_kept = ENDED_CALLS_KEPT
        self._ended: OrderedDict[str, None] = OrderedDict()  # ended call ids, oldest first
        self._by_provider_id: dict[str, str] = {}
        self._processed: set[str] = set()
        self._turns: dict[str, PendingTurn] = {}
        self._timers: dict[str, TimerHandle] = {}
        self._hangup_retries: dict[str, TimerHandle] = {}
        self._deferred_saves: dict[str, TimerHandle] = {}  # call id -> its save_soon timer
        self._voices: dict[str, CallVoice] = {}
        self._media_waiters: dict[str, list[asyncio.Future[CallVoice | None]]] = {}
        self._machine: dict[str, MachineDetection | NativeMachineDetection] = {}
        # calls whose media stream is being replaced on purpose (Twilio <Play digits>): call id -> until
        # when (monotonic) its stream may be away without the call ending
        self._stream_restarts: dict[str, float] = {}
        hook = settings.hooks.callEnded
        self.reports = ReportSender(hook, settings.store_dir, self.clock) if hook else None
        self._rejected_provider_ids: set[str] = set()
        self._tasks = BackgroundTasks(log, level=logging.ERROR)
        self.fanout = EventFanout(self.shared, self.clock)
        self.observers: list[CallObserver] = self.fanout.observers  # the same list: monitors append to it
        self._reaper: TimerHandle | None = None
        self.public_base: str | None = None  # public origin, e.g. https://host.example (set by server)
        self.started = False
        self.stopping = False  # shutting down: a dropped media stream no longer ends its call
        # Transfers to a person (bridge/transfer/); the host surface is the TransferCalls part
        self.transfers = TransferController(cast(TransferHost, self))

    def get_call(self, call_id: str) -> CallRecord | None:
        return self.calls.get(call_id)

    def find_call(self, call_id: str | None = None, provider_call_id: str | None = None) -> CallRecord | None:
        if call_id and call_id in self.calls:
            return self.calls[call_id]
        if provider_call_id and provider_call_id in self._by_provider_id:
            return self.calls.get(self._by_provider_id[provider_call_id])
        return None

    def _agent(self, call: CallRecord) -> Settings:
        """The settings of the agent the call belongs to (`numbers`, else the top level)."""
        return self.settings.for_number(agent_number(call))

    def voice(self, call_id: str) -> CallVoice | None:
        return self._voices.get(call_id)

    def active_calls(self) -> list[CallRecord]:
        return [c for c in self.calls.values() if not c.terminal]

    def _conversations(self) -> int:
        """Live calls that count against maxConcurrentCalls (a transfer's call to the person does not)."""
        return sum(1 for c in self.calls.values() if not c.terminal and not self.transfers.is_leg(c))

    def _check_capacity(self) -> None:
        active = self._conversations()
        if active >= self.settings.maxConcurrentCalls:
            raise CallError(f"Maximum concurrent calls ({self.settings.maxConcurrentCalls}) reached")

    def _live_call(self, call_id: str) -> CallRecord:
        call = self.find_call(call_id, call_id)
        if call is None:
            raise CallError(f"Call not found: {call_id}")
        if call.terminal:
            raise CallError(f"Call {call.callId} has ended ({call.state})")
        call_id_var.set(call.callId)
        return call

    def answered_call(self, call_id: str) -> CallRecord:
        """The live, answered call with this id; CallError otherwise."""
        return self._answered_call(call_id)

    def _answered_call(self, call_id: str) -> CallRecord:
        call = self._live_call(call_id)
        if call.answeredAt is None:
            raise CallError(f"Call {call.callId} is not answered yet ({call.state})")
        return call

    def _transition(self, call: CallRecord, target: CallState) -> bool:
        if call.state == target:
            return True
        if not can_transition(call.state, target):
            log.info("call %s: transition %s -> %s refused", call.callId, call.state, target)
            return False
        call.state = target
        self._publish("call.state", call)
        return True

    def _move(self, call: CallRecord, target: CallState) -> None:
        """A transition outside event processing (which saves after applying): written at once, so a
        restart never brings the call back in an older state."""
        if call.state != target and self._transition(call, target):
            self._save(call)

    # ================================================================== bookkeeping

    def _link_provider_id(self, call: CallRecord, provider_id: str) -> None:
        if call.providerCallId and call.providerCallId != provider_id:
            call.metadata.setdefault("previousProviderCallIds", []).append(call.providerCallId)
        call.providerCallId = provider_id
        self._by_provider_id[provider_id] = call.callId

    def _save(self, call: CallRecord) -> None:
        deferred = self._deferred_saves.pop(call.callId, None)
        if deferred is not None:  # this save writes the whole record, the deferred change included
            deferred.cancel()
        was_degraded = self.store.degraded
        if self.store.append(call) or was_degraded:
            return
        log.error("call log write failed (%s); keeping records in memory and retrying", self.store.last_error)
        self._schedule_store_retry()

    def _save_soon(self, call: CallRecord) -> None:
        """Save `call` with its next save, or in SAVE_SOON_S at the latest (a crash within that window
        loses only this change; every earlier save is on disk)."""
        if call.callId not in self._deferred_saves:
            self._deferred_saves[call.callId] = self.clock.call_later(SAVE_SOON_S, lambda: self._deferred_save(call))

    def _deferred_save(self, call: CallRecord) -> None:
        self._deferred_saves.pop(call.callId, None)
        if self.calls.get(call.callId) is call:  # not a call this node has let go of since
            self._save(call)

    def _flush_deferred_saves(self) -> None:
        for call_id in list(self._deferred_saves):
            call = self.calls.get(call_id)
            timer = self._deferred_saves.pop(call_id)
            timer.cancel()
            if call is not None:
                self._save(call)

    def _schedule_store_retry(self) -> None:
        def retry() -> None:
            if self.store.flush():
                log.warning("call log writable again; kept records written")
            elif not self.stopping:
                self._schedule_store_retry()

        self.clock.call_later(STORE_RETRY_S, retry)

    def _stamp_node(self, call: CallRecord) -> None:
        if self.shared is not None:
            call.metadata["node"] = self.shared.node_id

    def _publish(self, kind: str, call: CallRecord, **extra: Any) -> None:
        self.fanout.publish(kind, call, **extra)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name)

    async def drain(self) -> None:
        """Wait for spawned side effects (tests)."""
        await self._tasks.drain()

