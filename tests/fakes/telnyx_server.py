"""A local fake of Telnyx Call Control v2 and of the people on its calls, speaking the real wire protocol.

- REST (`/v2`, Bearer auth, JSON): `POST /calls` (dial), `POST /calls/{id}/actions/{command}`
  (answer, reject, hangup, speak, transcription_start/stop, send_dtmf, streaming_start/stop) with
  `command_id` dedupe and 422 code 90018 for a call that already ended, `GET /calls/{id}`.
- Webhooks: JSON `{"data": {...}, "meta": {...}}` signed with Ed25519 over `"{timestamp}|{body}"`
  (headers `telnyx-signature-ed25519`, `telnyx-timestamp`), posted in order per call; a redelivery
  keeps `data.id` and bumps `meta.attempt`, like Telnyx's retries.
- Media streaming: the fake opens the WebSocket to `stream_url` (auth token as header and in
  `connected`), sends `start` with the media format, then caller audio as 20 ms `media` frames in
  real time (optionally out of order), `dtmf` and `stop`; it plays what it receives in the declared
  bidirectional codec, echoes marks once the audio before them has played, and honours `clear`.

The caller's voice defaults to deterministic tones (`tests.fakes.audio.fake_speech`); its words
reach the bridge as audio on the stream and, when transcription is on, as `call.transcription`.
Numbers dialled ending in 0002 are busy, 0003 never answer, 0005 reach an answering machine.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.fakes.audio import fake_speech
from tests.fakes.http_app import serve_local

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

FRAME_S = 0.02
FRAME_BYTES = 160

ENDED_ERROR = {"errors": [{"code": "90018", "title": "Call has already ended",
                           "detail": "This call is no longer active and can't receive commands."}]}


def g711_encode(pcm: bytes, codec: str) -> bytes:
    return audioop.lin2alaw(pcm, 2) if codec == "PCMA" else audioop.lin2ulaw(pcm, 2)


def g711_decode(payload: bytes, codec: str) -> bytes:
    return audioop.alaw2lin(payload, 2) if codec == "PCMA" else audioop.ulaw2lin(payload, 2)


def frame_rms(pcm: bytes) -> np.ndarray:
    """RMS of each 20 ms frame of PCM16 8 kHz."""
    x = np.frombuffer(bytes(pcm[: len(pcm) // 320 * 320]), dtype="<i2").astype(np.float64).reshape(-1, 160)
    return np.sqrt((x * x).mean(axis=1)) if len(x) else np.zeros(0)


class FakeMediaStream:
    """The Telnyx side of one media-stream WebSocket: the caller's voice out, the bridge's audio in."""

    def __init__(self, call: FakeCall, url: str, token: str | None, codec: str, back_codec: str) -> None:
        self.call = call
        self.url = url
        self.token = token
        self.codec = codec  # media_format.encoding of what we send
        self.back_codec = back_codec  # how Telnyx decodes what the bridge sends (stream_bidirectional_codec)
        self.stream_id = str(uuid.uuid4()).upper()
        self.heard = bytearray()  # PCM16 8 kHz the caller actually heard (cleared audio excluded)
        self.frames_received = 0  # media messages (20 or 40 ms each, as the bridge sends them)
        self.ms_received = 0.0  # the audio in them
        self.sizes_received: list[int] = []  # payload bytes of each media message
        self.marks_echoed: list[str] = []
        self.clears = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()
        self.sent_chunks: list[int] = []  # chunk numbers in the order they were sent
        self._seq = itertools.count(1)
        self._chunk = itertools.count(1)
        self._t0 = 0.0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._playout_end = 0.0
        self._queued: list[tuple[float, bytes]] = []
        self._pending_marks: list[tuple[str, asyncio.TimerHandle]] = []

    async def connect(self) -> None:
        headers = {"x-telnyx-streaming-auth-token": self.token} if self.token else {}
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.url, headers=headers, autoping=True)
        self._t0 = self._loop.time()
        connected: dict[str, Any] = {"event": "connected", "version": "1.0.0"}
        if self.token:
            connected["x-telnyx-streaming-auth-token"] = self.token
        await self.send(connected)
        call = self.call
        await self.send({
            "event": "start", "sequence_number": str(next(self._seq)), "stream_id": self.stream_id,
            "start": {
                "user_id": "3E6F995F-85F7-4705-9741-53B116D28237", "call_control_id": call.ccid,
                "call_session_id": call.session_id, "from": call.from_, "to": call.to, "tags": [],
                "client_state": call.client_state, "custom_parameters": {},
                "media_format": {"encoding": self.codec, "sample_rate": 8000, "channels": 1},
            },
        })
        self._reader = asyncio.ensure_future(self._read())

    async def send(self, message: dict[str, Any]) -> None:
        if self._ws is not None and not self._ws.closed:
            try:
                await self._ws.send_str(json.dumps(message))
            except ConnectionError:
                pass

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            event = data.get("event")
            if event == "media":
                self._media(base64.b64decode(data["media"]["payload"]))
            elif event == "mark":
                name = data["mark"]["name"]
                handle = self._loop.call_later(max(0.0, self._playout_end - self._loop.time()), self._echo, name)
                self._pending_marks.append((name, handle))
            elif event == "clear":
                self._clear()
        self.close_code = self._ws.close_code
        self.close_reason = str(self._ws.exception() or "")
        self.closed.set()

    def _media(self, payload: bytes) -> None:
        pcm = g711_decode(payload, self.back_codec)
        now = self._loop.time()
        start = max(now, self._playout_end)
        self._playout_end = start + len(pcm) / 2 / 8000
        self._queued.append((start, pcm))
        self.frames_received += 1
        self.ms_received += len(pcm) / 2 / 8
        self.sizes_received.append(len(payload))

    def _played(self, now: float) -> None:
        while self._queued and self._queued[0][0] <= now + 1e-6:
            self.heard += self._queued.pop(0)[1]

    def _echo(self, name: str) -> None:
        self._pending_marks = [(n, h) for n, h in self._pending_marks if n != name]
        self._played(self._loop.time())
        self.marks_echoed.append(name)
        self.call.fake._spawn(self.send({"event": "mark", "sequence_number": str(next(self._seq)),
                                         "stream_id": self.stream_id, "mark": {"name": name}}))

    def _clear(self) -> None:
        self.clears += 1
        now = self._loop.time()
        self._played(now)
        self._queued.clear()
        self._playout_end = now
        for name, handle in self._pending_marks:  # clear returns the queued marks
            handle.cancel()
            self._loop.call_soon(self._echo, name)
        self._pending_marks.clear()

    def heard_now(self) -> bytes:
        self._played(self._loop.time())
        return bytes(self.heard)

    async def play(self, pcm: bytes, *, swap: Iterable[int] = ()) -> None:
        """Send PCM16 8 kHz as the caller's voice, 20 ms frames in real time; frame i in `swap`
        goes out after frame i+1 (Telnyx does not guarantee order)."""
        frames = [pcm[i:i + 320].ljust(320, b"\x00") for i in range(0, len(pcm), 320)]
        numbered = [(next(self._chunk), g711_encode(f, self.codec)) for f in frames]
        for i in sorted(set(swap)):
            if i + 1 < len(numbered):
                numbered[i], numbered[i + 1] = numbered[i + 1], numbered[i]
        start = self._loop.time()
        for index, (chunk, payload) in enumerate(numbered):
            if self._ws is None or self._ws.closed:
                return
            self.sent_chunks.append(chunk)
            await self.send({
                "event": "media", "sequence_number": str(next(self._seq)), "stream_id": self.stream_id,
                "media": {"track": "inbound", "chunk": str(chunk),
                          "timestamp": str(round((chunk - 1) * FRAME_S * 1000)),
                          "payload": base64.b64encode(payload).decode("ascii")},
            })
            delay = start + (index + 1) * FRAME_S - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def dtmf(self, digit: str) -> None:
        await self.send({"event": "dtmf", "sequence_number": str(next(self._seq)), "stream_id": self.stream_id,
                         "dtmf": {"digit": digit}})

    async def stop(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self.send({"event": "stop", "sequence_number": str(next(self._seq)), "stream_id": self.stream_id,
                             "stop": {"user_id": "3E6F995F", "call_control_id": self.call.ccid}})
            await self._ws.close()
        await self.close()

    async def close(self) -> None:
        for _, handle in self._pending_marks:
            handle.cancel()
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self.closed.set()


@dataclass(eq=False)
class FakeCall:
    fake: FakeTelnyx
    direction: str  # "incoming" | "outgoing"
    from_: str
    to: str
    webhook_url: str
    client_state: str | None = None
    offered_codecs: str = "PCMU,PCMA"
    codec: str = "PCMU"  # what the phone leg negotiated
    ccid: str = field(default_factory=lambda: "v3:" + uuid.uuid4().hex)
    leg_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    state: str = "parked"  # parked | answered | ended
    dial: dict[str, Any] = field(default_factory=dict)
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    received: list[str] = field(default_factory=list)  # every command asked for, even refused ones
    command_ids: set[str] = field(default_factory=set)
    stream: FakeMediaStream | None = None
    transcribing: bool = False
    spoken: list[dict[str, Any]] = field(default_factory=list)
    dtmf_sent: list[str] = field(default_factory=list)
    hangup_cause: str | None = None
    webhooks: list[tuple[str, int]] = field(default_factory=list)  # (event_type, HTTP status)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _outbox: asyncio.Queue[tuple[str, dict[str, Any]] | None] = field(default_factory=asyncio.Queue)
    _sender: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.state != "ended"

    def command_names(self) -> list[str]:
        return [name for name, _ in self.commands]

    # ---------------------------------------------------------------- webhooks
    def post(self, event_type: str, **extra: Any) -> None:
        """Queue a webhook; webhooks of one call go out in order."""
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send_loop())
        self._outbox.put_nowait((event_type, extra))

    async def _send_loop(self) -> None:
        while True:
            item = await self._outbox.get()
            if item is None:
                return
            await self.deliver(*item)

    def data(self, event_type: str, **extra: Any) -> dict[str, Any]:
        payload = {"call_control_id": self.ccid, "call_leg_id": self.leg_id, "call_session_id": self.session_id,
                   "connection_id": self.fake.connection_id, "client_state": self.client_state,
                   "from": self.from_, "to": self.to, **extra}
        return {"record_type": "event", "event_type": event_type, "id": str(uuid.uuid4()),
                "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()), "payload": payload}

    async def deliver(self, event_type: str, extra: dict[str, Any] | None = None, *,
                      data: dict[str, Any] | None = None) -> int:
        """Send one webhook now (built from the call, or `data` as given); redelivered per `fake.redeliver`."""
        data = data or self.data(event_type, **(extra or {}))
        status = 0
        for attempt in range(1, 2 + self.fake.redeliver):
            status = await self.fake.send_webhook(self.webhook_url, data, attempt=attempt)
            self.webhooks.append((data["event_type"], status))
        return status

    async def flush(self) -> None:
        while not self._outbox.empty():
            await asyncio.sleep(0.01)

    # ---------------------------------------------------------------- the person on the line
    async def say(self, text: str, *, pcm: bytes | None = None, swap: Iterable[int] = ()) -> None:
        """Speak into the call: audio on the stream, then Telnyx's transcript if transcription is on."""
        if self.stream is not None:
            if pcm is None:  # a breath of line silence around the words, as a phone line carries
                pause = bytes(int(0.2 * 8000) * 2)
                pcm = pause + fake_speech(text, 8000) + pause
            await self.stream.play(pcm, swap=swap)
        if self.transcribing and self.alive:
            self.post("call.transcription", transcription_data={
                "transcript": text, "is_final": True, "confidence": 0.93, "transcription_track": "inbound"})

    async def press(self, digit: str) -> None:
        """A key press: Telnyx reports it on the stream and as a webhook."""
        if self.stream is not None:
            await self.stream.dtmf(digit)
        self.post("call.dtmf.received", digit=digit)

    async def hang_up(self) -> None:
        """The person hangs up."""
        if not self.alive:
            return
        source = "caller" if self.direction == "incoming" else "callee"
        await self.fake.end(self, "normal_clearing", source)


class FakeTelnyx:
    def __init__(self, *, api_key: str = "KEY-test-telnyx", connection_id: str = "1494404757140276705",
                 ring_s: float = 0.05, answer_s: float = 0.1, no_answer_s: float = 0.3,
                 speak_s_per_char: float = 0.005, honor_stream_codec: bool = True) -> None:
        self.api_key = api_key
        self.connection_id = connection_id
        self.ring_s = ring_s
        self.answer_s = answer_s
        self.no_answer_s = no_answer_s
        self.speak_s_per_char = speak_s_per_char
        self.honor_stream_codec = honor_stream_codec  # False: stream the call's own codec (no transcoding)
        self.call_codec = "PCMU"  # codec negotiated on outbound phone legs
        self.redeliver = 0  # extra deliveries of every webhook (Telnyx retries: same data.id, attempt+1)
        self.connection_webhook_url = ""  # where inbound call.initiated goes (the app's webhook URL)
        # answering-machine webhooks (event_type, result) per dialled number, instead of the defaults
        self.amd_script: dict[str, list[tuple[str, str]]] = {}
        self.amd_s = 0.2  # between the answer and each AMD webhook
        self._key = Ed25519PrivateKey.generate()
        self.calls: dict[str, FakeCall] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.transfers: list[tuple[str, str, str]] = []  # actions/transfer: (caller ccid, leg B ccid, to)
        self.bridges: list[tuple[str, str]] = []  # legs bridged (by a transfer or actions/bridge)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def public_key(self) -> str:
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2"

    def config(self) -> dict[str, Any]:
        """The bridge's `telnyx` config section for this fake."""
        return {"apiKey": self.api_key, "connectionId": self.connection_id, "publicKey": self.public_key,
                "apiBaseUrl": self.base_url}

    async def start(self) -> FakeTelnyx:
        app = web.Application()
        app.router.add_post("/v2/calls", self._dial)
        app.router.add_post("/v2/calls/{ccid}/actions/{command}", self._action)
        app.router.add_get("/v2/calls/{ccid}", self._status)
        self._runner, self.port = await serve_local(app)
        self._client = aiohttp.ClientSession()
        return self

    async def __aenter__(self) -> FakeTelnyx:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def close_streams(self) -> None:
        """Drop every media-stream socket (as when the network goes away)."""
        for call in self.calls.values():
            if call.stream is not None:
                await call.stream.close()

    async def stop(self) -> None:
        await self.close_streams()
        for call in self.calls.values():
            call._outbox.put_nowait(None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *(c._sender for c in self.calls.values() if c._sender),
                             return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- signing and delivery
    def sign(self, body: bytes, timestamp: str) -> str:
        return base64.b64encode(self._key.sign(timestamp.encode() + b"|" + body)).decode("ascii")

    async def send_webhook(self, url: str, data: dict[str, Any], *, attempt: int = 1,
                           timestamp: str | None = None) -> int:
        body = json.dumps({"data": data, "meta": {"attempt": attempt, "delivered_to": url}}).encode()
        ts = timestamp or str(int(time.time()))
        headers = {"Content-Type": "application/json", "telnyx-timestamp": ts,
                   "telnyx-signature-ed25519": self.sign(body, ts), "User-Agent": "telnyx-webhooks"}
        assert self._client is not None
        try:
            async with self._client.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientError:
            return 0

    # ---------------------------------------------------------------- the network side of calls
    def inbound_call(self, from_: str, to: str, *, offered_codecs: str = "PCMU,PCMA") -> FakeCall:
        """A call arrives for the app: `call.initiated` (direction incoming) to the connection's webhook URL."""
        codec = next((c.strip() for c in offered_codecs.split(",") if c.strip() in ("PCMU", "PCMA")), "PCMU")
        call = FakeCall(self, "incoming", from_, to, self.connection_webhook_url,
                        offered_codecs=offered_codecs, codec=codec)
        self.calls[call.ccid] = call
        call.post("call.initiated", direction="incoming", state="parked", offered_codecs=offered_codecs,
                  connection_codecs="PCMU,PCMA,G722", caller_id_name=from_)
        return call

    async def _progress_outbound(self, call: FakeCall) -> None:
        call.post("call.initiated", direction="outgoing", state="bridging")
        await asyncio.sleep(self.ring_s)
        if call.to.endswith("0002"):
            await self.end(call, "user_busy", "callee")
            return
        if call.to.endswith("0003"):
            await asyncio.sleep(self.no_answer_s)
            await self.end(call, "timeout", "unknown")
            return
        await asyncio.sleep(self.answer_s)
        if call.alive:
            await self._answered(call, call.dial)
            mode = call.dial.get("answering_machine_detection")
            if mode not in (None, "disabled"):
                for event_type, result in self.amd_script.get(call.to) or self._amd_default(mode, call.to):
                    await asyncio.sleep(self.amd_s)
                    if call.alive:
                        call.post(event_type, result=result)

    @staticmethod
    def _amd_default(mode: str, to: str) -> list[tuple[str, str]]:
        """Numbers ending 0005 are machines (with a beep), others people, reported as `mode` does."""
        machine = to.endswith("0005")
        if mode == "premium":
            return ([("call.machine.premium.detection.ended", "machine"),
                     ("call.machine.premium.greeting.ended", "beep_detected")] if machine
                    else [("call.machine.premium.detection.ended", "human_residence")])
        events = [("call.machine.detection.ended", "machine" if machine else "human")]
        if machine and mode in ("detect_beep", "detect_words", "greeting_end"):
            events.append(("call.machine.greeting.ended", "beep_detected"))
        return events

    async def _answered(self, call: FakeCall, params: dict[str, Any]) -> None:
        call.state = "answered"
        call.answered.set()
        call.post("call.answered", state="answered")
        if params.get("transcription"):
            call.transcribing = True
        if params.get("stream_url"):
            await self._start_stream(call, params)

    async def _start_stream(self, call: FakeCall, params: dict[str, Any]) -> None:
        requested = params.get("stream_codec")
        codec = requested if self.honor_stream_codec and requested in ("PCMU", "PCMA") else call.codec
        back = params.get("stream_bidirectional_codec") or "PCMU"
        stream = FakeMediaStream(call, params["stream_url"], params.get("stream_auth_token"), codec, back)
        call.stream = stream
        call.post("streaming.started", stream_url=params["stream_url"])
        await stream.connect()

    async def end(self, call: FakeCall, cause: str, source: str) -> None:
        if not call.alive:
            return
        call.state = "ended"
        call.hangup_cause = cause
        call.transcribing = False
        if call.stream is not None:
            await call.stream.stop()
            call.post("streaming.stopped")
        call.post("call.hangup", hangup_cause=cause, hangup_source=source, sip_hangup_cause="200")
        call.ended.set()

    # ---------------------------------------------------------------- REST
    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _error(status: int, code: str, title: str, detail: str = "") -> web.Response:
        return web.json_response({"errors": [{"code": code, "title": title, "detail": detail or title}]}, status=status)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(text="JSON bodies only")
        body = await request.json() if request.can_read_body else {}
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be an object")
        self.requests.append((request.method, request.path, body))
        return body

    async def _dial(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "10009", "Authentication failed")
        body = await self._body(request)
        for key in ("connection_id", "to", "from"):
            if not body.get(key):
                return self._error(422, "10015", "Invalid parameter", f"{key} is required")
        if body["connection_id"] != self.connection_id:
            return self._error(422, "10015", "Invalid parameter", "connection_id is invalid")
        try:
            base64.b64decode(body.get("client_state", ""), validate=True)
        except ValueError:
            return self._error(422, "90053", "Invalid client_state", "client_state must be base64")
        if body.get("stream_url") and body.get("stream_bidirectional_mode") not in (None, "rtp", "mp3"):
            return self._error(422, "10015", "Invalid parameter", "stream_bidirectional_mode")
        linked = body.get("link_to")
        if linked is not None and linked not in self.calls:
            return self._error(422, "10015", "Invalid parameter", "link_to is not a known call")
        existing = next((c for c in self.calls.values() if body.get("command_id") and c.dial.get("command_id")
                         == body["command_id"]), None)
        call = existing or FakeCall(self, "outgoing", body["from"], body["to"], body.get("webhook_url")
                                    or self.connection_webhook_url, client_state=body.get("client_state"),
                                    codec=self.call_codec, dial=body)
        if existing is None:
            self.calls[call.ccid] = call
            self._spawn(self._progress_outbound(call))
        return web.json_response({"data": {"call_control_id": call.ccid, "call_leg_id": call.leg_id,
                                           "call_session_id": call.session_id, "is_alive": False,
                                           "record_type": "call"}})

    async def _status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "10009", "Authentication failed")
        call = self.calls.get(request.match_info["ccid"])
        if call is None:
            return self._error(404, "10005", "Resource not found")
        return web.json_response({"data": {"call_control_id": call.ccid, "call_leg_id": call.leg_id,
                                           "call_session_id": call.session_id, "is_alive": call.alive,
                                           "record_type": "call"}})

    async def _action(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "10009", "Authentication failed")
        call = self.calls.get(request.match_info["ccid"])
        if call is None:
            return self._error(404, "10005", "Resource not found")
        command = request.match_info["command"]
        body = await self._body(request)
        call.received.append(command)
        command_id = body.get("command_id")
        if command_id and command_id in call.command_ids:
            return web.json_response({"data": {"result": "ok"}})  # duplicate command: ignored
        if not call.alive:
            return web.json_response(ENDED_ERROR, status=422)
        if command_id:
            call.command_ids.add(command_id)
        call.commands.append((command, body))
        if body.get("client_state"):
            call.client_state = body["client_state"]
        if body.get("webhook_url"):
            call.webhook_url = body["webhook_url"]
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            return self._error(422, "10015", "Invalid parameter", f"unknown command {command}")
        error = await handler(call, body)
        return error or web.json_response({"data": {"result": "ok"}})

    async def _cmd_answer(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        if call.direction != "incoming" or call.state != "parked":
            return self._error(422, "90034", "Call already answered")
        self._spawn(self._answered(call, body))
        return None

    async def _cmd_reject(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        if call.direction != "incoming" or call.state != "parked":
            return self._error(422, "90034", "Call can no longer be rejected")
        if body.get("cause") not in ("CALL_REJECTED", "USER_BUSY"):
            return self._error(422, "10015", "Invalid parameter", "cause")
        self._spawn(self.end(call, "call_rejected", "callee"))
        return None

    async def _cmd_hangup(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        self._spawn(self.end(call, "normal_clearing", "caller" if call.direction == "outgoing" else "callee"))
        return None

    async def _cmd_speak(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        if not body.get("payload") or not body.get("voice"):
            return self._error(422, "10015", "Invalid parameter", "payload and voice are required")
        if len(body["payload"]) > 3000:
            return self._error(422, "10015", "Invalid parameter", "payload too long")
        call.spoken.append(body)
        state = body.get("client_state")

        async def speak() -> None:
            call.post("call.speak.started", client_state=state)
            await asyncio.sleep(len(body["payload"]) * self.speak_s_per_char)
            call.post("call.speak.ended", client_state=state, status="completed" if call.alive else "call_hangup")

        self._spawn(speak())
        return None

    async def _cmd_transcription_start(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        call.transcribing = True
        return None

    async def _cmd_transcription_stop(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        call.transcribing = False
        return None

    async def _cmd_send_dtmf(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        call.dtmf_sent.append(str(body.get("digits", "")))
        return None

    async def _cmd_streaming_start(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        self._spawn(self._start_stream(call, body))
        return None

    async def _cmd_transfer(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        """Dial `to` as leg B (its webhooks carry `target_leg_client_state`) and bridge it on answer;
        a leg B that fails hangs up and leaves the caller's call as it was."""
        if not body.get("to"):
            return self._error(422, "10015", "Invalid parameter", "to is required")
        if call.state != "answered":
            return self._error(422, "90018", "Call is not answered")
        leg = FakeCall(self, "outgoing", body.get("from") or call.to, body["to"],
                       body.get("webhook_url") or call.webhook_url, client_state=body.get("target_leg_client_state"),
                       codec=self.call_codec, dial={"transfer_of": call.ccid, **body})
        self.calls[leg.ccid] = leg
        self.transfers.append((call.ccid, leg.ccid, body["to"]))
        self._spawn(self._progress_transfer(call, leg))
        return None

    async def _progress_transfer(self, a: FakeCall, b: FakeCall) -> None:
        b.post("call.initiated", direction="outgoing", state="bridging")
        await asyncio.sleep(self.ring_s)
        if b.to.endswith("0002"):
            await self.end(b, "user_busy", "callee")
            return
        if b.to.endswith("0003"):
            await asyncio.sleep(self.no_answer_s)
            await self.end(b, "timeout", "unknown")
            return
        await asyncio.sleep(self.answer_s)
        b.state = "answered"
        b.answered.set()
        b.post("call.answered", state="answered")
        self._bridge(a, b)

    def _bridge(self, a: FakeCall, b: FakeCall) -> None:
        self.bridges.append((a.ccid, b.ccid))
        a.post("call.bridged", state="bridged")
        b.post("call.bridged", state="bridged")

    async def _cmd_bridge(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        other = self.calls.get(str(body.get("call_control_id") or ""))
        if other is None or not other.alive:
            return self._error(422, "10015", "Invalid parameter", "call_control_id is not a live call")
        if call.state != "answered" or other.state != "answered":
            return self._error(422, "90018", "Both calls must be answered")
        self._bridge(call, other)
        return None

    async def _cmd_streaming_stop(self, call: FakeCall, body: dict[str, Any]) -> web.Response | None:
        if call.stream is not None:
            self._spawn(call.stream.stop())
        return None
