"""Direct SIP carrier on pjsua2 (extra `sip`, wheel `pjsua2-python`).

Where pjsua2 runs:
- One user agent (`sip.workers` = 1): a dedicated thread of this process (`sip.ua.LocalUa`) owns
  pjsua2, polls `libHandleEvents` and runs every pjsua2 call; the asyncio side never calls pjsua2,
  it queues commands and awaits their results as futures.
- Several (`sip.workers` > 1, or "auto" when maxConcurrentCalls exceeds one process's call table):
  worker processes (`pool.WorkerUa`) behind the SIP front (`front`), a stateless
  record-routing proxy on the public port.
Either way the carrier sees the same user-agent interface (`pool.UserAgent`) and the same
notifications `(kind, provider_call_id, data)`, delivered on the loop in order and turned into
`CallEvent`s here.

The provider call id is the SIP Call-ID of the dialog.

Modules: `protocol` (SIP identities and end reasons, no I/O), `media` (the media leg),
`ua` (the pjsua2 thread), `worker` / `pool` / `proxy` / `front` (scaling out),
and this one (the carrier: loop-side call state and events).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bridge.calls import CallRecord, CallState, Direction, EventType, TransferOutcome
from bridge.tasks import BackgroundTasks
from carriers.base import (
    Carrier,
    CarrierError,
    CarrierHost,
    OutboundRequest,
    ProviderStatus,
)
from carriers.legs import LegTable, cancel_timer, leg_event
from carriers.sip.front import SipFront
from carriers.sip.media import JITTER_MAX_FRAMES, PREBUFFER_FRAMES, SipMediaTransport  # noqa: F401 - re-exported
from carriers.sip.pool import FrontAddresses, RemoteMediaTransport, UaPool, WorkerUa
from carriers.sip.protocol import (  # noqa: F401
    caller_id,
    dial_uri,
    inbound_end_reason,
    outbound_end_reason,
    transfer_outcome,
)
from carriers.sip.proxy import SipFrontCore
from carriers.sip.settings import SipSettings
from carriers.sip.ua import LocalUa

try:  # the `sip` extra; absent on Python 3.13 (no wheel)
    import pjsua2 as pj
except ImportError:  # pragma: no cover - exercised only without the extra
    pj = None

log = logging.getLogger("voicecall.sip")

# Call.dialDtmf queues the digits and returns; each then takes pjmedia's PJMEDIA_DTMF_DURATION (200 ms)
# plus its end-bit packets (3 frames). send_dtmf returns once they are out, so a `w` pause of a
# dtmfSequence starts after the keys, not during them.
DIGIT_PLAYOUT_S = 0.26


# ----------------------------------------------------------------------------- the carrier


@dataclass(slots=True)
class _Leg:
    """Loop-side state of one SIP dialog."""

    pid: str
    direction: Direction
    call_id: str | None = None
    from_: str = ""
    to: str = ""
    started_at: float = field(default_factory=time.monotonic)
    transport: SipMediaTransport | RemoteMediaTransport | None = None
    codec: str = ""
    confirmed: bool = False
    attached: bool = False
    answered_sent: bool = False
    ringing_sent: bool = False
    decided: bool = False  # inbound: answer or reject requested
    ring_timeout: bool = False
    local_reason: CallState | None = None
    ended: bool = False
    timer: Any = None
    dtmf_seq: int = 0
    transfer: _Refer | None = None  # the latest cold transfer (REFER) of this dialog
    transfers: int = 0


@dataclass(slots=True)
class _Refer:
    """One REFER of a dialog and how far it got."""

    to: str
    accepted: bool = False  # the transferee took the REFER (202); later reports are NOTIFY sipfrags
    outcome: TransferOutcome | None = None


class SipCarrier(Carrier):
    """Direct SIP: softphones and trunks call the bridge, and the bridge calls SIP URIs."""

    name: ClassVar[str] = "sip"
    streams_media: ClassVar[bool] = True
    media_always: ClassVar[bool] = True
    sends_dtmf: ClassVar[bool] = True  # RFC 4733 telephone-events, also while the media leg runs

    def __init__(self, settings: SipSettings | None = None) -> None:
        """`settings` is the config's `sip` section; None = take `host.settings.sip` at start."""
        self._settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = UaPool()
        self._front: Any = None  # sip_front.SipFront when there are workers
        self._front_addresses: FrontAddresses | None = None
        self._worker_count = 1
        self._closing = False
        self._legs: LegTable[_Leg] = LegTable()
        self.registration: dict[str, Any] | None = None  # last REGISTER outcome (code, reason, active)
        self._registration_changed = asyncio.Event()
        self._tasks = BackgroundTasks(log)

    @property
    def settings(self) -> SipSettings:
        if self._settings is None:
            raise CarrierError("sip: not started")
        return self._settings

    # -- lifecycle
    async def start(self, host: CarrierHost) -> None:
        if pj is None:
            raise CarrierError("sip: pjsua2 is not installed (install the `sip` extra; no wheel for Python 3.13+)")
        await super().start(host)
        if self._settings is None:
            self._settings = getattr(host.settings, "sip", None) or SipSettings()
        self._loop = asyncio.get_running_loop()
        s = self.settings
        workers = self._worker_count = s.worker_count(getattr(host.settings, "maxConcurrentCalls", None))
        self._closing = False
        if workers == 1:
            local = LocalUa(s, self._notify_from(0), self._loop)
            self._pool.agents.append(local)
            try:
                await local.start()
            except BaseException:
                self._pool.agents.clear()
                raise
            return
        await self._start_workers(workers)

    async def _start_workers(self, count: int) -> None:
        s = self.settings
        self._front_addresses = front = FrontAddresses.for_settings(s)
        core = SipFrontCore(
            front.public, [], self._pick_worker, internal=front.internal,
            local_hosts={s.bindAddress, "127.0.0.1", "localhost"},
            dialog_ttl_s=s.ringTimeoutSec + 64.0,  # a ringing INVITE must still find its worker for CANCEL
        )
        # The front listens before the workers start; the registering worker sends its REGISTER only
        # once the front routes for it (set_workers), so the first one is not refused.
        front_server = SipFront(core, (s.bindAddress, s.port))
        try:
            await front_server.start()
        except OSError as exc:
            raise CarrierError(f"sip: start failed: {exc.strerror or exc}") from None
        self._front = front_server
        agents = [self._new_worker(i) for i in range(count)]
        self._pool.agents.extend(agents)
        results = await asyncio.gather(*(a.start() for a in agents), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(a.close() for a in agents), return_exceptions=True)
            self._pool.agents.clear()
            await self._front.close()
            self._front = None
            raise failed[0] if isinstance(failed[0], CarrierError) else CarrierError(f"sip: {failed[0]}")
        core.set_workers([a.sip_address for a in agents])
        await self._start_registration(agents[0])
        log.info(
            "sip: front on %s:%d (public %s:%d), %d workers x %d calls",
            s.bindAddress, s.port, *front.public, count, min(a.capacity for a in agents),
        )

    def _new_worker(self, index: int) -> WorkerUa:
        s = self.settings
        span = s.rtpPortRange // self._worker_count
        own = s.model_copy(update={"rtpPortStart": s.rtpPortStart + index * span, "rtpPortRange": span})
        if self._front_addresses is None:
            raise CarrierError("sip: workers start only once the SIP front is up")
        return WorkerUa(index, own, self._front_addresses, register=index == 0, notify=self._notify_from(index))

    async def _restart_worker(self, index: int) -> None:
        """A worker died (its calls already ended as errors): start a new one in its place."""
        if self._front is None or self._closing:
            return
        agent = self._new_worker(index)
        try:
            await agent.start()
        except CarrierError as exc:
            log.error("sip: could not restart worker %d: %s", index, exc)
            return
        if self._closing or self._front is None:
            await agent.close()
            return
        self._pool.agents[index] = agent
        self._front.core.set_workers([a.sip_address for a in self._pool.agents if a.alive])
        await self._start_registration(agent)
        log.warning("sip: worker %d restarted on %s:%d", index, *agent.sip_address)

    async def _start_registration(self, agent: WorkerUa) -> None:
        account = self.settings.account
        if account is not None and account.registrar:
            try:
                await agent.start_registration()
            except CarrierError as exc:  # reported like any failed REGISTER; calls still work
                log.warning("sip: could not start registration on worker %d: %s", agent.index, exc)

    def _pick_worker(self, call_id: str) -> tuple[str, int] | None:
        agent = self._pool.reserve(call_id, time.monotonic())
        return None if agent is None else agent.sip_address

    async def close(self) -> None:
        agents = list(self._pool.agents)
        if not agents:
            return
        self._closing = True
        # Workers hang up their calls through the front: stop it only after them.
        await asyncio.gather(*(a.close() for a in agents), return_exceptions=True)
        if self._front is not None:
            await self._front.close()
            self._front = None
        # Drain the notifications posted while stopping.
        for _ in range(3):
            await asyncio.sleep(0)
        for leg in list(self._legs.live.values()):
            self._end(leg, leg.local_reason or CallState.HANGUP_BOT)
        self._pool.agents.clear()

    # -- manager -> carrier
    async def initiate_call(self, call: CallRecord, request: OutboundRequest) -> str:
        self._require_started()
        uri = dial_uri(request.to, self.settings)
        agent = self._pool.pick(time.monotonic())
        if agent is None:
            raise CarrierError(f"sip: call to {uri} failed: every SIP line is busy ({self._capacity()} calls)")
        pid = f"vc-{uuid.uuid4().hex}"
        leg = _Leg(pid=pid, direction=Direction.OUTBOUND, call_id=call.callId, from_=request.from_number, to=uri)
        self._legs.add(pid, leg, call.callId)
        self._pool.bind(pid, agent)
        try:
            await agent.dial(pid, uri)
        except CarrierError as exc:
            self._forget(leg)
            raise CarrierError(f"sip: call to {uri} failed: {exc}") from None
        leg.timer = self.host.clock.call_later(self.settings.ringTimeoutSec, lambda: self._ring_timeout(pid))
        return pid

    async def answer_call(self, call: CallRecord) -> None:
        leg = self._legs.answering(call)
        if leg is None:
            return
        if self.settings.answerDelayMs:
            await self.host.clock.sleep(self.settings.answerDelayMs / 1000)
        await self._call_op(leg.pid, "answer", 200)

    async def reject_call(self, call: CallRecord) -> None:
        leg = self._legs.ending(call, CallState.HANGUP_BOT, decided=True)
        if leg is None:
            return
        await self._call_op(leg.pid, "hangup", self.settings.rejectCode)

    async def hangup_call(self, call: CallRecord, reason: CallState) -> None:
        leg = self._legs.ending(call, reason)
        if leg is None:
            return
        # Inbound not yet answered: a final error response; otherwise BYE (or CANCEL while ringing).
        code = 603 if leg.direction is Direction.INBOUND and not leg.confirmed else 0
        await self._call_op(leg.pid, "hangup", code)

    async def send_dtmf(self, call: CallRecord, digits: str) -> None:
        leg = self._legs.live_for(call)
        if leg is None:
            raise CarrierError("sip: no such active call")
        if not re.fullmatch(r"[0-9A-Da-d*#]+", digits):
            raise CarrierError("sip: DTMF digits must be 0-9, A-D, * or #")
        agent = self._pool.agent_of(leg.pid)
        if agent is None:
            raise CarrierError("sip: call is gone")
        await agent.dial_dtmf(leg.pid, digits)
        await self.host.clock.sleep(len(digits) * DIGIT_PLAYOUT_S)

    async def transfer_cold(self, call: CallRecord, to: str) -> None:
        """REFER the far end to `to`; the outcome comes from the NOTIFYs (`_on_transfer`). On success
        the bridge hangs up its dialog (as pjsua's own app does), so the call ends `transferred`."""
        leg = self._legs.live_for(call)
        if leg is None or not leg.confirmed:
            raise CarrierError("sip: no answered call to transfer")
        if leg.transfer is not None and leg.transfer.outcome is None:
            raise CarrierError("sip: a transfer of this call is already running")
        uri = dial_uri(to, self.settings)
        agent = self._pool.agent_of(leg.pid)
        if agent is None:
            raise CarrierError("sip: call is gone")
        leg.transfer = _Refer(to=uri)
        leg.transfers += 1
        try:
            await agent.transfer(leg.pid, uri)
        except CarrierError:
            leg.transfer = None
            raise
        log.info("sip: call %s: REFER to %s sent", leg.pid, uri)

    async def get_call_status(self, call: CallRecord) -> ProviderStatus | None:
        # SIP dialogs live only in this process: a call we do not hold has ended.
        leg = self._legs.live_for(call)
        if leg is None:
            return ProviderStatus(terminal=True)
        return ProviderStatus(terminal=False)

    def describe(self) -> dict[str, Any]:
        s = self._settings
        info: dict[str, Any] = {"name": self.name, "activeCalls": len(self._legs)}
        if s is not None:
            info.update(
                {"listen": f"{s.bindAddress}:{s.port}/{s.transport}", "codecs": s.codecs, "clockRate": s.clockRate}
            )
            if self._front is not None:
                info["workers"] = self._pool.describe(time.monotonic())
            if s.account is not None:
                info["account"] = {"username": s.account.username, "domain": s.account.domain}
            if self.registration is not None:
                info["registration"] = dict(self.registration)
        return info

    def leg_stats(self, provider_call_id: str) -> dict[str, Any] | None:
        """Figures of a live or recently ended dialog (setup time, frame counters, codec)."""
        leg = self._legs.get(provider_call_id)
        if leg is None:
            return self._legs.ended.get(provider_call_id)
        return self._stats(leg)

    def worker_pids(self) -> list[int]:
        """Process ids of the SIP worker processes (none when the user agent runs in this process)."""
        return [a.pid for a in self._pool.agents if isinstance(a, WorkerUa) and a.pid is not None]

    def peak_concurrent_calls(self) -> int:
        return self._pool.peak_total

    def peak_calls_per_worker(self) -> list[int]:
        return [self._pool.peaks.get(id(a), 0) for a in self._pool.agents]

    # -- internals
    def _require_started(self) -> None:
        if not self._pool.agents:
            raise CarrierError("sip: not started")

    def _capacity(self) -> int:
        return sum(agent.capacity for agent in self._pool.agents)

    async def _call_op(self, pid: str, op: str, code: int) -> None:
        self._require_started()
        agent = self._pool.agent_of(pid)
        if agent is None:
            return  # already ended: success
        await agent.call_op(pid, op, code)

    def _notify_from(self, index: int) -> Any:
        """The notification sink of the pool's user agent number `index`."""

        def notify(kind: str, pid: str, data: dict[str, Any]) -> None:
            if kind == "incoming":
                self._pool.bind(pid, self._pool.agents[index])
            try:
                getattr(self, f"_on_{kind}")(pid, data)
            except Exception:
                log.exception("sip: handling %s for %s failed", kind, pid)

        return notify

    def _emit(self, leg: _Leg, etype: EventType, key: str | None = None, **fields: Any) -> None:
        self.host.emit(leg_event("sip", leg.pid, leg.call_id, etype, self.host.clock.time(), key, **fields))

    def _on_registration(self, pid: str, data: dict[str, Any]) -> None:
        self.registration = data
        self._registration_changed.set()
        level = logging.INFO if 200 <= data["code"] < 300 else logging.WARNING
        log.log(level, "sip: registration %s %s (active=%s)", data["code"], data["reason"], data["active"])

    async def wait_registered(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for a REGISTER outcome: returns it on 2xx, raises CarrierError on a final failure."""

        async def outcome() -> dict[str, Any]:
            while True:
                reg = self.registration
                if reg is not None and reg["code"] >= 200 and (reg["code"] >= 300 or reg["active"]):
                    return reg
                self._registration_changed.clear()
                await self._registration_changed.wait()

        reg = await asyncio.wait_for(outcome(), timeout)
        if reg["code"] >= 300:
            raise CarrierError(f"sip: registration failed: {reg['code']} {reg['reason']}")
        return reg

    def _on_incoming(self, pid: str, data: dict[str, Any]) -> None:
        leg = _Leg(pid=pid, direction=Direction.INBOUND, from_=data["from"], to=data["to"], started_at=data["at"])
        self._legs.add(pid, leg)
        log.info("sip: incoming call %s from %s to %s", pid, leg.from_, leg.to)
        # Nobody decided within the ring timeout: 480, so the caller is not left ringing forever.
        leg.timer = self.host.clock.call_later(self.settings.ringTimeoutSec, lambda: self._ring_timeout(pid))
        self._emit(
            leg,
            EventType.INITIATED,
            direction=Direction.INBOUND,
            from_number=leg.from_,
            to_number=leg.to,
        )

    def _on_worker_lost(self, pid: str, data: dict[str, Any]) -> None:
        self._tasks.spawn(self._restart_worker(int(data["index"])), f"sip-restart-worker-{data['index']}")

    def _on_failed(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is not None and not leg.ended:
            log.error("sip: call %s lost: %s", pid, data.get("reason", ""))
            self._end(leg, CallState.ERROR)
        self._pool.release(pid)

    def _on_early(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ringing_sent or leg.ended:
            return
        leg.ringing_sent = True
        self._emit(leg, EventType.RINGING)

    def _on_media(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended:
            return
        leg.transport = data["transport"]
        leg.codec = data.get("codec", "")
        self._maybe_attach(leg)

    def _on_confirmed(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended:
            return
        leg.confirmed = True
        cancel_timer(leg)
        self._maybe_attach(leg)

    def _maybe_attach(self, leg: _Leg) -> None:
        """On a confirmed dialog, attach the audio leg BEFORE call.answered, so the manager's
        greeting (spoken on answered) has somewhere to go. A dialog without audio yet (no SDP
        answer, or audio refused) is answered now and attached when its media comes up."""
        if not leg.confirmed or leg.attached:
            return
        if leg.transport is not None and leg.call_id is not None:
            leg.transport.bridge = self.host.attach_media(leg.call_id, leg.transport)
            leg.attached = True
        if not leg.answered_sent:
            leg.answered_sent = True
            self._emit(leg, EventType.ANSWERED)
        if leg.attached:
            self._emit(leg, EventType.ACTIVE)

    def _on_dtmf(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended:
            return
        leg.dtmf_seq += 1
        self._emit(leg, EventType.DTMF, key=f"dtmf:{leg.dtmf_seq}", digits=str(data["digit"]))

    def _on_transfer(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        refer = leg.transfer if leg is not None else None
        if leg is None or leg.ended or refer is None or refer.outcome is not None:
            return
        code, reason = int(data["code"]), str(data.get("reason") or "")
        outcome = transfer_outcome(code, accepted=refer.accepted, final=bool(data.get("final")))
        if outcome is None:
            refer.accepted = True
            log.debug("sip: call %s: transfer progress %d %s", pid, code, reason)
            return
        refer.outcome = outcome
        log.info("sip: call %s: transfer to %s -> %s (%d %s)", pid, refer.to, outcome, code, reason)
        error = None if outcome is TransferOutcome.COMPLETED else f"SIP {code} {reason}".strip()
        self._emit(leg, EventType.TRANSFER, key=f"transfer:{leg.transfers}", outcome=outcome.value, error=error)
        if outcome is TransferOutcome.COMPLETED and leg.local_reason is None:
            leg.local_reason = CallState.TRANSFERRED
            self._tasks.spawn(self._call_op(pid, "hangup", 0), f"sip-transferred-{pid}")

    def _on_disconnected(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended:
            return
        answered = bool(data.get("answered"))
        local = bool(data.get("local")) or leg.local_reason is not None
        code = int(data.get("code") or 0)
        if leg.direction is Direction.OUTBOUND:
            reason = outbound_end_reason(code, answered=answered, local=local, ring_timeout=leg.ring_timeout)
        elif leg.ring_timeout and not answered:
            reason = CallState.NO_ANSWER
        else:
            reason = inbound_end_reason(local=local)
        if leg.local_reason is not None:  # we hung up (or rejected): say why the manager asked to
            reason = leg.local_reason
        if leg.transfer is not None and leg.transfer.outcome is TransferOutcome.COMPLETED:
            reason = CallState.TRANSFERRED  # whoever sent the BYE: the caller went to the person
        log.info("sip: call %s ended (%s %s) -> %s", pid, code, data.get("reason", ""), reason)
        self._end(leg, reason, sip_code=code)

    def _end(self, leg: _Leg, reason: CallState, sip_code: int = 0) -> None:
        if leg.ended:
            return
        leg.ended = True
        cancel_timer(leg)
        if leg.transport is not None:
            leg.transport.closed = True
        if leg.attached and leg.call_id is not None:
            self.host.detach_media(leg.call_id)
        stats = self._stats(leg)
        stats["sipCode"] = sip_code
        stats["reason"] = str(reason)
        self._legs.record_ended(leg.pid, stats)
        self._forget(leg)
        self._emit(leg, EventType.ENDED, reason=reason)

    def _forget(self, leg: _Leg) -> None:
        self._legs.forget(leg.pid, leg.call_id)
        self._pool.release(leg.pid)

    def _ring_timeout(self, pid: str) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended or leg.confirmed:
            return
        if leg.direction is Direction.INBOUND and leg.decided:
            return
        leg.ring_timeout = True
        code = 480 if leg.direction is Direction.INBOUND else 0
        self._tasks.spawn(self._call_op(pid, "hangup", code), f"sip-ring-timeout-{pid}")

    @staticmethod
    def _stats(leg: _Leg) -> dict[str, Any]:
        t = leg.transport
        def since_start(at: float | None) -> float | None:
            return None if at is None else round((at - leg.started_at) * 1000, 1)

        setup_ms = since_start(t.first_audio_at) if t else None
        media_ms = since_start(t.first_rx_at) if t else None
        return {
            "providerCallId": leg.pid,
            "callId": leg.call_id,
            "direction": str(leg.direction),
            "codec": leg.codec,
            "setupMs": setup_ms,  # INVITE (sent or received) -> first non-silent frame from the far end
            "mediaMs": media_ms,  # INVITE -> media port running
            "framesIn": t.frames_in if t else 0,
            "framesOut": t.frames_out if t else 0,
            "underruns": t.underruns if t else 0,
            "framesDropped": t.frames_dropped if t else 0,
        }


def from_settings(settings: Any) -> SipCarrier:
    """Registry factory: the carrier for `provider: sip`, configured by the `sip` section."""
    return SipCarrier(settings.section(SipSettings))
