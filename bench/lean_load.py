"""A lean Twilio Media Streams load generator: raw asyncio Protocols, no aiohttp on the media sockets.

The bridge sees the same wire traffic as from `tests/fakes/stream_load.py` (the fake Twilio's client):
per stream a SIGNED inbound voice webhook whose TwiML answer gives the `<Stream url>` and token (pipecat:
its `/ws` straight away), then on the same keep-alive connection the WebSocket upgrade, `connected`,
`start` (custom parameters), one `media` frame every 20 ms (tone "speech" changing every frame, stream i
at phase i%4 of the cycle), marks echoed once the audio before them has played, `stop` and a close.
What it saves is CPU, so that on a 2-core machine the generator takes less of the workers' cores.
Two engines: `run_engine` (default in bench/media_streams.py) sets each stream up here and hands its
socket to the C program bench/lean_media.c for the media phase (`build_engine` compiles it on demand);
`run_streams` does everything in Python (the fallback without a C compiler), like this:

- client frames are built from prebuilt pieces: a 4-byte-mask WebSocket header with the masking key 0
  (legal, and the payload goes out as is), the base64 of each distinct caller frame encoded once, only
  sequence number / chunk / timestamp formatted per frame; one `transport.write` per frame;
- ONE timer per phase slot (every 5 ms) writes the frame of every stream due in that slot;
- the receive path walks frame headers only: for a `media` message it finds the base64 payload's
  length (bytes heard = length math, no decode, no json.loads) and records (receive time, cumulative
  byte position); marks, clears and anything else are parsed in full.

Timing uses time.monotonic() (uvloop's loop.time() is in whole milliseconds).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.stream_load import StreamTarget, measure_window, open_ramped, twiml_stream
from tests.fakes.twilio_server import FRAME_MS, sid, twilio_sign

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAYLOAD_KEY = b'"payload"'
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One masked client frame with the masking key 0 (so the 'masked' payload is the payload)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


def b64_len(encoded: int, last: bytes) -> int:
    """Decoded length of `encoded` base64 characters whose last two are `last`."""
    return encoded // 4 * 3 - last.count(b"=")


class HttpError(RuntimeError):
    pass


@dataclass(slots=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_reply(buf: bytearray) -> tuple[HttpReply, int] | None:
    """One complete HTTP/1.1 response at the start of `buf` and its length, or None if more is needed.
    (Content-Length or chunked bodies; a 101 has none.)"""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise HttpError(f"not an HTTP response: {lines[0][:80]!r}") from exc
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    pos = end + 4
    if status == 101 or status == 204 or status == 304:
        return HttpReply(status, headers, b""), pos
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if len(buf) < eol + 2 + size + 2:
                return None
            body += buf[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
            if size == 0:
                return HttpReply(status, headers, bytes(body)), pos
    length = int(headers.get("content-length", "0"))
    if len(buf) < pos + length:
        return None
    return HttpReply(status, headers, bytes(buf[pos:pos + length])), pos + length


class LeanStream(asyncio.Protocol):
    """Twilio's side of one media stream over a raw socket (HTTP first: webhook, then the upgrade).

    Same measurement attributes as `tests.fakes.stream_load.LoadStreamClient`: `sent_at` (send time
    of media frame k at index k), `recv_times` / `recv_ends` (receive time and cumulative byte position
    of each media message heard), `frames_received`, `bad_frames`, `keep_audio` / `heard_ulaw()`."""

    def __init__(self, *, keep_audio: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._http: asyncio.Future[HttpReply] | None = None
        self._ws = False
        self.keep_audio = keep_audio
        self._heard = bytearray()
        self.stream_sid = sid("MZ")
        self.call_sid = sid("CA")
        self.account_sid = sid("AC")
        self._sid_bytes = self.stream_sid.encode()
        self._seq = 1  # the next sequenceNumber (connected has none)
        self._chunk = 0
        self._tail = ('"},"streamSid":"' + self.stream_sid + '"}').encode()  # every media frame ends with it
        self.sent_at: list[float] = []
        self.recv_times: list[float] = []
        self.recv_ends: list[int] = []
        self.heard_bytes = 0
        self.frames_received = 0
        self.bad_frames = 0
        self.marks_echoed: list[str] = []
        self._playout_end = 0.0
        self._pending_marks: list[tuple[str, asyncio.TimerHandle]] = []
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.opened_at = 0.0
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ HTTP phase

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._http is not None and not self._http.done():
            self._http.set_exception(ConnectionError("connection closed before the reply"))
        for _, handle in self._pending_marks:
            handle.cancel()
        self._pending_marks.clear()
        self.transport = None
        self.closed.set()

    async def request(self, raw: bytes, timeout: float = 10.0) -> HttpReply:
        assert self.transport is not None and not self._ws
        self._http = self._loop.create_future()
        self.transport.write(raw)
        async with asyncio.timeout(timeout):
            return await self._http

    def data_received(self, data: bytes) -> None:
        if self._ws:
            self._buf += data
            self._walk(time.monotonic())
            return
        self._buf += data
        try:
            parsed = parse_reply(self._buf)
        except (HttpError, ValueError) as exc:
            if self._http is not None and not self._http.done():
                self._http.set_exception(exc)
            return
        if parsed is None:
            return
        reply, used = parsed
        del self._buf[:used]
        if reply.status == 101:
            self._ws = True
        if self._http is not None and not self._http.done():
            self._http.set_result(reply)
        if self._ws and self._buf:
            self._walk(time.monotonic())

    async def webhook(self, host: str, path: str, params: dict[str, str], auth_token: str, url: str) -> HttpReply:
        body = urllib.parse.urlencode(params).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\nX-Twilio-Signature: {twilio_sign(auth_token, url, params)}\r\n"
                f"I-Twilio-Idempotency-Token: {secrets.token_hex(8)}\r\nConnection: keep-alive\r\n\r\n")
        return await self.request(head.encode() + body)

    async def upgrade(self, host: str, path: str) -> None:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        reply = await self.request((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()  # noqa: S324 - RFC 6455
        if reply.status != 101:
            raise HttpError(f"WebSocket upgrade answered HTTP {reply.status}: {reply.body[:200]!r}")
        if reply.headers.get("sec-websocket-accept") != accept:
            raise HttpError("WebSocket upgrade: wrong Sec-WebSocket-Accept")

    # ------------------------------------------------------------------ WebSocket: send

    def send_json(self, message: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(json.dumps(message, separators=(",", ":")).encode()))

    def start(self, parameters: dict[str, str]) -> None:
        """`connected` + `start`, as Twilio opens a stream; media frames follow from `media_frame`."""
        self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self.send_json({"event": "start", "sequenceNumber": str(self._next_seq()), "start": {
            "accountSid": self.account_sid, "streamSid": self.stream_sid, "callSid": self.call_sid,
            "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": parameters}, "streamSid": self.stream_sid})

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def media_frame(self, payloads: Sequence[bytes], now: float) -> None:
        """Send the next 20 ms frame (the caller's speech cycles through `payloads`, base64 already)."""
        transport = self.transport
        if transport is None:
            return
        chunk = self._chunk
        self._chunk = chunk + 1
        seq = self._seq
        self._seq = seq + 1
        text = (b'{"event":"media","sequenceNumber":"%d","media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"'
                % (seq, chunk + 1, chunk * FRAME_MS)) + payloads[chunk % len(payloads)] + self._tail
        n = len(text)  # always 126..65535 bytes: the 16-bit length form
        transport.write(b"\x81\xfe" + n.to_bytes(2, "big") + b"\x00\x00\x00\x00" + text)
        self.sent_at.append(now)

    async def stop(self, timeout: float = 2.0) -> None:
        """The call ended on Twilio's side: `stop`, a close frame, then wait for the server's close."""
        if self.transport is None:
            return
        self.send_json({"event": "stop", "sequenceNumber": str(self._next_seq()), "streamSid": self.stream_sid,
                        "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame((1000).to_bytes(2, "big"), OP_CLOSE))
        try:
            async with asyncio.timeout(timeout):
                await self.closed.wait()
        except TimeoutError:
            pass
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ WebSocket: receive

    def _walk(self, now: float) -> None:
        buf = self._buf
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            start = pos + 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                start = pos + 10
            if b1 & 0x80:  # a server never masks
                self.bad_frames += 1
                start += 4
            end = start + n
            if end > size:
                break
            opcode = b0 & 0x0F
            if opcode == OP_TEXT and b0 & 0x80:
                self._on_text(buf, start, end, now)
            elif opcode == OP_PING:
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(client_frame(bytes(buf[start:end]), OP_PONG))
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(buf[start:start + 2], "big") if n >= 2 else 1005
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(client_frame(bytes(buf[start:start + 2]), OP_CLOSE))
                    self.transport.close()
            elif opcode != OP_PONG:
                self.bad_frames += 1  # binary or fragmented: Twilio's protocol has neither
            pos = end
        if pos:
            del buf[:pos]

    def _on_text(self, buf: bytearray, start: int, end: int, now: float) -> None:
        key = buf.find(PAYLOAD_KEY, start, end)
        if key >= 0 and buf.find(b'"media"', start, key) >= 0:
            open_quote = buf.find(b'"', key + len(PAYLOAD_KEY), end)
            close_quote = buf.find(b'"', open_quote + 1, end)
            if open_quote < 0 or close_quote < 0 or buf.find(self._sid_bytes, start, end) < 0:
                self.bad_frames += 1
                return
            if self.keep_audio:
                heard = base64.b64decode(bytes(buf[open_quote + 1:close_quote]))
                self._heard += heard
                size = len(heard)
            else:
                size = b64_len(close_quote - open_quote - 1, bytes(buf[close_quote - 2:close_quote]))
            self.frames_received += 1
            self.heard_bytes += size
            self.recv_times.append(now)
            self.recv_ends.append(self.heard_bytes)
            self._playout_end = max(now, self._playout_end) + size / 8000
            return
        try:
            data = json.loads(bytes(buf[start:end]))
            if data.get("streamSid") != self.stream_sid:
                raise ValueError("wrong streamSid")
            event = data["event"]
            if event == "mark":
                self._on_mark(str(data["mark"]["name"]), now)
            elif event == "clear":
                self._on_clear(now)
            else:
                raise ValueError(f"unknown event {event!r}")
        except (ValueError, KeyError, TypeError):
            self.bad_frames += 1

    def _on_mark(self, name: str, now: float) -> None:
        delay = max(0.0, self._playout_end - now)
        self._pending_marks.append((name, self._loop.call_later(delay, self._echo_mark, name)))

    def _echo_mark(self, name: str) -> None:
        self._pending_marks = [(n, h) for n, h in self._pending_marks if n != name]
        self.marks_echoed.append(name)
        self.send_json({"event": "mark", "sequenceNumber": str(self._next_seq()), "streamSid": self.stream_sid,
                        "mark": {"name": name}})

    def _on_clear(self, now: float) -> None:
        self._playout_end = now
        pending, self._pending_marks = self._pending_marks, []
        for name, handle in pending:  # Twilio returns pending marks when the buffer is cleared
            handle.cancel()
            self._echo_mark(name)

    def heard_ulaw(self) -> bytes:
        return bytes(self._heard)


# ---------------------------------------------------------------------- opening one stream


def _host_port_path(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    return parts.hostname or "127.0.0.1", port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


async def _connect(host: str, port: int, keep_audio: bool) -> LeanStream:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(lambda: LeanStream(keep_audio=keep_audio), host, port)
    sock = transport.get_extra_info("socket")
    if sock is not None:  # small frames on a fixed cadence: never wait for an ACK to coalesce them (Nagle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return proto


async def open_stream(target: dict[str, Any], *, keep_audio: bool = False) -> LeanStream:
    """One stream the way Twilio opens it: a signed inbound webhook (mode `twilio-webhook`), then the
    upgrade to the `<Stream url>` on the same connection (mode `direct`: straight to `url`)."""
    if target["mode"] == "direct":
        host, port, path = _host_port_path(target["url"])
        stream = await _connect(host, port, keep_audio)
        parameters: dict[str, str] = {}
    else:
        voice_url = target["voice_url"]
        host, port, path = _host_port_path(voice_url)
        stream = await _connect(host, port, keep_audio)
        params = {"AccountSid": target["account_sid"], "ApiVersion": "2010-04-01", "CallSid": stream.call_sid,
                  "CallStatus": "ringing", "Direction": "inbound", "From": "+15550009999", "To": "+15550001234",
                  "Caller": "+15550009999", "Called": "+15550001234"}
        stream.account_sid = target["account_sid"]
        reply = await stream.webhook(f"{host}:{port}", path, params, target["auth_token"], voice_url)
        if reply.status != 200:
            if stream.transport is not None:
                stream.transport.close()
            raise HttpError(f"inbound webhook answered HTTP {reply.status}: {reply.body[:200]!r}")
        found: StreamTarget = twiml_stream(reply.body.decode())
        parameters = found.parameters
        s_host, s_port, path = _host_port_path(found.url)
        if (s_host, s_port) != (host, port) or reply.headers.get("connection", "").lower() == "close":
            if stream.transport is not None:
                stream.transport.close()
            host, port = s_host, s_port
            stream = await _connect(host, port, keep_audio)
            stream.call_sid, stream.account_sid = params["CallSid"], target["account_sid"]
    await stream.upgrade(f"{host}:{port}", path)
    stream.start(parameters)
    return stream


# ---------------------------------------------------------------------- N streams on one metronome


@dataclass(slots=True)
class LeanRun:
    clients: list[LeanStream]
    failed: list[str]
    window: tuple[float, float]  # time.monotonic(): measurement starts once all streams are up
    tick_lag_ms: list[float] = field(default_factory=list)
    tick_ms: list[float] = field(default_factory=list)


async def run_streams(target: dict[str, Any], n: int, *, seconds: float, frames: Sequence[bytes],
                      ramp_per_s: float = 100.0, warmup_s: float = 1.0, drain_s: float = 1.5, tail_s: float = 0.5,
                      connect_concurrency: int = 4, keep_audio_first: bool = False, phases: int = 4,
                      on_window: Callable[[str], None] | None = None) -> LeanRun:
    """Same schedule as `tests.fakes.stream_load.run_streams`: open `n` streams at `ramp_per_s`, send
    from one metronome (one timer per phase slot: every 20/`phases` ms the frames of every `phases`-th
    stream), measure `seconds` after `warmup_s`, keep sending `tail_s`, stop, wait `drain_s` for echoes."""
    loop = asyncio.get_running_loop()
    payloads = [base64.b64encode(f) for f in frames]
    slots: list[list[LeanStream]] = [[] for _ in range(phases)]
    clients: list[LeanStream] = []
    failed: list[str] = []
    sem = asyncio.Semaphore(connect_concurrency)
    run = LeanRun(clients, failed, (0.0, 0.0))
    step = FRAME_MS / 1000 / phases
    clock = {"start": time.monotonic(), "k": 0}
    stopped = False

    def tick() -> None:
        if stopped:
            return
        began = time.monotonic()
        k = clock["k"]
        run.tick_lag_ms.append((began - (clock["start"] + k * step)) * 1000)
        for stream in slots[k % phases]:
            stream.media_frame(payloads, began)
        run.tick_ms.append((time.monotonic() - began) * 1000)
        k += 1
        delay = clock["start"] + k * step - time.monotonic()
        if delay < -0.2:  # hopelessly behind: re-base rather than burst
            clock["start"], k, delay = time.monotonic(), 0, 0.0
        clock["k"] = k
        loop.call_later(max(0.0, delay), tick)

    async def open_one(i: int) -> None:
        async with sem:
            try:
                async with asyncio.timeout(10):
                    stream = await open_stream(target, keep_audio=keep_audio_first and i == 0)
                stream.opened_at = time.monotonic()
                clients.append(stream)
                slots[(len(clients) - 1) % phases].append(stream)  # the metronome picks it up at its slot
            except Exception as exc:  # noqa: BLE001 - a benchmark counts failures, it does not stop on one
                failed.append(f"{type(exc).__name__}: {exc}"[:200])

    loop.call_soon(tick)
    try:
        await open_ramped(n, ramp_per_s, open_one)
        await asyncio.sleep(warmup_s)
        lag_mark = len(run.tick_lag_ms)
        run.window = await measure_window(seconds, on_window, time.monotonic)
        del run.tick_lag_ms[:lag_mark], run.tick_ms[:lag_mark]
        await asyncio.sleep(tail_s)  # the window's last frames sit in the resamplers until more audio comes
        stopped = True
        await asyncio.sleep(drain_s)
    finally:
        stopped = True
        await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
    return run


# ---------------------------------------------------------------------- the media phase in C (bench/lean_media.c)

ENGINE_SOURCE = Path(__file__).resolve().parent / "lean_media.c"


def build_engine(log: Callable[[str], None]) -> Path | None:
    """Compile bench/lean_media.c once per source version (into the temp dir); None, said in one line,
    when there is no C compiler or the build fails (the caller then runs the Python generator)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log("lean generator: no C compiler (cc/gcc) found: using the Python one (costs ~2x the CPU per stream)")
        return None
    digest = hashlib.sha256(ENGINE_SOURCE.read_bytes()).hexdigest()[:12]
    binary = Path(tempfile.gettempdir()) / f"voicecall-lean-media-{digest}"
    if binary.exists():
        return binary
    partial = binary.with_suffix(f".{os.getpid()}")
    proc = subprocess.run([compiler, "-O2", "-o", str(partial), str(ENGINE_SOURCE)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        log(f"lean generator: building {ENGINE_SOURCE.name} failed ({proc.stderr.strip()[:300]}): using the Python one")
        return None
    partial.replace(binary)
    return binary


def _raise_priority() -> None:
    """Twilio's clock is not delayed by the bridge's CPU: where allowed (root), the engine runs at nice -10,
    so on a core it shares with a worker its 5 ms ticks preempt the worker (it needs ~0.1% of a core per stream)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass


@dataclass(slots=True)
class EngineStream:
    """One stream's record from the C engine: the same measurement attributes as `LeanStream`."""

    stream_sid: str
    keep_audio: bool
    bad_frames: int = 0
    frames_received: int = 0
    close_code: int = 0
    marks_echoed: int = 0
    sent_at: list[float] = field(default_factory=list)
    recv_times: list[float] = field(default_factory=list)
    recv_ends: list[int] = field(default_factory=list)
    heard: bytes = b""
    opened_at: float = 0.0

    def heard_ulaw(self) -> bytes:
        return self.heard


def read_results(data: bytes) -> list[EngineStream]:
    """The engine's results file (layout in bench/lean_media.c)."""
    (count,), pos = struct.unpack_from("<I", data), 4
    out = []
    for _ in range(count):
        (sid_len,) = struct.unpack_from("<I", data, pos)
        pos += 4
        sid_text = data[pos:pos + sid_len].decode()
        pos += sid_len
        bad, media, close_code, marks = struct.unpack_from("<4q", data, pos)
        pos += 32
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        sent = array("d", data[pos:pos + 8 * n]).tolist()
        pos += 8 * n
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        pairs = struct.unpack_from(f"<{2 * n}d", data, pos) if n else ()
        ends = struct.unpack_from(f"<{2 * n}q", data, pos) if n else ()
        pos += 16 * n
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        heard = data[pos:pos + n]
        pos += n
        out.append(EngineStream(sid_text, bool(heard), bad, media, close_code, marks, sent, list(pairs[0::2]),
                                list(ends[1::2]), heard))
    return out


async def setup_socket(target: dict[str, Any], loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, LeanStream]:
    """Set a stream up in Python (webhook, upgrade, `connected` + `start`) on a plain socket the engine can take."""
    stream = await open_stream(target)
    transport = stream.transport
    assert transport is not None
    transport.pause_reading()
    if stream._buf:  # the server spoke before the first media frame: nothing in Twilio's protocol does
        stream.bad_frames += 1
    sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    transport.abort()
    return sock, stream


async def run_engine(engine: Path, target: dict[str, Any], n: int, *, seconds: float, frames: Sequence[bytes],
                     ramp_per_s: float = 100.0, warmup_s: float = 1.0, drain_s: float = 1.5, tail_s: float = 0.5,
                     connect_concurrency: int = 4, keep_audio_first: bool = False, phases: int = 4,
                     on_window: Callable[[str], None] | None = None, on_engine: Callable[[int], None] | None = None,
                     ) -> LeanRun:
    """`run_streams` with the media phase in the C engine: Python opens each stream (same schedule), then
    hands its socket over; the engine sends, receives, records, and writes its results at the end."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with tempfile.TemporaryDirectory(prefix="lean-media-") as tmp:
        payload_file = Path(tmp) / "payloads.txt"
        payload_file.write_bytes(b"\n".join(base64.b64encode(f) for f in frames) + b"\n")
        proc = subprocess.Popen([str(engine), str(theirs.fileno()), str(payload_file), str(phases)],
                                pass_fds=[theirs.fileno()], preexec_fn=_raise_priority)  # noqa: PLW1509
        theirs.close()
        if on_engine:
            on_engine(proc.pid)
        added: list[LeanStream] = []
        failed: list[str] = []
        sem = asyncio.Semaphore(connect_concurrency)
        run = LeanRun([], failed, (0.0, 0.0))

        async def open_one(i: int) -> None:
            async with sem:
                try:
                    async with asyncio.timeout(10):
                        sock, stream = await setup_socket(target, loop)
                    keep = int(keep_audio_first and i == 0)
                    socket.send_fds(ours, [f"ADD {stream.stream_sid} {keep} {stream.call_sid} {stream.account_sid}".encode()],
                                    [sock.fileno()])
                    sock.close()
                    stream.opened_at = time.monotonic()
                    added.append(stream)
                except Exception as exc:  # noqa: BLE001 - a benchmark counts failures, it does not stop on one
                    failed.append(f"{type(exc).__name__}: {exc}"[:200])

        try:
            await open_ramped(n, ramp_per_s, open_one)
            await asyncio.sleep(warmup_s)
            run.window = await measure_window(seconds, on_window, time.monotonic)
            await asyncio.sleep(tail_s)
            ours.send(b"STOP")
            await asyncio.sleep(drain_s)
            out = Path(tmp) / "results.bin"
            ours.send(f"END {out}".encode())
            code = await loop.run_in_executor(None, proc.wait, 10)
            if code != 0 or not out.exists():
                raise RuntimeError(f"lean_media exited with {code} and no results")
            results = read_results(out.read_bytes())
        finally:
            ours.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    by_sid = {s.stream_sid: s for s in added}
    for rec in results:
        setup = by_sid.get(rec.stream_sid)
        if setup is not None:
            rec.opened_at = setup.opened_at
            rec.bad_frames += setup.bad_frames
    run.clients = results  # type: ignore[assignment]  # same measurement attributes as LeanStream
    return run
