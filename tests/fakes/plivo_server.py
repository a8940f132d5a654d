"""A local fake of Plivo: the Voice REST API, the XML interpreter, signed callbacks, and the caller's
side of a bidirectional Audio Stream.

REST (`/v1/Account/{auth_id}/...`, trailing slash required, HTTP Basic, JSON bodies):
    POST   Call/                  create an outbound call -> 201 {"message": "call fired", "request_uuid"}
    POST   Call/{uuid}/           transfer the A leg to `aleg_url` (the XML there replaces what runs)
    DELETE Call/{uuid}/           hang up a live call (204; 404 when it is not live)
    DELETE Request/{uuid}/        cancel a call not answered yet (204; 404 otherwise)
    POST   Call/{uuid}/DTMF/      send digits
    GET    Call/{uuid}/?status=live|queued

Calls ring (`ring_url`), are answered (`answer_url`, Event=StartApp) or end busy / failed / on ring
timeout, by the destination number. Every callback is a form POST signed like Plivo does it:
`X-Plivo-Signature-V3` (+nonce, computed with the official plivo SDK) and `X-Plivo-Signature-V2`.
The XML interpreter runs Speak (timed per word), Wait, Hangup, Redirect, GetInput (speech; the
caller's scripted answers) and Stream (opens the WebSocket, plays the caller's audio as 20 ms
u-law frames in real time, records what it hears, answers checkpoint/clearAudio).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import secrets
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree as ET

import aiohttp
from aiohttp import web
from plivo.utils.signature_v3 import construct_post_url, get_signature_v3

from media import g711
from media.formats import AudioEncoding
from media.resample import StreamResampler
from tests.fakes.http_app import serve_local

FRAME_BYTES = 160  # 20 ms of u-law at 8 kHz
FRAME_S = 0.02
SILENCE = b"\xff" * FRAME_BYTES


def sign_v3(auth_token: str, url: str, params: dict[str, str], nonce: str) -> str:
    base = construct_post_url(url, dict(params)).decode("utf-8")
    return get_signature_v3(auth_token, base, nonce).decode("ascii")


def sign_v2(auth_token: str, url: str, nonce: str) -> str:
    base = url.split("?", 1)[0]
    mac = hmac.new(auth_token.encode(), (base + nonce).encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode("ascii")


@dataclass
class RestRequest:
    method: str
    path: str
    body: dict[str, Any]
    status: int


@dataclass
class Callback:
    url: str
    params: dict[str, str]
    status: int
    body: str


class FakeStream:
    """The carrier's end of one Audio Stream WebSocket: sends the caller, plays what the bridge sends."""

    def __init__(self, call: FakeCall, url: str, extra_headers: str | None) -> None:
        self.call = call
        self.url = url
        self.extra_headers = extra_headers or ""
        self.stream_id = str(uuid.uuid4())
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.events: list[dict[str, Any]] = []  # every frame the bridge sent
        self.heard = bytearray()  # u-law the caller actually heard (played, not cleared)
        self.play_audio_frames = 0
        self.opened_at: float | None = None  # loop time the stream started (the caller's audio starts then)
        self.first_play_at: float | None = None  # loop time of the bridge's first playAudio
        self.checkpoints: list[str] = []
        self.played: list[str] = []  # checkpoints echoed as playedStream
        self.clears = 0
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._outbox: deque[bytes] = deque()  # caller audio frames still to send
        self._queue: deque[bytes | str] = deque()  # bridge audio frames (bytes) and checkpoints (str) to play
        self._seq = itertools.count(1)
        self._chunk = itertools.count(1)
        self._tasks: list[asyncio.Task[Any]] = []
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession()
        self.ws = await self._session.ws_connect(self.url)
        self.opened_at = asyncio.get_running_loop().time()
        await self.send({"event": "start", "sequenceNumber": next(self._seq),
                         "start": {"callId": self.call.uuid, "streamId": self.stream_id,
                                   "accountId": self.call.fake.auth_id, "tracks": ["inbound"],
                                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}},
                         "extra_headers": self.extra_headers})
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._send_audio()), loop.create_task(self._play()),
                       loop.create_task(self._receive())]

    async def send(self, frame: dict[str, Any]) -> None:
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(ConnectionError):
                await self.ws.send_str(json.dumps(frame))

    async def send_raw(self, text: str) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.send_str(text)

    # -------------------------------------------------------------- caller -> bridge
    def say_ulaw(self, ulaw: bytes) -> None:
        for i in range(0, len(ulaw), FRAME_BYTES):
            self._outbox.append(ulaw[i:i + FRAME_BYTES].ljust(FRAME_BYTES, b"\xff"))

    async def say(self, text: str) -> None:
        """Speak `text` (espeak-ng) into the call and return once the last frame was sent."""
        audio = await synthesize_ulaw(text)
        self.say_ulaw(audio)
        deadline = asyncio.get_running_loop().time() + len(audio) / 8000 + 5
        while self._outbox and not self.closed.is_set():
            if asyncio.get_running_loop().time() > deadline or all(t.done() for t in self._tasks[:1]):
                raise RuntimeError("fake Plivo: the caller's audio could not be sent")
            await asyncio.sleep(FRAME_S)

    async def press(self, digit: str) -> None:
        await self.send({"event": "dtmf", "sequenceNumber": next(self._seq), "streamId": self.stream_id,
                         "dtmf": {"track": "inbound", "digit": digit, "timestamp": str(_now_ms())}})

    async def _send_audio(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in itertools.count():
            if self.ws is None or self.ws.closed:
                return
            payload = self._outbox.popleft() if self._outbox else SILENCE
            await self.send({"event": "media", "sequenceNumber": next(self._seq), "streamId": self.stream_id,
                             "media": {"track": "inbound", "timestamp": str(_now_ms()), "chunk": next(self._chunk),
                                       "payload": base64.b64encode(payload).decode("ascii")}})
            await asyncio.sleep(max(0.0, start + (n + 1) * FRAME_S - loop.time()))

    # -------------------------------------------------------------- bridge -> caller
    async def _receive(self) -> None:
        assert self.ws is not None
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                self.events.append(frame)
                kind = frame.get("event")
                if kind == "playAudio":
                    media = frame["media"]
                    assert media["contentType"] == "audio/x-mulaw" and media["sampleRate"] == 8000, media
                    data = base64.b64decode(media["payload"])
                    self.play_audio_frames += 1
                    if self.first_play_at is None:
                        self.first_play_at = asyncio.get_running_loop().time()
                    for i in range(0, len(data), FRAME_BYTES):
                        self._queue.append(data[i:i + FRAME_BYTES])
                elif kind == "checkpoint":
                    assert frame.get("streamId") == self.stream_id, frame
                    self.checkpoints.append(frame["name"])
                    self._queue.append(str(frame["name"]))
                elif kind == "clearAudio":
                    assert frame.get("streamId") == self.stream_id, frame
                    self.clears += 1
                    self._queue.clear()  # unplayed audio and the checkpoints behind it are dropped
                    await self.send({"event": "clearedAudio", "sequenceNumber": next(self._seq),
                                     "streamId": self.stream_id})
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()

    async def _play(self) -> None:
        """Plays queued audio in real time; a checkpoint is echoed once the audio before it has played."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while self.ws is not None and not self.ws.closed:
            if not self._queue:
                await asyncio.sleep(0.005)
                next_at = loop.time()
                continue
            item = self._queue.popleft()
            if isinstance(item, str):
                self.played.append(item)
                await self.send({"event": "playedStream", "sequenceNumber": next(self._seq),
                                 "streamId": self.stream_id, "name": item})
                continue
            self.heard += item
            next_at += len(item) / 8000
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def heard_pcm(self) -> bytes:
        return g711.decode(bytes(self.heard), AudioEncoding.PCMU)

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self.closed.set()


async def synthesize_ulaw(text: str, voice_speed: int = 190) -> bytes:
    """espeak-ng speech as 8 kHz u-law."""
    proc = await asyncio.create_subprocess_exec(
        "espeak-ng", "-s", str(voice_speed), "--stdout", text,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    wav, _ = await proc.communicate()
    rate = int.from_bytes(wav[24:28], "little")
    data = wav[44:] if wav[:4] == b"RIFF" else wav
    pcm = data[: len(data) // 2 * 2]
    resampler = StreamResampler(rate, 8000)
    return g711.encode(resampler.process(pcm) + resampler.flush(), AudioEncoding.PCMU)


def _now_ms() -> int:
    return int(asyncio.get_running_loop().time() * 1000)


class FakeCall:
    def __init__(self, fake: FakePlivo, *, direction: str, from_: str, to: str, answer_url: str,
                 hangup_url: str | None, ring_url: str | None = None, machine_url: str | None = None,
                 machine_detection: str | None = None, ring_timeout_s: float = 30) -> None:
        self.fake = fake
        self.uuid = str(uuid.uuid4())
        self.request_uuid = self.uuid if fake.same_request_uuid else str(uuid.uuid4())
        self.direction = direction
        self.from_ = from_
        self.to = to
        self.answer_url = answer_url
        self.hangup_url = hangup_url
        self.ring_url = ring_url
        self.machine_url = machine_url
        self.machine_detection = machine_detection
        self.ring_timeout_s = ring_timeout_s
        self.status = "queued"
        self.answered = False
        self.replies: deque[str] = deque(fake.default_replies)  # what the caller says to GetInput
        self.spoken: list[str] = []  # native <Speak> texts played to the end
        self.xml: list[str] = []  # every XML document the bridge returned
        self.streams: list[FakeStream] = []
        self.hangup_params: dict[str, str] | None = None
        self.dials: list[dict[str, str]] = []  # each <Dial> run: target and attributes
        self.conference: str | None = None  # the <Conference> this call joined
        self.ended = asyncio.Event()
        self._xml_task: asyncio.Task[None] | None = None
        self._flow_task: asyncio.Task[None] | None = None
        self._flow_machine: asyncio.Task[None] | None = None

    @property
    def stream(self) -> FakeStream | None:
        return self.streams[-1] if self.streams else None

    @property
    def live(self) -> bool:
        return not self.ended.is_set()

    def params(self, **extra: str) -> dict[str, str]:
        base = {
            "CallUUID": self.uuid, "RequestUUID": self.request_uuid, "ALegUUID": self.uuid,
            "ALegRequestUUID": self.request_uuid, "From": self.from_, "To": self.to,
            "Direction": self.direction, "CallStatus": self.status, "BillRate": "0.0085",
            "ParentAuthID": self.fake.auth_id, "SessionStart": "2026-11-23 18:00:00.000000",
        }
        base.update(extra)
        return base

    # -------------------------------------------------------------- call progress
    async def run_outbound(self, outcome: str) -> None:
        fake = self.fake
        await asyncio.sleep(fake.ring_delay_s)
        if outcome == "failed":
            await self.end("failed", "UNALLOCATED_NUMBER", "Plivo")
            return
        self.status = "ringing"
        if self.ring_url:
            await fake.callback(self.ring_url, self.params())
        if outcome == "busy":
            await asyncio.sleep(0.05)
            await self.end("busy", "USER_BUSY", "Callee")
            return
        if outcome == "no-answer":
            await asyncio.sleep(self.ring_timeout_s)
            await self.end("timeout", "NO_ANSWER", "Plivo")
            return
        await asyncio.sleep(fake.answer_delay_s)
        if not self.live:
            return
        self.status = "in-progress"
        self.answered = True
        if outcome == "machine":
            self._flow_machine = fake.spawn(self._machine())
        await self.fetch_and_run(self.answer_url, Event="StartApp")

    async def _machine(self) -> None:
        """An answering machine: its greeting (`fake.machine_audio`) into the stream as soon as there is
        one; with machine_detection, the asynchronous callback `fake.machine_s` after the answer."""
        fake = self.fake
        if fake.machine_audio:
            fake.spawn(self._machine_greeting(fake.machine_audio))
        if not (self.machine_detection and self.machine_url):
            return
        await asyncio.sleep(fake.machine_s)
        if not self.live:
            return
        await fake.callback(self.machine_url, self.params(Machine="true", Event="MachineDetection",
                                                          IfMachine="hangup" if self.machine_detection == "hangup"
                                                          else "continue", CallStatus="in-progress"))
        if self.machine_detection == "hangup":
            await self.end("completed", "MACHINE_DETECTED", "Plivo")

    async def _machine_greeting(self, ulaw: bytes) -> None:
        for _ in range(200):
            if self.stream is not None and self.stream.ws is not None:
                self.stream.say_ulaw(ulaw)
                return
            await asyncio.sleep(0.01)

    async def run_inbound(self) -> None:
        self.status = "ringing"
        await self.fetch_and_run(self.answer_url, Event="StartApp")

    async def fetch_and_run(self, url: str, **extra: str) -> None:
        """Request XML from `url` and run it, replacing whatever XML was running."""
        body = await self.fake.callback(url, self.params(**extra))
        if not self.live:
            return
        current = asyncio.current_task()
        if self._xml_task is not None and self._xml_task is not current and not self._xml_task.done():
            self._xml_task.cancel()
        self._xml_task = asyncio.get_running_loop().create_task(self._run_xml(body))

    def transfer(self, url: str) -> None:
        self.fake.spawn(self.fetch_and_run(url))

    async def _run_xml(self, body: str) -> None:
        self.xml.append(body)
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            await self.end("completed", "INVALID_ANSWER_XML", "Error")
            return
        if root.tag != "Response":
            await self.end("completed", "INVALID_ANSWER_XML", "Error")
            return
        if self.direction == "inbound" and not self.answered and not (len(root) and root[0].tag == "Hangup"):
            self.answered = True
            self.status = "in-progress"
        for element in list(root):
            if not self.live:
                return
            tag = element.tag
            if tag == "Speak":
                await self._speak(element.text or "")
            elif tag == "Wait":
                await asyncio.sleep(float(element.get("length", "1")))
            elif tag == "Hangup":
                reason = element.get("reason")
                if reason == "rejected":
                    await self.end("completed", "CALL_REJECTED", "Answer XML")
                else:
                    await self.end("completed", "NORMAL_CLEARING", "Answer XML")
                return
            elif tag == "Redirect":
                await self.fetch_and_run((element.text or "").strip())
                return
            elif tag == "GetInput":
                if await self._get_input(element):
                    return
            elif tag == "Dial":
                await self._dial(element)
                return
            elif tag == "Conference":
                name = (element.text or "").strip()
                self.conference = name
                self.fake.conferences.setdefault(name, []).append(self)
                await self.ended.wait()
                return
            elif tag == "Stream":
                stream = FakeStream(self, (element.text or "").strip(), element.get("extraHeaders"))
                self.streams.append(stream)
                await stream.open()
                if element.get("keepCallAlive") == "true":
                    await stream.closed.wait()
            else:
                raise AssertionError(f"fake Plivo: unexpected XML element {tag}")
        if self.live:
            await self.end("completed", "NORMAL_CLEARING", "Answer XML")  # the XML ran out

    async def _dial(self, element: ET.Element) -> None:
        """<Dial> one <Number> (digits) or <User> (SIP URI): the person follows the fake's number sets;
        callbackUrl hears DialAction=answer; the action gets DialStatus when the dialed leg is done."""
        noun = element.find("Number")
        if noun is None:
            noun = element.find("User")
        assert noun is not None, "fake Plivo: <Dial> needs a <Number> or <User>"
        target = (noun.text or "").strip()
        b_leg = str(uuid.uuid4())
        self.dials.append({"to": target, "noun": noun.tag, **element.attrib})
        fake = self.fake
        numbers = {target, "+" + target}
        outcome = ("busy" if numbers & fake.busy_numbers else "no-answer" if numbers & fake.no_answer_numbers
                   else "failed" if numbers & fake.failed_numbers else "completed")
        await asyncio.sleep(fake.ring_delay_s + fake.answer_delay_s)
        dial = {"DialALegUUID": self.uuid, "DialBLegUUID": "", "DialRingStatus": "true"}
        if outcome == "completed":
            dial["DialBLegUUID"] = b_leg
            if element.get("callbackUrl"):
                await fake.callback(element.get("callbackUrl", ""), self.params(DialAction="answer", **dial))
            with contextlib.suppress(TimeoutError):  # they talk until the person (or the caller) hangs up
                await asyncio.wait_for(self.ended.wait(), fake.dial_talk_s)
        if not self.live or not element.get("action"):
            return
        await self.fetch_and_run(element.get("action", ""), DialStatus=outcome, DialHangupCause="NORMAL_CLEARING"
                                 if outcome == "completed" else "USER_BUSY", **dial)

    async def _speak(self, text: str) -> None:
        await asyncio.sleep(self.fake.speak_s_per_word * len(text.split()))
        self.spoken.append(text)

    async def _get_input(self, element: ET.Element) -> bool:
        """Run GetInput; True when it redirected (the XML after it does not run)."""
        assert element.get("inputType") in ("speech", "dtmf speech"), element.attrib
        for prompt in element.findall("Speak"):
            await self._speak(prompt.text or "")
        if not self.replies:
            await asyncio.sleep(float(element.get("executionTimeout", "15")))
            return False
        await asyncio.sleep(self.fake.reply_delay_s)
        text = self.replies.popleft()
        action = element.get("action")
        if not action:
            return False
        extra = {"InputType": "speech", "Speech": text, "SpeechConfidenceScore": "0.91", "Event": "GetInput"}
        if element.get("redirect", "true") == "true":
            await self.fetch_and_run(action, **extra)
            return True
        await self.fake.callback(action, self.params(**extra))
        return False

    async def hang_up(self) -> None:
        """The person on the phone hangs up."""
        await self.end("completed", "NORMAL_CLEARING", "Callee" if self.direction == "outbound" else "Caller")

    async def end(self, status: str, cause: str, source: str) -> None:
        if not self.live:
            return
        self.status = status
        self.hangup_params = self.params(HangupCause=cause, HangupCauseName=cause.replace("_", " ").title(),
                                         HangupSource=source, Event="Hangup",
                                         Duration="1" if self.answered else "0",
                                         BillDuration="60" if self.answered else "0")
        self.ended.set()
        for other in self.fake.conferences.get(self.conference or "", []):  # endConferenceOnExit
            if other is not self:
                self.fake.spawn(other.end("completed", "NORMAL_CLEARING", "Conference"))
        current = asyncio.current_task()
        if self._xml_task is not None and self._xml_task is not current and not self._xml_task.done():
            self._xml_task.cancel()
        for stream in self.streams:
            await stream.close()
        if self.hangup_url:
            await self.fake.callback(self.hangup_url, self.hangup_params)


@dataclass
class FakePlivo:
    auth_id: str = "MAFAKEAUTHID0000000A"
    auth_token: str = "fake-plivo-auth-token-0123456789"
    ring_delay_s: float = 0.05
    answer_delay_s: float = 0.1
    speak_s_per_word: float = 0.02
    reply_delay_s: float = 0.05
    same_request_uuid: bool = False  # Plivo often reuses the request_uuid as the CallUUID
    send_v2: bool = True
    send_v3: bool = True
    busy_numbers: set[str] = field(default_factory=set)
    no_answer_numbers: set[str] = field(default_factory=set)
    failed_numbers: set[str] = field(default_factory=set)
    machine_numbers: set[str] = field(default_factory=set)
    machine_audio: bytes = b""  # u-law a machine plays into the stream (greeting, beep, silence)
    machine_s: float = 0.3  # after the answer, the machine-detection callback comes this late
    default_replies: list[str] = field(default_factory=list)
    requests: list[RestRequest] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    calls: dict[str, FakeCall] = field(default_factory=dict)
    dtmf_sent: list[tuple[str, str]] = field(default_factory=list)
    conferences: dict[str, list[FakeCall]] = field(default_factory=dict)  # name -> calls in it
    dial_talk_s: float = 0.3  # a <Dial>ed person who answered hangs up after this long
    on_call: Callable[[FakeCall], None] | None = None
    port: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakePlivo:
        app = web.Application(middlewares=[self._auth])
        prefix = "/v1/Account/{auth_id}"
        app.router.add_post(prefix + "/Call/", self._create)
        app.router.add_post(prefix + "/Call/{uuid}/", self._transfer)
        app.router.add_delete(prefix + "/Call/{uuid}/", self._hangup)
        app.router.add_get(prefix + "/Call/{uuid}/", self._get)
        app.router.add_post(prefix + "/Call/{uuid}/DTMF/", self._dtmf)
        app.router.add_delete(prefix + "/Request/{uuid}/", self._cancel)
        self._runner, self.port = await serve_local(app)
        self._session = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        for call in list(self.calls.values()):
            call.ended.set()
            for stream in call.streams:
                await stream.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakePlivo:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -------------------------------------------------------------- callbacks to the bridge
    async def callback(self, url: str, params: dict[str, str]) -> str:
        """POST a signed, form-encoded callback; return the response body."""
        assert self._session is not None
        headers: dict[str, str] = {}
        if self.send_v3:
            nonce = str(secrets.randbelow(10**20)).zfill(20)
            headers["X-Plivo-Signature-V3"] = sign_v3(self.auth_token, url, params, nonce)
            headers["X-Plivo-Signature-V3-Nonce"] = nonce
        if self.send_v2:
            nonce2 = str(secrets.randbelow(10**20)).zfill(20)
            headers["X-Plivo-Signature-V2"] = sign_v2(self.auth_token, url, nonce2)
            headers["X-Plivo-Signature-V2-Nonce"] = nonce2
        try:
            async with self._session.post(url, data=params, headers=headers) as resp:
                body = await resp.text()
                self.callbacks.append(Callback(url, dict(params), resp.status, body))
                return body if resp.status == 200 else ""
        except aiohttp.ClientError:
            self.callbacks.append(Callback(url, dict(params), 0, ""))
            return ""

    def callbacks_for(self, flow: str) -> list[Callback]:
        return [c for c in self.callbacks if f"flow={flow}" in c.url]

    async def inbound_call(self, from_: str, to: str, answer_url: str, hangup_url: str | None = None) -> FakeCall:
        """Someone calls one of our Plivo numbers; its application points at the bridge."""
        call = FakeCall(self, direction="inbound", from_=from_, to=to, answer_url=answer_url, hangup_url=hangup_url)
        self.calls[call.uuid] = call
        if self.on_call is not None:
            self.on_call(call)
        self.spawn(call.run_inbound())
        return call

    def call(self, index: int = -1) -> FakeCall:
        return list(self.calls.values())[index]

    def find(self, uuid_: str) -> FakeCall | None:
        return self.calls.get(uuid_) or next((c for c in self.calls.values() if c.request_uuid == uuid_), None)

    # -------------------------------------------------------------- REST
    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            return await handler(request)  # unknown path (e.g. no trailing slash): 404/405
        credentials = base64.b64encode(f"{self.auth_id}:{self.auth_token}".encode()).decode("ascii")
        expected = f"Basic {credentials}"
        if request.headers.get("Authorization") != expected or request.match_info.get("auth_id") != self.auth_id:
            self.requests.append(RestRequest(request.method, request.path, {}, 401))
            return web.json_response({"error": "authentication failed"}, status=401)
        body: dict[str, Any] = {}
        if request.method == "POST":
            if request.content_type != "application/json":
                return web.json_response({"error": "expected a JSON body"}, status=400)
            body = await request.json()  # aiohttp keeps the body: handlers read it again
        response: web.StreamResponse = await handler(request)
        self.requests.append(RestRequest(request.method, request.path, body, response.status))
        return response

    def rest(self, method: str, suffix: str) -> list[RestRequest]:
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    async def _create(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json() if request.method == "POST" else {}
        missing = [k for k in ("from", "to", "answer_url") if not body.get(k)]
        if missing:
            return web.json_response({"error": f"{', '.join(missing)} required"}, status=400)
        to = str(body["to"])
        call = FakeCall(self, direction="outbound", from_=str(body["from"]), to=to, answer_url=body["answer_url"],
                        hangup_url=body.get("hangup_url"), ring_url=body.get("ring_url"),
                        machine_url=body.get("machine_detection_url"),
                        machine_detection=body.get("machine_detection"),
                        ring_timeout_s=float(body.get("ring_timeout", 120)))
        self.calls[call.uuid] = call
        if self.on_call is not None:
            self.on_call(call)
        outcome = ("busy" if to in self.busy_numbers else "no-answer" if to in self.no_answer_numbers
                   else "failed" if to in self.failed_numbers else "machine" if to in self.machine_numbers
                   else "answer")
        call._flow_task = self.spawn(call.run_outbound(outcome))
        return web.json_response({"api_id": str(uuid.uuid4()), "message": "call fired",
                                  "request_uuid": call.request_uuid}, status=201)

    async def _transfer(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json() if request.method == "POST" else {}
        call = self.calls.get(request.match_info["uuid"])
        if call is None or not call.live or not call.answered:
            return web.json_response({"error": "call not found"}, status=404)
        if body.get("legs") != "aleg" or not body.get("aleg_url"):
            return web.json_response({"error": "legs=aleg and aleg_url required"}, status=400)
        call.transfer(body["aleg_url"])
        return web.json_response({"api_id": str(uuid.uuid4()), "message": "call transferred"}, status=202)

    async def _hangup(self, request: web.Request) -> web.Response:
        call = self.calls.get(request.match_info["uuid"])
        if call is None or not call.live or call.status == "queued":
            return web.json_response({"error": "not found"}, status=404)
        status = "completed" if call.answered else "cancel"
        self.spawn(call.end(status, "NORMAL_CLEARING" if call.answered else "ORIGINATOR_CANCEL", "API Request"))
        return web.Response(status=204)

    async def _cancel(self, request: web.Request) -> web.Response:
        call = next((c for c in self.calls.values() if c.request_uuid == request.match_info["uuid"]), None)
        if call is None or not call.live or call.answered:
            return web.json_response({"error": "not found"}, status=404)
        self.spawn(call.end("cancel", "ORIGINATOR_CANCEL", "API Request"))
        return web.Response(status=204)

    async def _get(self, request: web.Request) -> web.Response:
        kind = request.query.get("status")
        call = self.find(request.match_info["uuid"])
        if kind == "live" and call is not None and call.live and call.status != "queued":
            return web.json_response({"call_uuid": call.uuid, "call_status": call.status,
                                      "direction": call.direction, "from": call.from_, "to": call.to})
        if kind == "queued" and call is not None and call.live and call.status == "queued":
            return web.json_response({"request_uuid": call.request_uuid, "call_status": "queued"})
        return web.json_response({"error": "not found"}, status=404)

    async def _dtmf(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json() if request.method == "POST" else {}
        call = self.calls.get(request.match_info["uuid"])
        if call is None or not call.live:
            return web.json_response({"error": "not found"}, status=404)
        self.dtmf_sent.append((call.uuid, str(body.get("digits", ""))))
        return web.json_response({"api_id": str(uuid.uuid4()), "message": "digits sent"}, status=202)
