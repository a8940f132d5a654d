"""A local fake Asterisk speaking the real ARI wire format on 127.0.0.1.

REST under /ari (Basic auth or api_key, 401 otherwise; 404 for unknown channels and bridges; query
or JSON-body parameters, as Asterisk takes both), and the events WebSocket /ari/events?app=APP with
ARI's event JSON (type, timestamp, application, asterisk_id, channel / bridge objects).

ExternalMedia behaves like chan_rtp's UnicastRTP channel: POST /ari/channels/externalMedia binds a UDP
port, returns it in channelvars (UNICASTRTP_LOCAL_ADDRESS / _PORT) and enters the app. Once that
channel shares a bridge with a "phone" channel, it streams the phone's audio as RTP every 20 ms
(real time) to external_host, from its own port, and records the RTP it receives, decoded, as what
the phone heard.

Stasis applications as Asterisk has them: any name registers while its events WebSocket is open;
one WebSocket per application (a newer one takes it over, the older one gets `ApplicationReplaced`
and no more events); a channel's events go to the application it is in.

Test control (Python): `inbound_call`, `stasis` (the dialplan of README "Scaling": Stasis() on the
first registered application of a rotation), `ring` / `answer` / `busy` / `no_answer` / `reject` for
originated channels (with the `Dial` events Asterisk publishes for them), `press` (DTMF from the
phone), `hangup` (the phone hangs up), `drop_events` / `events_down`. Bridges keep their members
(`addChannel` / `removeChannel`, ChannelEnteredBridge / ChannelLeftBridge); DTMF sent to a channel
is recorded with its `duration` / `between`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
import struct
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Self, cast

from aiohttp import WSMsgType, web

from tests.fakes.http_app import serve_local

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

CAUSE_TEXT = {0: "Unknown", 1: "Unallocated (unassigned) number", 16: "Normal Clearing", 17: "User busy",
              18: "No user responding", 19: "User alerting, no answer", 21: "Call Rejected",
              34: "Circuit/channel congestion"}
# format -> (payload type, sample rate); slin16 travels big-endian, as Asterisk sends it
FORMATS = {"ulaw": (0, 8000), "alaw": (8, 8000), "slin16": (118, 16000)}
SILENCE_8K = b"\x00" * 320


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime())


@dataclass
class RtpRecord:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    marker: bool
    payload: bytes
    source: tuple[str, int]


class FakeRtp(asyncio.DatagramProtocol):
    """The UnicastRTP side of one ExternalMedia channel."""

    def __init__(self, fmt: str, external: tuple[str, int]) -> None:
        self.fmt = fmt
        self.payload_type, self.rate = FORMATS[fmt]
        self.external = external
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.received: list[RtpRecord] = []
        self.heard = bytearray()  # PCM16 LE at self.rate
        self.sent_packets = 0
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        b0, b1, seq, ts, ssrc = struct.unpack_from("!BBHII", data)
        payload = data[12 + 4 * (b0 & 0x0F):]
        self.received.append(RtpRecord(b1 & 0x7F, seq, ts, ssrc, bool(b1 & 0x80), payload, (addr[0], addr[1])))
        if (b1 & 0x7F) == self.payload_type:
            self.heard += self._decode(payload)

    def _decode(self, payload: bytes) -> bytes:
        if self.fmt == "ulaw":
            return audioop.ulaw2lin(payload, 2)
        if self.fmt == "alaw":
            return audioop.alaw2lin(payload, 2)
        return audioop.byteswap(payload, 2)

    def _encode(self, pcm8k: bytes, state: Any) -> tuple[bytes, Any]:
        if self.fmt == "ulaw":
            return audioop.lin2ulaw(pcm8k, 2), state
        if self.fmt == "alaw":
            return audioop.lin2alaw(pcm8k, 2), state
        up, state = audioop.ratecv(pcm8k, 2, 1, 8000, 16000, state)
        return audioop.byteswap(up, 2), state

    def stream(self, audio8k: bytes) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._stream(audio8k))

    async def _stream(self, audio8k: bytes) -> None:
        loop = asyncio.get_running_loop()
        seq, ts, ssrc = random.getrandbits(16), random.getrandbits(32), random.getrandbits(32)
        samples = self.rate // 50
        state = None
        start = loop.time()
        for n in itertools.count():
            chunk = audio8k[n * 320:(n + 1) * 320]
            frame = chunk.ljust(320, b"\x00") if chunk else SILENCE_8K
            payload, state = self._encode(frame, state)
            marker = 0x80 if n == 0 else 0
            header = struct.pack("!BBHII", 0x80, marker | self.payload_type, (seq + n) & 0xFFFF,
                                 (ts + n * samples) & 0xFFFFFFFF, ssrc)
            if self.transport is not None:
                self.transport.sendto(header + payload, self.external)
                self.sent_packets += 1
            delay = start + (n + 1) * 0.02 - loop.time()
            await asyncio.sleep(max(0.0, delay))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.close()


@dataclass
class FakeChannel:
    id: str
    name: str
    state: str
    caller: dict[str, str]
    dialplan: dict[str, Any]
    kind: str = "phone"  # "phone" | "media"
    app: str = ""
    app_args: list[str] = field(default_factory=list)
    in_stasis: bool = False
    alive: bool = True
    channelvars: dict[str, str] | None = None
    audio: bytes = b""  # PCM16 8 kHz: what the phone says
    dtmf_heard: str = ""  # digits sent to the phone through ARI
    dtmf_sent: list[dict[str, Any]] = field(default_factory=list)  # each POST .../dtmf: dtmf, between, duration
    originate: dict[str, Any] | None = None
    hangup_cause: int | None = None
    rtp: FakeRtp | None = None
    bridged_media: FakeRtp | None = None  # the ExternalMedia leg sharing its bridge

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id, "name": self.name, "state": self.state, "protocol_id": "",
            "caller": dict(self.caller), "connected": {"name": "", "number": ""}, "accountcode": "",
            "dialplan": dict(self.dialplan), "creationtime": _stamp(), "language": "en",
        }
        if self.channelvars is not None:
            data["channelvars"] = dict(self.channelvars)
        return data

    @property
    def heard(self) -> bytes:
        """PCM16 the phone heard (at the ExternalMedia format's rate)."""
        return bytes(self.bridged_media.heard) if self.bridged_media else b""


@dataclass
class FakeBridge:
    id: str
    name: str
    channels: list[str] = field(default_factory=list)
    alive: bool = True

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "technology": "simple_bridge", "bridge_type": "mixing", "bridge_class": "stasis",
                "creator": "Stasis", "name": self.name, "channels": list(self.channels), "creationtime": _stamp(),
                "video_mode": "talker"}


class FakeAsterisk:
    def __init__(self, username: str = "voicecall", password: str = "ari-secret-pw", app: str = "voicecall") -> None:
        self._sends: set[asyncio.Future[None]] = set()  # event sends in flight, kept referenced
        self.username = username
        self.password = password
        self.app = app
        self.channels: dict[str, FakeChannel] = {}
        self.bridges: dict[str, FakeBridge] = {}
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.events_sent: list[dict[str, Any]] = []
        self.events_down = False  # refuse new events WebSockets (503)
        self.media_delay_s = 0.0  # a slow POST /channels/externalMedia
        self.unauthorized = 0
        self.fail_next: list[int] = []  # answer the next requests with these HTTP statuses
        self.failed: list[tuple[str, str]] = []
        self.ws_connects = 0
        self._sockets: set[web.WebSocketResponse] = set()
        self._apps: dict[str, web.WebSocketResponse] = {}  # registered application -> its (newest) WebSocket
        self._rotation = itertools.count()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        app = web.Application(middlewares=[self._auth])
        r = app.router
        r.add_get("/ari/asterisk/info", self._info)
        r.add_get("/ari/events", self._events)
        r.add_get("/ari/channels", self._list_channels)
        r.add_post("/ari/channels", self._originate)
        r.add_post("/ari/channels/externalMedia", self._external_media)
        r.add_get("/ari/channels/{id}", self._get_channel)
        r.add_delete("/ari/channels/{id}", self._delete_channel)
        r.add_post("/ari/channels/{id}/answer", self._answer)
        r.add_post("/ari/channels/{id}/dtmf", self._dtmf)
        r.add_get("/ari/bridges", self._list_bridges)
        r.add_post("/ari/bridges", self._create_bridge)
        r.add_post("/ari/bridges/{id}/addChannel", self._add_channel)
        r.add_post("/ari/bridges/{id}/removeChannel", self._remove_channel)
        r.add_delete("/ari/bridges/{id}", self._delete_bridge)
        self._runner, self.port = await serve_local(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel in self.channels.values():
            if channel.rtp is not None:
                channel.rtp.close()
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The bridge's `asterisk` config section pointing here."""
        return {"url": self.url, "username": self.username, "password": self.password, "app": self.app,
                "endpoint": "PJSIP/{to}@trunk", **overrides}

    # ------------------------------------------------------------------ test control

    def registered(self, app: str) -> bool:
        ws = self._apps.get(app)
        return ws is not None and not ws.closed

    def stasis(self, apps: list[str], caller: str = "+15550009999", exten: str = "100",
               audio: bytes = b"") -> FakeChannel | None:
        """A phone calls and the dialplan spreads calls over `apps` (one per bridge node): Stasis() on
        the next application in rotation, and on the following one while STASISSTATUS is FAILED (the
        application has no WebSocket). None: no node is up, the dialplan answers with congestion."""
        start = next(self._rotation)
        for i in range(len(apps)):
            app = apps[(start + i) % len(apps)]
            if self.registered(app):
                return self.inbound_call(caller, exten, audio, app=app)
        return None

    def inbound_call(self, caller: str = "+15550009999", exten: str = "100", audio: bytes = b"",
                     app: str | None = None) -> FakeChannel:
        """A phone calls; the dialplan runs Stasis(app): StasisStart with a channel in state Ring."""
        n = next(self._ids)
        app = app or self.app
        channel = FakeChannel(
            id=f"{int(time.time())}.{n}", name=f"PJSIP/phone-{n:08x}", state="Ring",
            caller={"name": "Phone", "number": caller}, app=app, in_stasis=True, audio=audio,
            dialplan={"context": "from-phones", "exten": exten, "priority": 2, "app_name": "Stasis", "app_data": app},
        )
        self.channels[channel.id] = channel
        self._send("StasisStart", channel, args=[])
        return channel

    def originated(self) -> list[FakeChannel]:
        return [c for c in self.channels.values() if c.originate is not None]

    def ring(self, cid: str) -> None:
        self._set_state(self.channels[cid], "Ringing")
        self._dial(self.channels[cid], "RINGING")

    def answer(self, cid: str, audio: bytes = b"") -> None:
        """The called phone picks up: the channel is Up and enters the Stasis app."""
        channel = self.channels[cid]
        channel.audio = audio
        self._set_state(channel, "Up")
        self._dial(channel, "ANSWER")
        channel.in_stasis = True
        self._send("StasisStart", channel, args=channel.app_args)

    def busy(self, cid: str) -> None:
        self._dial(self.channels[cid], "BUSY")
        self._destroy(self.channels[cid], 17)

    def no_answer(self, cid: str) -> None:
        self._dial(self.channels[cid], "NOANSWER")
        self._destroy(self.channels[cid], 19)

    def reject(self, cid: str) -> None:
        """The called side declines (SIP 603): cause 21."""
        self._dial(self.channels[cid], "CHANUNAVAIL")
        self._destroy(self.channels[cid], 21)

    def bridge_of(self, cid: str) -> FakeBridge | None:
        return next((b for b in self.bridges.values() if cid in b.channels), None)

    def press(self, cid: str, digits: str) -> None:
        for digit in digits:
            self._send("ChannelDtmfReceived", self.channels[cid], digit=digit, duration_ms=120)

    def hangup(self, cid: str, cause: int = 16) -> None:
        """The phone hangs up."""
        channel = self.channels[cid]
        self._send("ChannelHangupRequest", channel, cause=cause)
        self._destroy(channel, cause)

    async def drop_events(self) -> None:
        """Close every events WebSocket, as a restarting Asterisk or a network blip would."""
        for ws in list(self._sockets):
            await ws.close()

    def phone_channels(self) -> list[FakeChannel]:
        return [c for c in self.channels.values() if c.kind == "phone"]

    def calls_to(self, method: str, path_prefix: str) -> list[dict[str, Any]]:
        return [params for m, p, params in self.requests if m == method and p.startswith(path_prefix)]

    # ------------------------------------------------------------------ events

    def _send(self, etype: str, channel: FakeChannel | None = None, *, app: str | None = None,
              **fields: Any) -> None:
        """A channel's events go to its application (or `app`); others (bridges) to every application."""
        apps = [channel.app] if channel is not None else [app] if app else list(self._apps)
        for name in apps:
            event: dict[str, Any] = {"type": etype, "timestamp": _stamp(), "application": name,
                                     "asterisk_id": "02:42:ac:11:00:02", **fields}
            if channel is not None:
                event["channel"] = channel.json()
            self.events_sent.append(event)
            ws = self._apps.get(name)
            if ws is not None:
                self._send_to(ws, event)

    def _send_to(self, ws: web.WebSocketResponse, event: dict[str, Any]) -> None:
        if not ws.closed:
            self._sends.add(task := asyncio.ensure_future(ws.send_str(json.dumps(event))))
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Future[None]) -> None:
        self._sends.discard(task)
        if not task.cancelled():
            task.exception()  # a peer that vanished (kill -9) mid-send: Asterisk drops the event too

    def _dial(self, peer: FakeChannel, status: str) -> None:
        """The Dial event of an originated channel (no caller: ARI originate dials on its own)."""
        if peer.originate is not None:
            self._send("Dial", None, app=peer.app, peer=peer.json(),
                       dialstring=str(peer.originate.get("endpoint", "")), dialstatus=status)

    def _set_state(self, channel: FakeChannel, state: str) -> None:
        channel.state = state
        self._send("ChannelStateChange", channel)

    def _destroy(self, channel: FakeChannel, cause: int) -> None:
        if not channel.alive:
            return
        channel.alive = False
        channel.hangup_cause = cause
        for bridge in self.bridges.values():
            if channel.id in bridge.channels:
                bridge.channels.remove(channel.id)
                self._send("ChannelLeftBridge", channel, bridge=bridge.json())
        if channel.in_stasis:
            self._send("StasisEnd", channel)
        self._send("ChannelDestroyed", channel, cause=cause, cause_txt=CAUSE_TEXT.get(cause, "Unknown"))
        if channel.rtp is not None:
            channel.rtp.close()
        del self.channels[channel.id]

    # ------------------------------------------------------------------ HTTP

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        ok = request.headers.get("Authorization") == f"Basic {expected}" or \
            request.query.get("api_key") == f"{self.username}:{self.password}"
        if not ok:
            self.unauthorized += 1
            return web.json_response({"message": "Authentication required"}, status=401,
                                     headers={"WWW-Authenticate": 'Basic realm="Asterisk REST Interface"'})
        if self.fail_next and request.path != "/ari/events":
            self.failed.append((request.method, request.path))
            return web.json_response({"message": "Internal Server Error"}, status=self.fail_next.pop(0))
        return await handler(request)

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body and request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(body)
        self.requests.append((request.method, request.path, params))
        return params

    def _channel_or_404(self, request: web.Request) -> FakeChannel | web.Response:
        channel = self.channels.get(request.match_info["id"])
        if channel is None:
            return web.json_response({"message": "Channel not found"}, status=404)
        return channel

    async def _info(self, request: web.Request) -> web.Response:
        await self._params(request)
        return web.json_response({"system": {"version": "20.5.0", "entity_id": "02:42:ac:11:00:02"},
                                  "build": {"os": "Linux"}, "status": {"startup_time": _stamp()}})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        app = request.query.get("app", "")
        if not app or "," in app:
            return web.json_response({"message": "Invalid application provided in param [app]."}, status=400)
        if self.events_down:
            return web.Response(status=503, text="Service Unavailable")
        ws = web.WebSocketResponse(protocols=("ari",))
        await ws.prepare(request)
        self.ws_connects += 1
        self._sockets.add(ws)
        previous = self._apps.get(app)
        if previous is not None and not previous.closed:  # Asterisk: "Replacing Stasis app"
            self._send_to(previous, {"type": "ApplicationReplaced", "timestamp": _stamp(), "application": app,
                                     "asterisk_id": "02:42:ac:11:00:02"})
        self._apps[app] = ws
        try:
            async for msg in ws:
                if msg.type is WSMsgType.ERROR:
                    break
        finally:
            self._sockets.discard(ws)
            if self._apps.get(app) is ws:
                del self._apps[app]
        return ws

    async def _list_channels(self, request: web.Request) -> web.Response:
        return web.json_response([c.json() for c in self.channels.values()])

    async def _get_channel(self, request: web.Request) -> web.Response:
        await self._params(request)
        found = self._channel_or_404(request)
        return found if isinstance(found, web.Response) else web.json_response(found.json())

    async def _originate(self, request: web.Request) -> web.Response:
        p = await self._params(request)
        if not p.get("endpoint") or not p.get("app"):
            return web.json_response({"message": "Endpoint and app must be specified"}, status=400)
        cid = str(p.get("channelId") or f"{int(time.time())}.{next(self._ids)}")
        if cid in self.channels:
            return web.json_response({"message": "Channel with given unique ID already exists"}, status=409)
        n = next(self._ids)
        caller = str(p.get("callerId") or "")
        channel = FakeChannel(
            id=cid, name=f"{str(p['endpoint']).split('@')[0]}-{n:08x}", state="Down",
            caller={"name": "", "number": caller}, app=str(p["app"]), originate=p,
            app_args=[a for a in str(p.get("appArgs") or "").split(",") if a],
            dialplan={"context": "default", "exten": "s", "priority": 1, "app_name": "", "app_data": ""},
        )
        self.channels[cid] = channel
        return web.json_response(channel.json())

    async def _external_media(self, request: web.Request) -> web.Response:
        p = await self._params(request)
        host, _, port = str(p.get("external_host") or "").rpartition(":")
        if not p.get("app") or not host or not port.isdigit():
            return web.json_response({"message": "external_host must be host:port"}, status=400)
        fmt = str(p.get("format") or "")
        if fmt not in FORMATS:
            return web.json_response({"message": f"format {fmt!r} not supported"}, status=422)
        if p.get("encapsulation", "rtp") != "rtp" or p.get("transport", "udp") != "udp":
            return web.json_response({"message": "only rtp over udp here"}, status=501)
        if self.media_delay_s:
            await asyncio.sleep(self.media_delay_s)
        loop = asyncio.get_running_loop()
        rtp = FakeRtp(fmt, (host.strip("[]"), int(port)))
        await loop.create_datagram_endpoint(lambda: rtp, local_addr=("127.0.0.1", 0))
        cid = str(p.get("channelId") or f"{int(time.time())}.{next(self._ids)}")
        channel = FakeChannel(
            id=cid, name=f"UnicastRTP/{host}:{port}-0x{next(self._ids):08x}", state="Up", kind="media",
            caller={"name": "", "number": ""}, app=str(p["app"]), in_stasis=True, rtp=rtp,
            channelvars={"UNICASTRTP_LOCAL_ADDRESS": "127.0.0.1", "UNICASTRTP_LOCAL_PORT": str(rtp.port)},
            dialplan={"context": "default", "exten": "s", "priority": 1, "app_name": "", "app_data": ""},
        )
        self.channels[cid] = channel
        self._send("StasisStart", channel, args=[])
        return web.json_response(channel.json())

    async def _delete_channel(self, request: web.Request) -> web.Response:
        p = await self._params(request)
        found = self._channel_or_404(request)
        if isinstance(found, web.Response):
            return found
        code = int(p.get("reason_code") or 16)
        self._destroy(found, code)
        return web.Response(status=204)

    async def _answer(self, request: web.Request) -> web.Response:
        await self._params(request)
        found = self._channel_or_404(request)
        if isinstance(found, web.Response):
            return found
        if found.state != "Up":
            self._set_state(found, "Up")
        return web.Response(status=204)

    async def _dtmf(self, request: web.Request) -> web.Response:
        p = await self._params(request)
        found = self._channel_or_404(request)
        if isinstance(found, web.Response):
            return found
        if not p.get("dtmf"):
            return web.json_response({"message": "DTMF is required"}, status=400)
        found.dtmf_heard += str(p["dtmf"])
        found.dtmf_sent.append({k: p[k] for k in ("dtmf", "before", "between", "duration", "after") if k in p})
        return web.Response(status=204)

    async def _list_bridges(self, request: web.Request) -> web.Response:
        await self._params(request)
        return web.json_response([b.json() for b in self.bridges.values() if b.alive])

    async def _create_bridge(self, request: web.Request) -> web.Response:
        p = await self._params(request)
        bid = str(p.get("bridgeId") or f"bridge-{next(self._ids)}")
        if "mixing" not in str(p.get("type") or "mixing"):
            return web.json_response({"message": "only mixing bridges here"}, status=400)
        bridge = self.bridges[bid] = FakeBridge(bid, str(p.get("name") or ""))
        return web.json_response(bridge.json())

    async def _bridge_and_channels(self, request: web.Request) -> tuple[FakeBridge, list[str]] | web.Response:
        """The live bridge in the path and the known channel ids in `channel`, or ARI's error response."""
        p = await self._params(request)
        bridge = self.bridges.get(request.match_info["id"])
        if bridge is None or not bridge.alive:
            return web.json_response({"message": "Bridge not found"}, status=404)
        ids = [i for i in str(p.get("channel") or "").split(",") if i]
        if not ids or any(i not in self.channels for i in ids):
            return web.json_response({"message": "Channel not found"}, status=400)
        return bridge, ids

    async def _add_channel(self, request: web.Request) -> web.Response:
        found = await self._bridge_and_channels(request)
        if isinstance(found, web.Response):
            return found
        bridge, ids = found
        for cid in ids:
            previous = self.bridge_of(cid)
            if previous is not None and previous is not bridge:  # Stasis departs the old bridge first
                previous.channels.remove(cid)
                self._send("ChannelLeftBridge", self.channels[cid], bridge=previous.json())
            bridge.channels.append(cid)
            self._send("ChannelEnteredBridge", self.channels[cid], bridge=bridge.json())
        self._connect_media(bridge)
        return web.Response(status=204)

    async def _remove_channel(self, request: web.Request) -> web.Response:
        found = await self._bridge_and_channels(request)
        if isinstance(found, web.Response):
            return found
        bridge, ids = found
        if any(i not in bridge.channels for i in ids):
            return web.json_response({"message": "Channel not in this bridge"}, status=422)
        for cid in ids:
            bridge.channels.remove(cid)
            self._send("ChannelLeftBridge", self.channels[cid], bridge=bridge.json())
        return web.Response(status=204)

    async def _delete_bridge(self, request: web.Request) -> web.Response:
        await self._params(request)
        bridge = self.bridges.pop(request.match_info["id"], None)
        if bridge is None:
            return web.json_response({"message": "Bridge not found"}, status=404)
        bridge.alive = False
        self._send("BridgeDestroyed", None, bridge=bridge.json())
        return web.Response(status=204)

    def _connect_media(self, bridge: FakeBridge) -> None:
        members = [self.channels[c] for c in bridge.channels if c in self.channels]
        phones = [c for c in members if c.kind == "phone"]
        media = [c for c in members if c.kind == "media" and c.rtp is not None]
        if phones and media:
            phone, rtp = phones[0], media[0].rtp
            assert rtp is not None
            phone.bridged_media = rtp
            rtp.stream(phone.audio)
