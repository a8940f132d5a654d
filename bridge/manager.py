"""CallManager: the one place that decides what happens to calls, composed of parts with one job each.

- bridge/manager_core.py   the calls in memory, lookups, transitions, call log writes, publication
- bridge/carrier_host.py   what carriers see (CarrierHost) and the intake of their events
- bridge/inbound_policy.py who may call in (pure)
- bridge/call_api.py       initiate / speak / continue / end / status / subscribe
- bridge/turns.py          saying and replying; the conversation engine's host (TurnHost, ToolHost)
- bridge/answering.py      after an answer: keys out, answering-machine detection
- bridge/lifecycle.py      hang-up with retries, finalize, report, timers, reaper
- bridge/recovery.py       restart recovery
- bridge/ownership.py      a call moving between cluster nodes (release, adopt)
- bridge/fanout.py         observers and RPC subscribers (and the cluster's event bus)
- bridge/transfer/calls.py transfer to a person: the API and what the TransferController needs
"""

from __future__ import annotations

from bridge.call_api import CallApi
from bridge.carrier_host import STT_LOST_MESSAGE
from bridge.fanout import CallObserver
from bridge.manager_core import ENDED_CALLS_KEPT, CallError, VoiceFactory
from bridge.ownership import Ownership
from bridge.recovery import Recovery
from bridge.transfer.calls import TransferCalls

__all__ = ["ENDED_CALLS_KEPT", "STT_LOST_MESSAGE", "CallError", "CallManager", "CallObserver", "VoiceFactory"]


class CallManager(Ownership, CallApi, TransferCalls, Recovery):
    """The façade the runtime, the RPC, the CLI and the tests hold; it starts and stops the call machinery."""

    async def start(self) -> None:
        self.store.open()
        await self.fanout.start()
        if self.reports is not None:
            await self.reports.start()
        await self._recover()
        await self.carrier.start(self)
        if self.settings.staleCallReaperSeconds > 0:
            self._schedule_reaper()
        self.started = True

    async def stop(self) -> None:
        self.stopping = True
        if self._reaper is not None:
            self._reaper.cancel()
        for timer in [*self._timers.values(), *self._hangup_retries.values()]:
            timer.cancel()
        self._timers.clear()
        self._hangup_retries.clear()
        for voice in list(self._voices.values()):
            await voice.close()
        self._voices.clear()
        await self.carrier.close()
        await self._tasks.cancel()
        if self.reports is not None:
            await self.reports.close()
        if self.responder is not None:
            await self.responder.close()
        if self.conversation is not None:
            await self.conversation.close()
        await self.fanout.stop()
        self._flush_deferred_saves()
        if self.shared is not None:
            await self.shared.aclose()
        else:
            self.store.close()
        self.started = False
