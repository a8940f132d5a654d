"""More SIP calls than one pjsua process holds: worker processes behind one SIP front.

pjsua keeps calls in a compile-time table (PJSUA_MAX_CALLS, 4 in the pjsua2-python wheel) and is a
per-process singleton. With `sip.workers` > 1 the carrier starts that many `sip.worker` processes,
each a full user agent on a private loopback SIP port, and serves the public SIP port with the
stateless record-routing proxy of `sip_front`: new INVITEs go to the least-loaded worker, in-dialog
requests follow the Record-Route, and RTP flows straight between the peer and the worker.

`WorkerUa` drives one worker process with the same interface as `ua.LocalUa`; `UaPool` holds
the user agents and decides where each call goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from carriers.base import CarrierError
from carriers.sip.media import LegCounters
from carriers.sip.settings import SipSettings
from carriers.sip.worker import (
    KIND_AUDIO,
    KIND_JSON,
    STARTUP_TIMEOUT_S,
    pack_json,
    read_message,
    send_audio,
    settings_for_wire,
)
from media.formats import AudioEncoding, AudioFormat

if TYPE_CHECKING:
    from media.pipeline import MediaPipeline

log = logging.getLogger("voicecall.sip")

Notify = Any  # Callable[[str, str, dict[str, Any]], None], called on the loop
REQUEST_TIMEOUT_S = 10.0
RESERVATION_S = 10.0  # a worker picked for an INVITE counts that call until it reports it (or this passes)
_ROOT = Path(__file__).resolve().parent.parent


class UserAgent(Protocol):
    """What the carrier needs from a user agent, in this process or in a worker."""

    @property
    def capacity(self) -> int: ...

    @property
    def sip_address(self) -> tuple[str, int]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def dial(self, pid: str, uri: str) -> None: ...

    async def call_op(self, pid: str, op: str, code: int) -> None: ...

    async def dial_dtmf(self, pid: str, digits: str) -> None: ...

    async def transfer(self, pid: str, uri: str) -> None: ...


class RemoteMediaTransport(LegCounters):
    """A call's audio leg in a worker process, as the MediaPipeline here sees it (a MediaTransport).
    frames_out, underruns and frames_dropped are the worker's, filled in when the call ends."""

    supports_marks = False  # like the in-process leg: the bridge trusts its own pacing clock

    def __init__(self, worker: WorkerUa, leg: int, fmt: AudioFormat) -> None:
        super().__init__(fmt.frame_bytes)
        self.format = fmt
        self.bridge: MediaPipeline | None = None
        self._worker = worker
        self._leg = leg

    async def send_media(self, payload: bytes) -> None:
        self.send_media_now(payload)

    def send_media_now(self, payload: bytes) -> bool:
        """The same, without a coroutine (the pacing wheel's path): a write to the worker never waits."""
        if not self.closed:
            self._worker.send_audio(self._leg, payload)
        return True

    async def send_mark(self, name: str) -> None:
        return None

    async def send_clear(self) -> None:
        if not self.closed:
            self._worker.send(pack_json({"op": "clear", "leg": self._leg}))

    def deliver(self, payload: bytes) -> None:
        if self.closed:
            return
        self.count_in(payload)
        if self.bridge is not None:
            self.bridge.receive(payload)


class WorkerUa:
    """One `sip.worker` process: started with its settings over a socket pair, driven by requests."""

    def __init__(
        self, index: int, settings: SipSettings, front: FrontAddresses, register: bool, notify: Notify
    ) -> None:
        self.index = index
        self._settings = settings
        self._front = front
        self._register = register
        self._notify = notify
        self._format = AudioFormat(AudioEncoding.L16, settings.clockRate)
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._requests: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)
        self._legs: dict[int, RemoteMediaTransport] = {}  # the worker's leg number -> transport
        self._leg_of: dict[str, int] = {}  # provider call id -> leg number
        self._live: set[str] = set()  # provider call ids this worker reported and has not ended
        self._closing = False
        self._lost_pipe = False
        self.audio_dropped = 0  # frames not sent because the worker stopped reading
        self._capacity = 0
        self._sip_address = ("127.0.0.1", 0)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def sip_address(self) -> tuple[str, int]:
        return self._sip_address

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and not (self._closing or self._lost_pipe)

    async def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "carriers.sip.worker", "--fd", str(child.fileno()), "--index", str(self.index),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL, cwd=_ROOT,
                stdout=asyncio.subprocess.DEVNULL,  # pjlib prints a banner there; our logs go to stderr
            )
        finally:
            child.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        self.send(pack_json({"init": {
            "settings": settings_for_wire(self._settings), "proxy": list(self._front.internal),
            "contact": list(self._front.public), "register": self._register,
            "logLevel": logging.getLogger("voicecall").getEffectiveLevel(),
        }}))
        try:
            first = await asyncio.wait_for(read_message(reader), STARTUP_TIMEOUT_S)
        except TimeoutError:
            first = None
        reply = json.loads(first[1]) if first is not None and first[0] == KIND_JSON else {}
        if "ready" not in reply:
            self._writer.close()
            await self._stop_process()
            raise CarrierError(f"sip: worker {self.index} failed to start: {reply.get('error', 'no answer')}")
        host, port = reply["ready"]["sip"]
        self._sip_address = (str(host), int(port))
        self._capacity = int(reply["ready"]["cap"])
        self._reader_task = asyncio.ensure_future(self._read(reader))

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None and not self._writer.is_closing():
            # Half-close: the worker sees end of stream, hangs up its calls (their notes still
            # reach us on the open read side) and exits.
            with contextlib.suppress(OSError):
                self._writer.write_eof()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader_task), 10)
        await self._stop_process()
        if self._writer is not None:
            self._writer.close()

    async def _stop_process(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            log.warning("sip: worker %d did not exit; killing it", self.index)
            proc.kill()
            await proc.wait()

    def send(self, message: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(message)

    def send_audio(self, leg: int, payload: bytes) -> None:
        if self._writer is not None and not send_audio(self._writer, leg, payload):
            self.audio_dropped += 1
            if self.audio_dropped % 500 == 1:
                log.warning("sip: worker %d is not reading; %d audio frames dropped", self.index, self.audio_dropped)

    async def dial(self, pid: str, uri: str) -> None:
        self._live.add(pid)
        try:
            await self._request("dial", pid=pid, uri=uri)
        except CarrierError:
            self._live.discard(pid)
            raise

    async def call_op(self, pid: str, op: str, code: int) -> None:
        await self._request("call_op", pid=pid, what=op, code=code)

    async def dial_dtmf(self, pid: str, digits: str) -> None:
        await self._request("dtmf", pid=pid, digits=digits)

    async def transfer(self, pid: str, uri: str) -> None:
        await self._request("xfer", pid=pid, uri=uri)

    async def start_registration(self) -> None:
        """The registering worker sends its REGISTER once the front routes for it."""
        if self._register:
            await self._request("register")

    async def _request(self, op: str, **fields: Any) -> None:
        if not self.alive:
            raise CarrierError(f"sip: worker {self.index} is not running")
        request_id = next(self._ids)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        self.send(pack_json({"id": request_id, "op": op, **fields}))
        try:
            await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
        except TimeoutError:
            raise CarrierError(f"sip: worker {self.index} did not answer {op}") from None
        finally:
            self._requests.pop(request_id, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await read_message(reader)) is not None:
                kind, body = message
                if kind == KIND_AUDIO:
                    leg = self._legs.get(int.from_bytes(body[:2], "big"))
                    if leg is not None:
                        leg.deliver(body[2:])
                elif kind == KIND_JSON:
                    self._on_json(json.loads(body))
        except Exception:
            log.exception("sip: reading from worker %d failed", self.index)
        finally:
            self._lost()

    def _on_json(self, message: dict[str, Any]) -> None:
        if "reply" in message:
            future = self._requests.get(int(message["reply"]))
            if future is not None and not future.done():
                error = message.get("error")
                if error:
                    future.set_exception(CarrierError(str(error)))
                else:
                    future.set_result(None)
            return
        kind, pid, data = str(message["note"]), str(message["pid"]), dict(message["data"])
        if kind == "incoming":
            self._live.add(pid)
        elif kind == "media":
            leg = int(data["leg"])
            transport = RemoteMediaTransport(self, leg, self._format)
            self._legs[leg] = transport
            self._leg_of[pid] = leg
            data = {"transport": transport, "codec": data.get("codec", "")}
        elif kind == "disconnected":
            self._live.discard(pid)
            stats = data.pop("stats", None) or {}
            leg_no = self._leg_of.pop(pid, None)
            ended = self._legs.pop(leg_no, None) if leg_no is not None else None
            if ended is not None:
                ended.frames_out = int(stats.get("framesOut", 0))
                ended.underruns = int(stats.get("underruns", 0))
                ended.frames_dropped = int(stats.get("framesDropped", 0))
                ended.closed = True
        self._notify(kind, pid, data)

    def _lost(self) -> None:
        """The worker's pipe ended: fail what waits on it, and end its calls if it died."""
        self._lost_pipe = True
        for future in self._requests.values():
            if not future.done():
                future.set_exception(CarrierError(f"sip: worker {self.index} stopped"))
        for transport in self._legs.values():
            transport.closed = True
        self._legs.clear()
        self._leg_of.clear()
        if not self._closing:
            log.error("sip: worker %d exited unexpectedly; its %d calls are lost", self.index, len(self._live))
            for pid in sorted(self._live):
                self._notify("failed", pid, {"reason": f"SIP worker {self.index} stopped"})
            self._notify("worker_lost", "", {"index": self.index})
        self._live.clear()


@dataclass
class UaPool:
    """The user agents of one carrier and the calls on each: where a new call goes."""

    agents: list[Any] = field(default_factory=list)
    _calls: dict[str, Any] = field(default_factory=dict)  # provider call id -> its user agent
    _reserved: dict[str, tuple[Any, float]] = field(default_factory=dict)  # Call-ID -> (agent, deadline)
    peak_total: int = 0  # most calls held at once, all agents
    peaks: dict[int, int] = field(default_factory=dict)  # id(agent) -> most calls it held at once

    def load(self, agent: Any, now: float) -> int:
        return sum(1 for a in self._calls.values() if a is agent) + sum(
            1 for a, deadline in self._reserved.values() if a is agent and deadline > now
        )

    def pick(self, now: float) -> Any | None:
        """The least-loaded running agent with room for one more call (ties: the first)."""
        self._reserved = {k: v for k, v in self._reserved.items() if v[1] > now}
        best, best_load = None, 0
        for agent in self.agents:
            if not getattr(agent, "alive", True):
                continue
            load = self.load(agent, now)
            if load < agent.capacity and (best is None or load < best_load):
                best, best_load = agent, load
        return best

    def reserve(self, call_id: str, now: float) -> Any | None:
        """Choose the agent for an INVITE the front is about to forward; the call counts at once."""
        agent = self.pick(now)
        if agent is not None:
            self._reserved[call_id] = (agent, now + RESERVATION_S)
        return agent

    def bind(self, pid: str, agent: Any) -> None:
        self._reserved.pop(pid, None)
        self._calls[pid] = agent
        self.peak_total = max(self.peak_total, len(self._calls))
        held = sum(1 for a in self._calls.values() if a is agent)
        self.peaks[id(agent)] = max(self.peaks.get(id(agent), 0), held)

    def agent_of(self, pid: str) -> Any | None:
        return self._calls.get(pid)

    def release(self, pid: str) -> None:
        self._calls.pop(pid, None)
        self._reserved.pop(pid, None)

    def describe(self, now: float) -> list[dict[str, Any]]:
        return [
            {"sip": "{}:{}".format(*agent.sip_address), "calls": self.load(agent, now), "capacity": agent.capacity}
            for agent in self.agents
        ]


@dataclass(frozen=True, slots=True)
class FrontAddresses:
    """Where the world reaches the SIP front (Via, Record-Route, the registered Contact) and where
    the workers on this host do (their outbound proxy): a public address may not hairpin."""

    public: tuple[str, int]
    internal: tuple[str, int]

    @classmethod
    def for_settings(cls, settings: SipSettings) -> FrontAddresses:
        bind = settings.bindAddress
        internal_host = "127.0.0.1" if bind in ("0.0.0.0", "", "127.0.0.1") else bind
        return cls(public=(_public_host(settings), settings.port), internal=(internal_host, settings.port))


def _public_host(settings: SipSettings) -> str:
    """publicAddress, else the bind address, else (bound to all interfaces) the address of the
    interface that routes outward."""
    if settings.publicAddress:
        return settings.publicAddress
    if settings.bindAddress not in ("0.0.0.0", ""):
        return settings.bindAddress
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only asks the routing table
        return str(probe.getsockname()[0])
    return "127.0.0.1"
