"""Asterisk carrier: call control over ARI (REST + events WebSocket), audio over ExternalMedia RTP.

Decision: a plain aiohttp client, not aioari. aioari has had no release since 2020 and loads the
server's Swagger documents at start (one more thing to fail, and to fake); the carrier needs about
ten REST calls, which `CarrierHttp` already sends with Basic auth and retries for idempotent ones.

Call flow. Inbound: the dialplan sends a channel to `Stasis(app)`; its StasisStart becomes
call.initiated and the manager answers or rejects. Outbound: POST /ari/channels originates into our
app; ChannelStateChange "Ringing" is call.ringing, and the channel enters Stasis (StasisStart) when
answered. Either way, once answered: a mixing bridge, an ExternalMedia channel sending RTP to our
UDP port (`carriers.asterisk.rtp`), both channels in the bridge, the RTP leg attached to the call's
pipeline, then call.answered and call.active. ChannelDestroyed ends the call (cause -> reason).

The provider call id is the ARI channel id; ids of the channels and bridges we create are ours
(`vc-...`), so an event that arrives before the REST reply that created its channel is still known.

Modules: `protocol` (pure ARI facts), `events` (the events WebSocket), `rtp` (RTP), this one.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

from bridge.calls import CallRecord, CallState, Direction, EventType, TransferOutcome
from bridge.tasks import BackgroundTasks
from carriers.asterisk.events import AriEvents
from carriers.asterisk.protocol import (
    CAUSE_NO_ANSWER,
    CAUSE_REJECTED,
    DTMF_DIGITS,
    DialError,
    caller_of,
    cause_of,
    channel_id,
    dial_endpoint,
    dialed_of,
    end_reason,
    rtp_peer,
    transfer_outcome,
)
from carriers.asterisk.rtp import CODECS, RtpTransport
from carriers.asterisk.settings import AsteriskSettings
from carriers.base import (
    Carrier,
    CarrierError,
    CarrierHost,
    OutboundRequest,
    ProviderStatus,
)
from carriers.http import CarrierHttp
from carriers.legs import LegTable, cancel_timer, leg_event

log = logging.getLogger("voicecall.asterisk")



@dataclass(slots=True)
class _Leg:
    """Our state of one call's ARI channel (the phone side), and of what we built for its audio."""

    id: str
    direction: Direction
    call_id: str | None = None
    from_: str = ""
    to: str = ""
    media_id: str | None = None  # the ExternalMedia channel
    bridge_id: str | None = None
    transport: RtpTransport | None = None
    answered: bool = False  # Up (answered) and in our application
    media_started: bool = False
    attached: bool = False
    ringing_sent: bool = False
    decided: bool = False  # inbound: answer or reject requested
    ring_timeout: bool = False
    local_reason: CallState | None = None
    hangup_cause: int | None = None
    ended: bool = False
    timer: Any = None
    dtmf_seq: int = 0
    transfers: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Transfer:
    """A cold transfer: the person's channel we originated, until it is answered (joined) or ends."""

    person_id: str
    caller: _Leg
    endpoint: str
    number: int  # the caller leg's transfer count: the event's dedupe key
    answered: bool = False


@dataclass(slots=True)
class _Joined:
    """Channels Asterisk connects in one of our bridges after the bridge left the call."""

    bridge_id: str
    channels: set[str]


class AsteriskCarrier(Carrier):
    name: ClassVar[str] = "asterisk"
    streams_media: ClassVar[bool] = True
    media_always: ClassVar[bool] = True
    sends_dtmf: ClassVar[bool] = True  # POST /channels/{id}/dtmf: Asterisk sends RFC 4733 itself
    reports_dtmf: ClassVar[bool] = True  # ChannelDtmfReceived

    def __init__(self, settings: AsteriskSettings) -> None:
        self.settings = settings
        self.codec = CODECS[settings.format]
        password = settings.password.get_secret_value() if settings.password else ""
        credentials = (settings.username or "", password)
        # Built here, not in start(): the manager checks restored calls (get_call_status) before start.
        self._http = CarrierHttp("asterisk", f"{settings.url}/ari", basic_auth=credentials)
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        self._ws_headers = {"Authorization": f"Basic {token}"}
        self._events: AriEvents | None = None
        self._legs: LegTable[_Leg] = LegTable()
        self._media_channels: dict[str, str] = {}  # ExternalMedia channel id -> phone channel id
        self._transfers: dict[str, _Transfer] = {}  # the person's channel id -> its cold transfer
        self._joined: dict[str, _Joined] = {}  # channel id -> the joined pair it belongs to
        self._ports: set[int] = set()
        self.asterisk_version: str | None = None
        self._closing = False
        self._tasks = BackgroundTasks(log)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: CarrierHost) -> None:
        await super().start(host)
        self._closing = False
        s = self.settings
        try:
            info = await self._http.request("GET", "/asterisk/info")
        except CarrierError as exc:
            await self._http.close()
            if exc.status == 401:
                raise CarrierError(
                    f"asterisk: ARI at {s.url} refused user {s.username!r} (HTTP 401): check asterisk.username "
                    "and asterisk.password (or ASTERISK_ARI_PASSWORD) against ari.conf"
                ) from None
            raise CarrierError(f"asterisk: cannot use ARI at {s.url}: {exc}") from None
        system = info.body.get("system") if isinstance(info.body, dict) else None
        self.asterisk_version = system.get("version") if isinstance(system, dict) else None
        self._events = AriEvents(s.url, s.app, self._ws_headers, self._on_event, self._resync)
        try:
            await self._events.start()
        except CarrierError:
            self._events = None
            await self._http.close()
            raise
        log.info("asterisk: Stasis app %r on %s (Asterisk %s)", s.app, s.url, self.asterisk_version or "?")

    async def close(self) -> None:
        self._closing = True
        live = [leg for leg in self._legs.live.values() if not leg.ended]
        for leg in live:
            leg.local_reason = leg.local_reason or CallState.HANGUP_BOT
        await asyncio.gather(*(self._delete_channel(leg.id) for leg in live), return_exceptions=True)
        for leg in live:
            self._end(leg, leg.local_reason or CallState.HANGUP_BOT)
        await self._tasks.drain()
        if self._events is not None:
            await self._events.close()
            self._events = None
        await self._http.close()

    # ------------------------------------------------------------------ manager -> carrier

    async def initiate_call(self, call: CallRecord, request: OutboundRequest) -> str:
        s = self.settings
        try:
            endpoint = dial_endpoint(request.to, s.endpoint)
        except DialError as exc:
            raise CarrierError(f"asterisk: {exc}") from None
        leg = _Leg(id=f"vc-{uuid.uuid4().hex}", direction=Direction.OUTBOUND, call_id=call.callId,
                   from_=request.from_number, to=request.to)
        self._track(leg)  # before the POST: its first events may come before the reply
        body: dict[str, Any] = {"endpoint": endpoint, "app": s.app, "appArgs": "voicecall,outbound",
                                "timeout": s.ringTimeoutSec, "channelId": leg.id}
        if request.from_number:
            body["callerId"] = request.from_number
        try:
            await self._http.request("POST", "/channels", json_body=body)
        except CarrierError as exc:
            self._forget(leg)
            if exc.status is None:  # no answer from Asterisk: the channel may exist all the same
                self._tasks.spawn(self._delete_channel(leg.id))
            raise CarrierError(f"asterisk: call to {endpoint} failed: {exc}", status=exc.status) from None
        if not leg.ended and not leg.answered:
            leg.timer = self.host.clock.call_later(s.ringTimeoutSec, lambda: self._ring_timeout(leg))
        return leg.id

    async def answer_call(self, call: CallRecord) -> None:
        leg = self._legs.answering(call)
        if leg is None:
            return
        result = await self._http.request("POST", f"/channels/{_q(leg.id)}/answer", ok_statuses=(404,))
        if result.status == 404:
            return  # hung up meanwhile: ChannelDestroyed ends it
        leg.answered = True
        await self._start_media(leg)

    async def reject_call(self, call: CallRecord) -> None:
        leg = self._legs.ending(call, CallState.HANGUP_BOT, decided=True)
        if leg is None:
            return
        await self._delete_channel(leg.id, CAUSE_REJECTED)

    async def hangup_call(self, call: CallRecord, reason: CallState) -> None:
        pid = call.providerCallId
        if self._legs.for_call(call) is None and pid and pid not in self._legs.ended:
            await self._end_foreign(pid)
            return
        leg = self._legs.ending(call, reason)
        if leg is None:
            return
        if not await self._delete_channel(leg.id):
            self._end(leg, reason)  # already gone: no ChannelDestroyed will tell us

    async def _end_foreign(self, pid: str) -> None:
        """A call this process never held: another node's, ended here on failover. Hang the phone
        channel up, then take down what that node built for its audio (found by the bridge's name):
        Asterisk keeps a dead application's channels until someone deletes them."""
        await self._delete_channel(pid)
        listed = await self._http.request("GET", "/bridges")
        bridges = listed.body if isinstance(listed.body, list) else []
        for bridge in bridges:
            if not isinstance(bridge, dict) or bridge.get("name") != f"voicecall-{pid}":
                continue
            for cid in bridge.get("channels") or []:
                if isinstance(cid, str) and cid.startswith("vc-media-"):
                    await self._delete_channel(cid)
            await self._http.request("DELETE", f"/bridges/{_q(str(bridge.get('id', '')))}", ok_statuses=(404,))

    async def send_dtmf(self, call: CallRecord, digits: str) -> None:
        leg = self._legs.live_for(call)
        if leg is None:
            raise CarrierError("asterisk: no such active call")
        if not DTMF_DIGITS.match(digits):
            raise CarrierError("asterisk: DTMF digits must be 0-9, A-D, * or #")
        s = self.settings
        result = await self._http.request(
            "POST", f"/channels/{_q(leg.id)}/dtmf",
            json_body={"dtmf": digits, "duration": s.dtmfDurationMs, "between": s.dtmfGapMs}, ok_statuses=(404,))
        if result.status == 404:
            raise CarrierError("asterisk: the call is gone")
        # ARI answers at once and Asterisk plays the digits on the channel's own thread: return when they
        # are out, so a `w` pause of a dtmfSequence starts after the keys, not during them.
        await self.host.clock.sleep((len(digits) * s.dtmfDurationMs + (len(digits) - 1) * s.dtmfGapMs) / 1000)

    async def transfer_cold(self, call: CallRecord, to: str) -> None:
        """Originate the person into our app; the outcome follows from that channel's events."""
        leg = self._legs.live_for(call)
        if leg is None or not leg.attached or leg.bridge_id is None:
            raise CarrierError("asterisk: no answered call to transfer")
        if any(t.caller is leg for t in self._transfers.values()):
            raise CarrierError("asterisk: a transfer of this call is already running")
        s = self.settings
        try:
            endpoint = dial_endpoint(to, s.endpoint)
        except DialError as exc:
            raise CarrierError(f"asterisk: {exc}") from None
        leg.transfers += 1
        xfer = _Transfer(person_id=f"vc-xfer-{uuid.uuid4().hex}", caller=leg, endpoint=endpoint, number=leg.transfers)
        self._transfers[xfer.person_id] = xfer  # before the POST: its events may come before the reply
        body: dict[str, Any] = {"endpoint": endpoint, "app": s.app, "appArgs": f"voicecall,transfer,{leg.id}",
                                "timeout": s.ringTimeoutSec, "channelId": xfer.person_id}
        if leg.from_:
            body["callerId"] = leg.from_
        try:
            await self._http.request("POST", "/channels", json_body=body)
        except CarrierError as exc:
            self._transfers.pop(xfer.person_id, None)
            if exc.status is None:  # no answer from Asterisk: the channel may exist all the same
                self._tasks.spawn(self._delete_channel(xfer.person_id))
            raise CarrierError(f"asterisk: transfer to {endpoint} failed: {exc}", status=exc.status) from None
        log.info("asterisk: call %s: transfer to %s, dialing %s", leg.id, endpoint, xfer.person_id)

    async def join_legs(self, call: CallRecord, person: CallRecord) -> bool:
        """Warm transfer's last step, natively: the person's channel moves into the caller's bridge;
        the bot's ExternalMedia channels and the person's bridge go. The manager ends both calls."""
        caller, callee = self._legs.live_for(call), self._legs.live_for(person)
        if caller is None or callee is None or caller.bridge_id is None or not (caller.attached and callee.attached):
            raise CarrierError("asterisk: both calls must be up to join them")
        if callee.bridge_id is not None:
            await self._http.request("POST", f"/bridges/{_q(callee.bridge_id)}/removeChannel",
                                     json_body={"channel": callee.id})
        await self._http.request("POST", f"/bridges/{_q(caller.bridge_id)}/addChannel",
                                 json_body={"channel": callee.id})
        joined = _Joined(caller.bridge_id, {caller.id, callee.id})
        for leg in (caller, callee):
            self._hand_off(leg, joined)
        log.info("asterisk: calls %s and %s joined in bridge %s", caller.id, callee.id, joined.bridge_id)
        return True

    async def get_call_status(self, call: CallRecord) -> ProviderStatus | None:
        if not call.providerCallId:
            return None
        result = await self._http.request("GET", f"/channels/{_q(call.providerCallId)}", ok_statuses=(404,))
        if result.status == 404:
            return ProviderStatus(terminal=True)
        state = result.body.get("state") if isinstance(result.body, dict) else None
        return ProviderStatus(terminal=False, state=CallState.ACTIVE if state == "Up" else CallState.RINGING)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"name": self.name, "url": s.url, "app": s.app, "format": s.format,
                "asteriskVersion": self.asterisk_version, "activeCalls": len(self._legs),
                "eventsConnected": bool(self._events and self._events.connected),
                "applicationTaken": bool(self._events and self._events.given_up)}

    def leg_stats(self, provider_call_id: str) -> dict[str, Any] | None:
        """RTP figures of a live or recently ended call."""
        leg = self._legs.get(provider_call_id)
        return self._stats(leg) if leg is not None else self._legs.ended.get(provider_call_id)

    # ------------------------------------------------------------------ ARI events

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "ApplicationReplaced":
            self._replaced()
            return
        handler = getattr(self, f"_ev_{event['type']}", None)
        if handler is None:
            return
        cid = channel_id(event)
        if cid is None:
            return
        if cid in self._transfers:
            self._transfer_event(self._transfers[cid], event)
            return
        if cid in self._joined:
            if event["type"] == "ChannelDestroyed":
                self._joined_gone(cid)
            return
        if cid in self._media_channels:
            if event["type"] == "ChannelDestroyed":
                self._media_lost(cid)
            return
        handler(cid, event)

    def _replaced(self) -> None:
        """Another connection registered our Stasis application: from now on Asterisk sends it, not us,
        the events of every call in the application, ours included. Two nodes must never share one."""
        if self._events is None or self._events.given_up:
            return
        self._events.give_up()
        log.error("asterisk: another connection took over Stasis application %r: this process gets no more "
                  "call events. Each bridge node needs its own asterisk.app (README: Scaling)", self.settings.app)

    def _ev_StasisStart(self, cid: str, event: dict[str, Any]) -> None:
        leg = self._legs.get(cid)
        if leg is not None:
            if leg.direction is Direction.OUTBOUND and not leg.answered and not leg.ended:
                leg.answered = True  # an originated channel enters the app when answered
                cancel_timer(leg)
                self._tasks.spawn(self._start_media_or_fail(leg))
            return
        channel = event["channel"]
        if self._closing or cid.startswith("vc-") or str(channel.get("name", "")).startswith("UnicastRTP/"):
            return  # a leftover channel of ours, or some other application's media channel
        leg = _Leg(id=cid, direction=Direction.INBOUND, from_=caller_of(channel), to=dialed_of(channel))
        self._track(leg)
        log.info("asterisk: incoming call %s", cid)
        leg.timer = self.host.clock.call_later(self.settings.ringTimeoutSec, lambda: self._ring_timeout(leg))
        self._emit(leg, EventType.INITIATED, direction=Direction.INBOUND, from_number=leg.from_, to_number=leg.to)

    def _ev_ChannelStateChange(self, cid: str, event: dict[str, Any]) -> None:
        leg = self._legs.get(cid)
        if leg is None or leg.ended or leg.direction is not Direction.OUTBOUND:
            return
        if event["channel"].get("state") == "Ringing" and not leg.ringing_sent:
            leg.ringing_sent = True
            self._emit(leg, EventType.RINGING)

    def _ev_ChannelDtmfReceived(self, cid: str, event: dict[str, Any]) -> None:
        leg = self._legs.get(cid)
        digit = event.get("digit")
        if leg is None or leg.ended or not isinstance(digit, str) or not DTMF_DIGITS.match(digit):
            return
        leg.dtmf_seq += 1
        self._emit(leg, EventType.DTMF, key=f"dtmf:{leg.dtmf_seq}", digits=digit)

    def _ev_ChannelHangupRequest(self, cid: str, event: dict[str, Any]) -> None:
        leg = self._legs.get(cid)
        if leg is not None and leg.hangup_cause is None:
            leg.hangup_cause = cause_of(event)

    def _ev_ChannelDestroyed(self, cid: str, event: dict[str, Any]) -> None:
        leg = self._legs.get(cid)
        if leg is None or leg.ended:
            return
        cause = cause_of(event) or leg.hangup_cause
        reason = end_reason(cause, answered=leg.answered, local=leg.local_reason, ring_timeout=leg.ring_timeout)
        log.info("asterisk: call %s ended (cause %s %s) -> %s", cid, cause, event.get("cause_txt", ""), reason)
        leg.stats["cause"] = cause
        self._end(leg, reason)

    # ------------------------------------------------------------------ transfer

    def _transfer_event(self, xfer: _Transfer, event: dict[str, Any]) -> None:
        if event["type"] == "StasisStart" and not xfer.answered:
            xfer.answered = True  # the person picked up
            self._tasks.spawn(self._join_transfer(xfer))
        elif event["type"] == "ChannelDestroyed":
            self._transfers.pop(xfer.person_id, None)
            if xfer.answered:
                return  # gone while being joined: the join reports it
            cause = cause_of(event)
            self._transfer_result(xfer, transfer_outcome(cause), f"cause {cause} {event.get('cause_txt', '')}".strip())

    async def _join_transfer(self, xfer: _Transfer) -> None:
        leg = xfer.caller
        if leg.ended or leg.bridge_id is None:  # the caller hung up meanwhile: nobody to hand over
            self._transfers.pop(xfer.person_id, None)
            await self._delete_channel(xfer.person_id)
            return
        try:
            await self._http.request("POST", f"/bridges/{_q(leg.bridge_id)}/addChannel",
                                     json_body={"channel": xfer.person_id})
        except CarrierError as exc:
            log.warning("asterisk: call %s: could not join %s: %s", leg.id, xfer.person_id, exc)
            self._transfers.pop(xfer.person_id, None)
            await self._delete_channel(xfer.person_id)
            self._transfer_result(xfer, TransferOutcome.FAILED, str(exc))
            return
        self._transfers.pop(xfer.person_id, None)
        self._transfer_result(xfer, TransferOutcome.COMPLETED, None)
        self._hand_off(leg, _Joined(leg.bridge_id, {leg.id, xfer.person_id}))

    def _transfer_result(self, xfer: _Transfer, outcome: TransferOutcome, error: str | None) -> None:
        leg = xfer.caller
        if leg.ended:
            return
        log.info("asterisk: call %s: transfer to %s -> %s%s", leg.id, xfer.endpoint, outcome,
                 f" ({error})" if error else "")
        self._emit(leg, EventType.TRANSFER, key=f"transfer:{xfer.number}", outcome=outcome.value, error=error)

    def _hand_off(self, leg: _Leg, joined: _Joined) -> None:
        """The bridge leaves this call: its phone channel stays up in `joined`'s bridge; our media
        channel (and the leg's own bridge, if that is another one) go. No call.ended: the manager
        ends the call `transferred` on the transfer's outcome (an end event before that outcome was
        handled would read as the caller hanging up)."""
        for cid in joined.channels:
            self._joined[cid] = joined
        media_id = leg.media_id
        own_bridge = leg.bridge_id if leg.bridge_id != joined.bridge_id else None
        if media_id is not None:
            self._media_channels.pop(media_id, None)  # its end is ours, not a lost leg
        leg.media_id = leg.bridge_id = None  # so _end tears nothing of the joined call down
        leg.local_reason = CallState.TRANSFERRED
        self._end(leg, CallState.TRANSFERRED, announce=False)
        self._tasks.spawn(self._discard(media_id, own_bridge))

    def _joined_gone(self, cid: str) -> None:
        """One of a joined pair hung up: hang up the other, destroy the bridge."""
        joined = self._joined.pop(cid)
        joined.channels.discard(cid)
        for other in joined.channels:
            self._joined.pop(other, None)
        log.info("asterisk: %s left transferred bridge %s; ending %s", cid, joined.bridge_id, sorted(joined.channels))

        async def finish() -> None:
            for other in joined.channels:
                await self._delete_channel(other)
            await self._discard(None, joined.bridge_id)

        self._tasks.spawn(finish())

    async def _resync(self) -> None:
        """After a reconnect: a channel that vanished while we were not listening has ended; an
        originated one that was answered meanwhile gets its media now. The same for the people of
        transfers (gone: failed; answered: joined) and for joined pairs (one gone: end the other)."""
        for cid in [*self._transfers, *self._joined]:
            try:
                result = await self._http.request("GET", f"/channels/{_q(cid)}", ok_statuses=(404,))
            except CarrierError as exc:
                log.warning("asterisk: cannot check channel %s after reconnect: %s", cid, exc)
                continue
            xfer = self._transfers.get(cid)
            if xfer is not None:
                if result.status == 404:
                    self._transfer_event(xfer, {"type": "ChannelDestroyed", "cause": None,
                                                "cause_txt": "ended while the events socket was down"})
                elif isinstance(result.body, dict) and result.body.get("state") == "Up":
                    self._transfer_event(xfer, {"type": "StasisStart", "channel": result.body})
            elif cid in self._joined and result.status == 404:
                self._joined_gone(cid)
        for leg in [leg for leg in self._legs.live.values() if not leg.ended]:
            try:
                result = await self._http.request("GET", f"/channels/{_q(leg.id)}", ok_statuses=(404,))
            except CarrierError as exc:
                log.warning("asterisk: cannot check call %s after reconnect: %s", leg.id, exc)
                continue
            if leg.ended:
                continue
            if result.status == 404:
                self._ev_ChannelDestroyed(leg.id, {"cause": leg.hangup_cause})
            elif isinstance(result.body, dict) and result.body.get("state") == "Up":
                self._ev_StasisStart(leg.id, {"channel": result.body})

    # ------------------------------------------------------------------ media

    async def _start_media_or_fail(self, leg: _Leg) -> None:
        try:
            await self._start_media(leg)
        except CarrierError as exc:
            log.error("asterisk: call %s: media setup failed: %s", leg.id, exc)

    async def _start_media(self, leg: _Leg) -> None:
        """Bridge the phone channel with an ExternalMedia channel that sends RTP to our port, attach
        that leg to the pipeline, then call.answered / call.active. On failure the call is hung up."""
        if leg.media_started or leg.ended:
            return
        leg.media_started = True
        try:
            await self._build_media(leg)
        except CarrierError:
            if not leg.ended:
                leg.local_reason = CallState.ERROR
                try:
                    await self._delete_channel(leg.id)
                finally:
                    self._end(leg, CallState.ERROR)
            raise
        if leg.ended:  # hung up while we were building: undo what was created after the end
            self._release_transport(leg)
            await self._teardown(leg)
            return
        if leg.transport is None or leg.call_id is None:
            return
        leg.transport.bridge = self.host.attach_media(leg.call_id, leg.transport)
        leg.attached = True
        self._emit(leg, EventType.ANSWERED)
        self._emit(leg, EventType.ACTIVE)

    async def _build_media(self, leg: _Leg) -> None:
        s = self.settings
        try:
            transport = await RtpTransport.open(self.codec, s.rtpBindAddress, s.rtpPortStart, s.rtpPortRange,
                                                self._ports)
        except OSError as exc:
            raise CarrierError(f"asterisk: {exc}") from None
        assert transport.local is not None
        port = transport.local[1]
        self._ports.add(port)
        leg.transport = transport
        if leg.ended:
            return
        leg.bridge_id = f"vc-bridge-{uuid.uuid4().hex}"
        await self._http.request("POST", "/bridges", json_body={"type": "mixing", "bridgeId": leg.bridge_id,
                                                                "name": f"voicecall-{leg.id}"})
        if leg.ended:
            return
        leg.media_id = f"vc-media-{uuid.uuid4().hex}"
        self._media_channels[leg.media_id] = leg.id
        media = await self._http.request("POST", "/channels/externalMedia", json_body={
            "app": s.app, "channelId": leg.media_id, "external_host": f"{_host(s.advertise_address)}:{port}",
            "format": s.format, "encapsulation": "rtp", "transport": "udp", "connection_type": "client",
            "direction": "both",
        })
        peer = rtp_peer(media.body) if isinstance(media.body, dict) else None
        if peer is not None:
            transport.set_peer(*peer)
        else:  # still works once Asterisk's first packet arrives (latching)
            log.warning("asterisk: call %s: externalMedia reply has no UNICASTRTP_LOCAL_ADDRESS/PORT", leg.id)
        if leg.ended:
            return
        await self._http.request("POST", f"/bridges/{_q(leg.bridge_id)}/addChannel",
                                 json_body={"channel": f"{leg.id},{leg.media_id}"})

    def _media_lost(self, media_id: str) -> None:
        pid = self._media_channels.pop(media_id, None)
        leg = self._legs.get(pid)
        if leg is not None and not leg.ended and not self._closing:
            log.warning("asterisk: call %s lost its ExternalMedia channel; hanging up", leg.id)
            leg.local_reason = CallState.ERROR
            self._tasks.spawn(self._delete_channel(leg.id))

    async def _teardown(self, leg: _Leg) -> None:
        if leg.media_id is not None:
            self._media_channels.pop(leg.media_id, None)
        await self._discard(leg.media_id, leg.bridge_id)

    async def _discard(self, media_id: str | None, bridge_id: str | None) -> None:
        if media_id is not None:
            await self._delete_channel(media_id)
        if bridge_id is not None:
            await self._http.request("DELETE", f"/bridges/{_q(bridge_id)}", ok_statuses=(404,))

    # ------------------------------------------------------------------ internals

    async def _delete_channel(self, cid: str, cause: int | None = None) -> bool:
        """Hang a channel up; False when it was already gone (404, success all the same)."""
        query = f"?{urlencode({'reason_code': cause})}" if cause is not None else ""
        result = await self._http.request("DELETE", f"/channels/{_q(cid)}{query}", ok_statuses=(404,))
        return result.status != 404

    def _ring_timeout(self, leg: _Leg) -> None:
        if leg.ended or leg.answered or (leg.direction is Direction.INBOUND and leg.decided):
            return
        leg.ring_timeout = True
        leg.local_reason = CallState.NO_ANSWER if leg.direction is Direction.OUTBOUND else None
        self._tasks.spawn(self._delete_channel(leg.id, CAUSE_NO_ANSWER))

    def _end(self, leg: _Leg, reason: CallState, *, announce: bool = True) -> None:
        if leg.ended:
            return
        leg.ended = True
        cancel_timer(leg)
        for xfer in [t for t in self._transfers.values() if t.caller is leg]:  # nobody left to hand over
            self._transfers.pop(xfer.person_id, None)
            self._tasks.spawn(self._delete_channel(xfer.person_id))
        self._release_transport(leg)
        if leg.attached and leg.call_id is not None:
            self.host.detach_media(leg.call_id)
        stats = self._stats(leg)
        stats["reason"] = str(reason)
        self._legs.record_ended(leg.id, stats)
        self._forget(leg)
        if leg.media_id is not None or leg.bridge_id is not None:
            self._tasks.spawn(self._teardown(leg))
        if announce:
            self._emit(leg, EventType.ENDED, reason=reason)

    def _release_transport(self, leg: _Leg) -> None:
        if leg.transport is not None:
            leg.transport.close()
            if leg.transport.local is not None:
                self._ports.discard(leg.transport.local[1])

    def _track(self, leg: _Leg) -> None:
        self._legs.add(leg.id, leg, leg.call_id)

    def _forget(self, leg: _Leg) -> None:
        self._legs.forget(leg.id, leg.call_id)

    def _emit(self, leg: _Leg, etype: EventType, key: str | None = None, **fields: Any) -> None:
        self.host.emit(leg_event("asterisk", leg.id, leg.call_id, etype, self.host.clock.time(), key, **fields))

    @staticmethod
    def _stats(leg: _Leg) -> dict[str, Any]:
        stats: dict[str, Any] = {"providerCallId": leg.id, "callId": leg.call_id, "direction": str(leg.direction),
                                 **leg.stats}
        if leg.transport is not None:
            c = leg.transport.counters
            stats.update(packetsIn=c.packets_in, packetsOut=c.packets_out, malformed=c.malformed,
                         wrongPayloadType=c.wrong_payload_type, foreign=c.foreign,
                         droppedNoPeer=c.dropped_no_peer, droppedOverflow=c.dropped_overflow,
                         rtpPeer=leg.transport.peer)
        return stats


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def from_settings(settings: Any) -> AsteriskCarrier:
    """Registry factory: the carrier for `provider: asterisk`, configured by the `asterisk` section."""
    return AsteriskCarrier(settings.section(AsteriskSettings))
