"""A small, faithful fake of Twilio for tests and benchmarks (aiohttp on 127.0.0.1).

- `TwilioMediaStreamClient`: Twilio's side of one bidirectional Media Stream. It opens the
  WebSocket to the bridge, sends `connected` + `start` (custom parameters such as the stream token),
  then one 20 ms u-law `media` frame every 20 ms at real-time cadence (the caller's queued speech,
  else silence, as Twilio does), records every frame it hears with its receive time, plays it out
  in real time, echoes each `mark` once the audio queued before it has played, and honours `clear`
  (unplayed audio dropped, pending marks returned at once). Standalone: many run concurrently on
  one session, paced by their own task or all together by `pace_streams` (the load generator).
- `FakeTwilio`: the REST API (`/2010-04-01/Accounts/{Sid}/Calls[.json]`, Basic auth, form bodies,
  Twilio's JSON answers and error codes) and the carrier side of each call: SIGNED webhooks
  (status callbacks, the answer-URL fetch, Gather results, Redirects, inbound voice-URL fetches) and
  a TwiML interpreter (Say, Pause, Hangup, Reject, Gather, Redirect, Play, Connect/Stream) driving
  a scripted person (`CallerScript`).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import secrets
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp import web
from yarl import URL

from media import g711
from media.formats import AudioEncoding
from media.resample import StreamResampler
from tests.fakes.http_app import serve_local

log = logging.getLogger(__name__)

FRAME_MS = 20
FRAME_BYTES = 160  # u-law 8 kHz, 20 ms
SILENCE = b"\xff" * FRAME_BYTES
API = "/2010-04-01"


def sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def pcm_to_ulaw(pcm: bytes, rate: int) -> bytes:
    """PCM16 mono at `rate` -> u-law 8 kHz."""
    resampler = StreamResampler(rate, 8000)
    return g711.encode(resampler.process(pcm) + resampler.flush(), AudioEncoding.PCMU)


def ulaw_frames(ulaw: bytes) -> list[bytes]:
    """Exact 160-byte frames; the last one padded with u-law silence."""
    return [ulaw[i:i + FRAME_BYTES].ljust(FRAME_BYTES, b"\xff") for i in range(0, len(ulaw), FRAME_BYTES)]


def twilio_sign(auth_token: str, url: str, params: dict[str, str]) -> str:
    """X-Twilio-Signature as Twilio computes it (the official SDK's validator where installed)."""
    try:
        from twilio.request_validator import RequestValidator
    except ImportError:  # benchmarks may run without the SDK
        from carriers.signatures import twilio_signature

        return twilio_signature(auth_token, url, params)
    return str(RequestValidator(auth_token).compute_signature(url, params))


# ====================================================================== media stream client


class TwilioMediaStreamClient:
    def __init__(
        self,
        url: str,
        *,
        parameters: dict[str, str] | None = None,
        call_sid: str | None = None,
        account_sid: str | None = None,
        stream_sid: str | None = None,
        session: aiohttp.ClientSession | None = None,
        keep_audio: bool = True,
        self_paced: bool = True,
    ) -> None:
        self.url = url
        self.parameters = dict(parameters or {})
        self.call_sid = call_sid or sid("CA")
        self.account_sid = account_sid or sid("AC")
        self.stream_sid = stream_sid or sid("MZ")
        self.keep_audio = keep_audio
        self.self_paced = self_paced
        self._session = session
        self._own_session = session is None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._seq = itertools.count(1)
        self._chunk = 0
        self._outbox: deque[bytes] = deque()
        self._outbox_empty = asyncio.Event()
        self._outbox_empty.set()
        self._sid_json = json.dumps(self.stream_sid)
        # what we send
        self.frames_sent = 0
        self.sent_at: list[float] = []  # loop time each media frame was sent (index = chunk - 1)
        # what we hear
        self.received: list[tuple[float, bytes]] = []  # (loop time received, payload or b"" if not kept)
        self.frames_received = 0  # media messages (20 or 40 ms each, as the bridge sends them)
        self.ms_received = 0.0  # the audio in them
        self.received_ms: list[tuple[float, float]] = []  # (loop time received, ms of audio)
        self.sizes_received: list[int] = []  # payload bytes of each media message
        self.marks_received: list[str] = []
        self.marks_echoed: list[str] = []
        self.clears = 0
        self.clear_times: list[float] = []
        self.bad_frames = 0
        self._heard = bytearray()  # u-law that played out (cleared audio never plays)
        self._queued: deque[tuple[float, bytes]] = deque()  # (play start, frame) not yet played
        self._playout_end = 0.0
        self._pending_marks: list[tuple[str, asyncio.TimerHandle]] = []
        self.last_media_at = 0.0
        self._stopping = False
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ connect / close

    async def connect(self, *, headers: dict[str, str] | None = None) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self.ws = await self._session.ws_connect(self.url, headers=headers, autoping=True, max_msg_size=1 << 20)
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send({
            "event": "start",
            "sequenceNumber": str(next(self._seq)),
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": self.parameters,
            },
            "streamSid": self.stream_sid,
        })
        self._spawn(self._read())
        if self.self_paced:
            self._spawn(self._pace())

    async def stop(self) -> None:
        """The call ended on Twilio's side: `stop` (the last frame), then close the socket."""
        self._stopping = True
        if self.ws is not None and not self.ws.closed:
            try:
                await self._send({"event": "stop", "sequenceNumber": str(next(self._seq)), "streamSid": self.stream_sid,
                                  "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
            except (ConnectionError, RuntimeError):
                pass
            await self.ws.close()
        await self.aclose()

    async def aclose(self) -> None:
        for _, handle in self._pending_marks:
            handle.cancel()
        self._pending_marks.clear()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self._own_session and self._session is not None:
            await self._session.close()
        self.closed.set()

    async def wait_closed(self, timeout: float | None = None) -> int | None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()
        return self.close_code

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(message, separators=(",", ":")))

    # ------------------------------------------------------------------ caller -> bridge

    def say_ulaw(self, ulaw: bytes) -> None:
        """Queue the caller's speech (u-law 8 kHz); it goes out frame by frame at real-time cadence."""
        self._outbox.extend(ulaw_frames(ulaw))
        if self._outbox:
            self._outbox_empty.clear()

    def say_pcm(self, pcm: bytes, rate: int) -> None:
        self.say_ulaw(pcm_to_ulaw(pcm, rate))

    async def said(self) -> None:
        """Wait until the queued speech has been sent."""
        await self._outbox_empty.wait()

    async def tick(self) -> None:
        """Send the next 20 ms frame: queued speech, else silence (Twilio streams continuously)."""
        ws = self.ws
        if ws is None or ws.closed or self._stopping:
            return
        if self._outbox:
            frame = self._outbox.popleft()
            if not self._outbox:
                self._outbox_empty.set()
        else:
            frame = SILENCE
        self._chunk += 1
        chunk = self._chunk
        text = ('{"event":"media","sequenceNumber":"' + str(next(self._seq)) + '","media":{"track":"inbound","chunk":"'
                + str(chunk) + '","timestamp":"' + str((chunk - 1) * FRAME_MS) + '","payload":"'
                + base64.b64encode(frame).decode("ascii") + '"},"streamSid":' + self._sid_json + "}")
        self.sent_at.append(self._loop.time())
        self.frames_sent += 1
        try:
            await ws.send_str(text)
        except (ConnectionError, RuntimeError):
            pass

    async def _pace(self) -> None:
        start = self._loop.time()
        n = 0
        while self.ws is not None and not self.ws.closed and not self._stopping:
            await self.tick()
            n += 1
            delay = start + n * FRAME_MS / 1000 - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def send_dtmf(self, digits: str) -> None:
        for digit in digits:
            await self._send({"event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": str(next(self._seq)),
                              "dtmf": {"track": "inbound_track", "digit": digit}})

    # ------------------------------------------------------------------ bridge -> caller

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    self.bad_frames += 1
                    continue
                try:
                    data = json.loads(msg.data)
                    event = data["event"]
                    if data.get("streamSid") != self.stream_sid:
                        raise ValueError("wrong streamSid")
                    if event == "media":
                        self._on_media(base64.b64decode(data["media"]["payload"], validate=True))
                    elif event == "mark":
                        self._on_mark(str(data["mark"]["name"]))
                    elif event == "clear":
                        self._on_clear()
                    else:
                        raise ValueError(f"unknown event {event!r}")
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("fake twilio stream: bad frame from the bridge: %s", exc)
                    self.bad_frames += 1
        finally:
            self.close_code = self.ws.close_code
            await self.aclose()

    def _on_media(self, payload: bytes) -> None:
        now = self._loop.time()
        self.frames_received += 1
        self.ms_received += len(payload) / 8
        self.received_ms.append((now, len(payload) / 8))
        self.sizes_received.append(len(payload))
        self.last_media_at = now
        self.received.append((now, payload if self.keep_audio else b""))
        start = max(now, self._playout_end)
        self._playout_end = start + len(payload) / 8000
        if self.keep_audio:
            self._queued.append((start, payload))

    def _on_mark(self, name: str) -> None:
        self.marks_received.append(name)
        delay = max(0.0, self._playout_end - self._loop.time())
        self._pending_marks.append((name, self._loop.call_later(delay, self._echo_mark, name)))

    def _echo_mark(self, name: str) -> None:
        self._pending_marks = [(n, h) for n, h in self._pending_marks if n != name]
        self.marks_echoed.append(name)
        if self.ws is not None and not self.ws.closed:
            self._spawn(self._send({"event": "mark", "sequenceNumber": str(next(self._seq)),
                                    "streamSid": self.stream_sid, "mark": {"name": name}}))

    def _on_clear(self) -> None:
        now = self._loop.time()
        self.clears += 1
        self.clear_times.append(now)
        self._played(now)
        self._queued.clear()
        self._playout_end = now
        pending, self._pending_marks = self._pending_marks, []
        for name, handle in pending:  # Twilio returns pending marks when the buffer is cleared
            handle.cancel()
            self._echo_mark(name)

    def _played(self, now: float) -> None:
        while self._queued and self._queued[0][0] <= now:
            self._heard += self._queued.popleft()[1]

    # ------------------------------------------------------------------ what the caller heard

    def heard_ulaw(self) -> bytes:
        self._played(self._loop.time())
        return bytes(self._heard)

    def heard_pcm(self) -> bytes:
        return g711.decode(self.heard_ulaw(), AudioEncoding.PCMU)

    @property
    def bot_talking(self) -> bool:
        return self._playout_end > self._loop.time() or bool(self._pending_marks)

    async def wait_quiet(self, quiet_s: float = 0.3, *, after_audio: bool = True, timeout: float = 30.0) -> None:
        """Wait until the bot has said something (unless `after_audio` is False) and then stayed quiet."""
        async with asyncio.timeout(timeout):
            while True:
                now = self._loop.time()
                heard_any = self.frames_received > 0 or not after_audio
                if heard_any and not self.bot_talking and now - max(self.last_media_at, self._playout_end) >= quiet_s:
                    return
                await asyncio.sleep(0.02)

    async def wait_audio(self, ms: float, timeout: float = 30.0) -> None:
        """Wait until `ms` of bot audio has arrived since the last clear."""
        async with asyncio.timeout(timeout):
            while True:
                since = self.clear_times[-1] if self.clear_times else 0.0
                if sum(d for t, d in self.received_ms if t > since) >= ms:
                    return
                await asyncio.sleep(0.01)


async def pace_streams(clients: Sequence[TwilioMediaStreamClient], seconds: float) -> int:
    """Drive many clients (built with `self_paced=False`) from ONE 20 ms metronome: every tick, each
    open stream sends its next frame. Returns the number of ticks."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    ticks = int(seconds * 1000 / FRAME_MS)
    for n in range(ticks):
        for client in clients:
            await client.tick()
        delay = start + (n + 1) * FRAME_MS / 1000 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return ticks


# ====================================================================== the fake carrier


@dataclass
class CallerScript:
    """What the person on the other end does."""

    outcome: Literal["answer", "busy", "no-answer", "failed"] = "answer"
    ring_ms: int = 50
    machine: bool = False  # an answering machine picks up (AnsweredBy machine_start / machine_end_beep)
    answered_by: str | None = None  # the AnsweredBy AMD reports, if not the one `machine` implies
    amd_ms: int = 300  # after the answer, the asynchronous AMD callback comes this late
    utterances: list[str] = field(default_factory=list)  # one per bot turn
    reply_delay_ms: int = 150
    barge_in: bool = False  # speak over the bot (after `barge_in_after_ms` of its audio) instead of waiting
    barge_in_after_ms: int = 400
    dtmf: str = ""  # keys pressed once the media stream is up (or at the first Gather)
    hangup_after_ms: int | None = None  # hang up this long after answering
    gather_timeout_s: float = 1.0  # a Gather with nothing to say falls through after this (Twilio: 5 s)


@dataclass
class Webhook:
    url: str
    params: dict[str, str]
    status: int
    body: str


class FakeCall:
    def __init__(self, fake: FakeTwilio, *, direction: str, to: str, from_: str, script: CallerScript,
                 url: str | None = None, twiml: str | None = None, status_callback: str | None = None,
                 status_events: Sequence[str] = (),
                 timeout: int = 60, machine_detection: str | None = None, async_amd: bool = False,
                 amd_callback: str | None = None) -> None:
        self.fake = fake
        self.sid = sid("CA")
        self.direction = direction
        self.to = to
        self.from_ = from_
        self.script = script
        self.url = url
        self.twiml = twiml
        self.status_callback = status_callback
        self.status_events = list(status_events) or ["completed"]
        self.timeout = timeout
        self.machine_detection = machine_detection
        self.async_amd = async_amd
        self.amd_callback = amd_callback
        self.status = "queued" if direction == "outbound-api" else "ringing"
        self.answered_by: str | None = None
        self.utterances = deque(script.utterances)
        self.webhooks: list[Webhook] = []  # everything we sent, with the bridge's answers
        self.said: list[str] = []  # <Say> texts, in order
        self.played_digits: list[str] = []
        self.dials: list[dict[str, str]] = []  # each <Dial> executed: target or conference, attributes
        self.rest_updates: list[dict[str, str]] = []
        self.streams: list[TwilioMediaStreamClient] = []
        self.sequence = itertools.count(0)
        self.started = time.time()
        self.ended = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._life: asyncio.Task[None] | None = None
        self._amd: asyncio.Task[None] | None = None
        self._hangup_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ views

    @property
    def stream(self) -> TwilioMediaStreamClient | None:
        return self.streams[-1] if self.streams else None

    def fetches(self, kind: str | None = None) -> list[Webhook]:
        """Webhooks other than status callbacks; `kind` filters on the `type` query value ('' = none)."""
        out = []
        for hook in self.webhooks:
            query = dict(URL(hook.url).query)
            if query.get("type") == "status":
                continue
            if kind is None or query.get("type", "") == kind:
                out.append(hook)
        return out

    def status_callbacks(self) -> list[Webhook]:
        return [h for h in self.webhooks if dict(URL(h.url).query).get("type") == "status"]

    def as_json(self) -> dict[str, Any]:
        return {
            "sid": self.sid, "account_sid": self.fake.account_sid, "to": self.to, "from": self.from_,
            "status": self.status, "direction": self.direction, "answered_by": self.answered_by,
            "api_version": "2010-04-01", "uri": f"{API}/Accounts/{self.fake.account_sid}/Calls/{self.sid}.json",
            "duration": str(int(time.time() - self.started)) if self.ended.is_set() else None,
        }

    def _params(self, **extra: str) -> dict[str, str]:
        params = {
            "AccountSid": self.fake.account_sid, "ApiVersion": "2010-04-01", "CallSid": self.sid,
            "CallStatus": self.status, "Called": self.to, "Caller": self.from_, "Direction": self.direction,
            "From": self.from_, "To": self.to,
        }
        if self.answered_by and not self.async_amd:  # synchronous AMD: on the voice URL's request
            params["AnsweredBy"] = self.answered_by
        params.update(extra)
        return params

    # ------------------------------------------------------------------ life of the call

    def start_outbound(self) -> None:
        self._life = asyncio.ensure_future(self._outbound())

    async def _outbound(self) -> None:
        script = self.script
        await self._status_event("initiated", "initiated")
        await asyncio.sleep(script.ring_ms / 1000)
        if self.ended.is_set():
            return
        await self._status_event("ringing", "ringing")
        await asyncio.sleep(script.ring_ms / 1000)
        if self.ended.is_set():
            return
        if script.outcome != "answer":
            await self.end(script.outcome)
            return
        self.status = "in-progress"
        if self.machine_detection:
            end = "machine_end_beep" if self.machine_detection == "DetectMessageEnd" else "machine_start"
            self.answered_by = script.answered_by or (end if script.machine else "human")
        await self._status_event("answered", "in-progress")
        self._arm_hangup()
        if self.machine_detection and self.async_amd and self.amd_callback:
            self._amd = asyncio.ensure_future(self._amd_result(self.amd_callback, self.answered_by or "unknown"))
        if self.url:
            self.run(self.url)
        else:
            self.run_twiml(self.twiml or "<Response/>")

    async def _amd_result(self, url: str, answered_by: str) -> None:
        """AsyncAmd: the verdict goes to AsyncAmdStatusCallback while the call's TwiML runs."""
        await asyncio.sleep(self.script.amd_ms / 1000)
        if not self.ended.is_set():
            await self.fake.post_webhook(self, url, {
                "AccountSid": self.fake.account_sid, "CallSid": self.sid, "AnsweredBy": answered_by,
                "MachineDetectionDuration": str(self.script.amd_ms)})

    def start_inbound(self, voice_url: str) -> None:
        self._arm_hangup()
        self.run(voice_url)

    def _arm_hangup(self) -> None:
        if self.script.hangup_after_ms is not None:
            self._hangup_timer = asyncio.get_running_loop().call_later(
                self.script.hangup_after_ms / 1000, lambda: asyncio.ensure_future(self.hang_up()))

    def run(self, url: str, params: dict[str, str] | None = None) -> None:
        """Fetch `url` and execute the TwiML it answers, replacing whatever the call was doing."""
        self._replace_runner(lambda: self._document_from(url, params))

    def run_twiml(self, document: str) -> None:
        """Execute this TwiML now, replacing whatever the call was doing (a REST `Twiml=` update)."""

        async def given() -> str | None:
            return document

        self._replace_runner(given)

    def _replace_runner(self, first: Callable[[], Awaitable[str | None]]) -> None:
        old = self._runner
        self._runner = asyncio.ensure_future(self._execute(first, old))

    async def _execute(self, first: Callable[[], Awaitable[str | None]], old: asyncio.Task[None] | None) -> None:
        if old is not None and not old.done():
            old.cancel()
            await asyncio.gather(old, return_exceptions=True)
        document = await first()
        while document is not None and not self.ended.is_set():
            document = await self._interpret(document)
        if not self.ended.is_set() and asyncio.current_task() is self._runner:
            await self.end("completed")  # TwiML ran out: Twilio hangs up

    async def _document_from(self, url: str, params: dict[str, str] | None = None) -> str | None:
        hook = await self.fake.post_webhook(self, url, self._params(**(params or {})))
        if hook.status != 200:
            log.warning("fake twilio: %s answered HTTP %d; ending the call", url, hook.status)
            await self.end("failed" if self.status != "in-progress" else "completed")
            return None
        return hook.body

    async def _interpret(self, document: str) -> str | None:
        """Run one TwiML document; return the next one (Redirect, Gather action) or None when done."""
        try:
            root = ET.fromstring(document)
        except ET.ParseError:
            log.warning("fake twilio: not TwiML: %.200s", document)
            await self.end("failed")
            return None
        if root.tag != "Response":
            await self.end("failed")
            return None
        for verb in root:
            if self.ended.is_set():
                return None
            tag = verb.tag
            if self.status == "ringing" and tag not in ("Reject", "Hangup", "Redirect"):
                self.status = "in-progress"  # an inbound call is answered by its first answering verb
            if tag == "Say":
                text = (verb.text or "").strip()
                self.said.append(text)
                await asyncio.sleep(len(text) / self.fake.say_chars_per_second)
            elif tag == "Pause":
                await asyncio.sleep(float(verb.get("length", "1")))
            elif tag == "Hangup":
                await self.end("completed")
                return None
            elif tag == "Reject":
                await self.end("busy" if verb.get("reason") == "busy" else "no-answer")
                return None
            elif tag == "Play":
                digits = verb.get("digits", "")
                if digits:
                    self.played_digits.append(digits)
                    # tones of ~0.1 s each (a 20 ms scale here), w 0.5 s and W 1 s pauses
                    await asyncio.sleep(sum(0.5 if d == "w" else 1.0 if d == "W" else 0.02 for d in digits))
            elif tag == "Redirect":
                return await self._document_from((verb.text or "").strip())
            elif tag == "Gather":
                nxt = await self._gather(verb)
                if nxt is not None:
                    return nxt
            elif tag == "Connect":
                stream = verb.find("Stream")
                if stream is not None:
                    await self._stream(stream)
            elif tag == "Dial":
                nxt = await self._dial(verb)
                if nxt is not None:
                    return nxt
            else:
                log.warning("fake twilio: verb <%s> not simulated", tag)
        return None

    async def _dial(self, verb: ET.Element) -> str | None:
        """`<Dial>` a number or SIP URI (the person follows `fake.scripts[to]`), or join a `<Conference>`."""
        conference = verb.find("Conference")
        if conference is not None:
            name = (conference.text or "").strip()
            self.dials.append({"conference": name, **verb.attrib, **conference.attrib})
            self.fake.conferences.setdefault(name, []).append(self)
            await self.ended.wait()  # until this call, or another member that ends the conference, leaves
            return None
        noun = verb.find("Number")
        if noun is None:
            noun = verb.find("Sip")
        if noun is None:
            log.warning("fake twilio: <Dial> without Number/Sip/Conference not simulated")
            return None
        target = (noun.text or "").strip()
        script = self.fake.scripts.get(target, self.fake.default_script)
        child = sid("CA")
        self.dials.append({"to": target, "noun": noun.tag, "child": child, **verb.attrib,
                           **{f"{noun.tag}.{k}": v for k, v in noun.attrib.items()}})
        await asyncio.sleep(2 * script.ring_ms / 1000)
        started = time.time()
        if script.outcome != "answer":
            status = script.outcome
        else:
            callback = noun.get("statusCallback")
            if callback and "answered" in (noun.get("statusCallbackEvent") or "").split():
                await self.fake.post_webhook(self, callback, self._params(
                    CallSid=child, ParentCallSid=self.sid, CallStatus="in-progress", Direction="outbound-dial",
                    To=target, CallbackSource="call-progress-events"))
            try:  # the two talk until the person hangs up (or the caller does)
                await asyncio.wait_for(self.ended.wait(), (script.hangup_after_ms or 1000) / 1000)
            except TimeoutError:
                pass
            status = "completed"
        action = verb.get("action")
        if self.ended.is_set() or not action:
            return None
        return await self._document_from(action, {"DialCallStatus": status, "DialCallSid": child,
                                                  "DialCallDuration": str(int(time.time() - started))})

    async def _gather(self, verb: ET.Element) -> str | None:
        action = verb.get("action") or self.url or ""
        if self.script.dtmf and "dtmf" in (verb.get("input") or ""):
            digits, self.script.dtmf = self.script.dtmf, ""
            return await self._document_from(action, {"Digits": digits})
        if not self.utterances:
            await asyncio.sleep(self.script.gather_timeout_s)
            return None
        await asyncio.sleep(self.script.reply_delay_ms / 1000)
        text = self.utterances.popleft()
        return await self._document_from(action, {"SpeechResult": text, "Confidence": "0.92"})

    async def _stream(self, element: ET.Element) -> None:
        parameters = {p.get("name", ""): p.get("value", "") for p in element.findall("Parameter")}
        client = TwilioMediaStreamClient(element.get("url", ""), parameters=parameters, call_sid=self.sid,
                                         account_sid=self.fake.account_sid, session=self.fake.session)
        self.streams.append(client)
        try:
            await client.connect()
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("fake twilio: stream connect failed: %s", exc)
            return
        person = asyncio.ensure_future(self._stream_person(client))
        try:
            await client.closed.wait()
        finally:
            person.cancel()
            if not client.closed.is_set():  # our runner was replaced or the call ended
                await client.stop()

    async def _stream_person(self, client: TwilioMediaStreamClient) -> None:
        script = self.script
        if script.dtmf and len(self.streams) == 1:
            await asyncio.sleep(0.2)
            await client.send_dtmf(script.dtmf)
        while self.utterances:
            if script.barge_in:
                await client.wait_audio(script.barge_in_after_ms)
            else:
                await client.wait_quiet(0.3)
                await asyncio.sleep(script.reply_delay_ms / 1000)
            pcm, rate = await self.fake.speech(self.utterances.popleft())
            client.say_pcm(pcm, rate)
            await client.said()
            await asyncio.sleep(0.3)

    # ------------------------------------------------------------------ endings

    async def hang_up(self) -> None:
        """The person hangs up."""
        await self.end("completed")

    async def end(self, status: str) -> None:
        await asyncio.shield(self.finish(status))

    def finish(self, status: str) -> asyncio.Future[None]:
        """End the call now (status set at once); the stream stop and final callback follow in a task."""
        if self.ended.is_set():
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        self.status = status
        self.ended.set()
        if self._hangup_timer is not None:
            self._hangup_timer.cancel()
        return asyncio.ensure_future(self._teardown(status, asyncio.current_task()))

    async def _teardown(self, status: str, caller: asyncio.Task[Any] | None) -> None:
        for members in self.fake.conferences.values():  # endConferenceOnExit: the others leave too
            if self in members:
                for other in members:
                    if other is not self:
                        other.finish("completed")
        for stream in self.streams:
            if not stream.closed.is_set():
                await stream.stop()
        for task in (self._runner, self._life, self._amd):
            if task is not None and task is not caller and not task.done():
                task.cancel()
        await self._status_event("completed", status, CallDuration=str(int(time.time() - self.started)))

    async def _status_event(self, event: str, status: str, **extra: str) -> None:
        self.status = status
        if not self.status_callback or event not in self.status_events:
            return
        await self.fake.post_webhook(self, self.status_callback, self._params(
            CallbackSource="call-progress-events", SequenceNumber=str(next(self.sequence)),
            Timestamp=time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()), **extra))

    # ------------------------------------------------------------------ REST update

    async def update(self, form: dict[str, str]) -> None:
        self.rest_updates.append(form)
        if form.get("StatusCallback"):  # an update may set it; it then reports `completed` only
            self.status_callback = form["StatusCallback"]
            self.status_events = ["completed"]
        status = form.get("Status")
        if status == "completed" or (status == "canceled" and self.status in ("queued", "initiated", "ringing")):
            self.finish("completed" if self.status == "in-progress" else "canceled")  # callback follows
            return
        if form.get("Twiml"):
            self.run_twiml(form["Twiml"])
        elif form.get("Url"):
            self.run(form["Url"])


SpeechSource = Callable[[str], Awaitable[tuple[bytes, int]]]


async def espeak_speech(text: str) -> tuple[bytes, int]:
    """The caller's voice: espeak-ng PCM16 (22050 Hz)."""
    from media.tts.espeak import EspeakTts

    tts = EspeakTts()
    chunks = [chunk async for chunk in tts.synthesize(text)]
    return b"".join(chunks), tts.sample_rate


class FakeTwilio:
    """Twilio's REST API and call side on 127.0.0.1. `api_base_url` goes into `twilio.apiBaseUrl`."""

    def __init__(self, *, account_sid: str | None = None, auth_token: str | None = None,
                 say_chars_per_second: float = 15.0, speech: SpeechSource = espeak_speech) -> None:
        self.account_sid = account_sid or sid("AC")
        self.auth_token = auth_token or secrets.token_hex(16)
        self.say_chars_per_second = say_chars_per_second
        self.speech = speech
        self.calls: dict[str, FakeCall] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []  # REST: method, path, form
        self.scripts: dict[str, CallerScript] = {}  # by destination number
        self.conferences: dict[str, list[FakeCall]] = {}  # conference name -> calls that joined it
        self.default_script = CallerScript()
        self.fail_next: int | None = None  # answer the next REST request with this HTTP status
        self.session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def api_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeTwilio:
        app = web.Application()
        base = f"{API}/Accounts/{{account}}"
        app.router.add_post(f"{base}/Calls.json", self._create)
        app.router.add_post(f"{base}/Calls/{{call}}.json", self._update)
        app.router.add_get(f"{base}/Calls/{{call}}.json", self._fetch)
        self._runner, self.port = await serve_local(app)
        self.session = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        for call in list(self.calls.values()):
            for stream in call.streams:
                await stream.aclose()
            for task in (call._runner, call._life, call._amd):  # noqa: SLF001
                if task is not None:
                    task.cancel()
        if self.session is not None:
            await self.session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeTwilio:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ webhooks we send

    async def post_webhook(self, call: FakeCall, url: str, params: dict[str, str]) -> Webhook:
        assert self.session is not None
        headers = {"X-Twilio-Signature": twilio_sign(self.auth_token, url, params),
                   "User-Agent": "TwilioProxy/1.1", "I-Twilio-Idempotency-Token": secrets.token_hex(8)}
        try:
            async with self.session.post(url, data=params, headers=headers) as resp:
                hook = Webhook(url, params, resp.status, await resp.text())
        except aiohttp.ClientError as exc:
            hook = Webhook(url, params, 0, f"{type(exc).__name__}: {exc}")
        call.webhooks.append(hook)
        return hook

    async def place_inbound(self, voice_url: str, *, from_: str, to: str, script: CallerScript | None = None,
                            status_callback: str | None = None) -> FakeCall:
        """A person dials the Twilio number whose voice URL is `voice_url`."""
        call = FakeCall(self, direction="inbound", to=to, from_=from_, script=script or CallerScript(),
                        status_callback=status_callback, status_events=["completed"])
        self.calls[call.sid] = call
        call.start_inbound(voice_url)
        return call

    # ------------------------------------------------------------------ REST

    def _check(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if not secrets.compare_digest(auth, expected):
            return _error(401, 20003, "Authenticate")
        if request.match_info["account"] != self.account_sid:
            return _error(404, 20404, "The requested resource was not found")
        if self.fail_next is not None:
            status, self.fail_next = self.fail_next, None
            return _error(status, 20500, "Internal Server Error")
        return None

    async def _form(self, request: web.Request) -> dict[str, list[str]]:
        form: dict[str, list[str]] = {}
        for key, value in (await request.post()).items():
            form.setdefault(key, []).append(str(value))
        self.requests.append((request.method, request.path, form))
        return form

    async def _create(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        refused = self._check(request)
        if refused is not None:
            return refused
        one = {k: v[-1] for k, v in form.items()}
        if not one.get("To"):
            return _error(400, 21201, "No 'To' number is specified")
        if not one.get("From"):
            return _error(400, 21213, "No 'From' number is specified")
        if not one.get("Url") and not one.get("Twiml") and not one.get("ApplicationSid"):
            return _error(400, 21205, "Url parameter is required")
        timeout = int(one.get("Timeout", "60"))
        if not 1 <= timeout <= 600:
            return _error(400, 21216, "Timeout must be between 1 and 600")
        call = FakeCall(self, direction="outbound-api", to=one["To"], from_=one["From"],
                        script=self.scripts.get(one["To"], self.default_script), url=one.get("Url"),
                        twiml=None if one.get("Url") else one.get("Twiml"),
                        status_callback=one.get("StatusCallback"), status_events=form.get("StatusCallbackEvent", []),
                        timeout=timeout, machine_detection=one.get("MachineDetection"),
                        async_amd=one.get("AsyncAmd") == "true", amd_callback=one.get("AsyncAmdStatusCallback"))
        self.calls[call.sid] = call
        call.start_outbound()
        return web.json_response(call.as_json(), status=201)

    def _call_for(self, request: web.Request) -> FakeCall | web.Response:
        """The call the path names, or the error Twilio would answer (auth first, then 404)."""
        refused = self._check(request)
        if refused is not None:
            return refused
        call = self.calls.get(request.match_info["call"])
        return call if call is not None else _error(404, 20404, "The requested resource was not found")

    async def _update(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        call = self._call_for(request)
        if isinstance(call, web.Response):
            return call
        one = {k: v[-1] for k, v in form.items()}
        if call.ended.is_set():
            if "Status" in one:
                return web.json_response(call.as_json())
            return _error(400, 21220, "Call is not in-progress. Cannot redirect.")
        await call.update(one)
        return web.json_response(call.as_json())

    async def _fetch(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, {}))
        call = self._call_for(request)
        return call if isinstance(call, web.Response) else web.json_response(call.as_json())

    def rest(self, method: str, suffix: str = "") -> list[dict[str, list[str]]]:
        """Forms of the REST requests with this method whose path ends with `suffix`."""
        return [form for m, path, form in self.requests if m == method and path.endswith(suffix)]


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message,
                              "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status},
                             status=status)
