"""One pjsua2 user agent in its own process: a worker of the SIP pool (`sip_pool`).

pjsua is a per-process singleton with a compile-time call table (4 calls in the pjsua2-python wheel),
so the pool runs several of these behind the SIP front. The parent and the worker talk over one
Unix socket pair: length-prefixed messages, JSON for control and notifications, raw PCM for audio.

Wire format (both directions): `kind: u8, length: u32 big-endian, body`.
- kind J: a JSON object.
  parent -> worker: {"init": {...}} first; then {"id": n, "op": "dial"|"call_op"|"dtmf"|"xfer"|"register", ...}
  and {"op": "clear", "leg": n} (no reply).
  worker -> parent: {"ready": {"sip": [host, port], "cap": n}} or {"error": text} once;
  {"reply": n, "error": text|null}; {"note": kind, "pid": id, "data": {...}} for every SIP event
  (e.g. "transfer": {"code", "reason", "final"} for each report on a REFER).
- kind A: `leg: u16` then one 20 ms PCM16 frame at the conference clock rate (audio of one call).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import socket
import struct
import sys
from typing import Any

from carriers.base import CarrierError
from carriers.sip.settings import SipSettings

log = logging.getLogger("voicecall.sip")

HEADER = struct.Struct(">BI")
KIND_JSON = 0x4A
KIND_AUDIO = 0x41
MAX_MESSAGE = 1 << 20
# Audio is dropped (never queued without bound) while the other side has this much unread: it
# stalled, and late audio is useless. Control messages always go through.
AUDIO_BACKLOG_BYTES = 1 << 20
STARTUP_TIMEOUT_S = 20.0


def send_audio(writer: asyncio.StreamWriter, leg: int, payload: bytes) -> bool:
    """Queue one audio frame unless the peer is AUDIO_BACKLOG_BYTES behind; False = dropped."""
    if writer.is_closing() or writer.transport.get_write_buffer_size() > AUDIO_BACKLOG_BYTES:
        return False
    writer.write(pack_audio(leg, payload))
    return True


def pack_json(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(KIND_JSON, len(body)) + body


def pack_audio(leg: int, payload: bytes) -> bytes:
    return HEADER.pack(KIND_AUDIO, len(payload) + 2) + leg.to_bytes(2, "big") + payload


async def read_message(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """The next message, or None at end of stream (the other side closed or died)."""
    try:
        kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
        if length > MAX_MESSAGE:
            raise ValueError(f"sip worker message of {length} bytes")
        return kind, await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def settings_for_wire(settings: SipSettings) -> dict[str, Any]:
    """The settings as JSON, secrets included: they travel over a private socket pair only."""
    data = settings.model_dump(mode="json")
    if settings.account is not None:
        data["account"]["password"] = settings.account.password.get_secret_value()
    return data


class _Uplink:
    """Stands in for the call's MediaPipeline in the worker: received audio goes to the parent."""

    def __init__(self, worker: _Worker, leg: int) -> None:
        self._worker = worker
        self._leg = leg

    def receive(self, payload: bytes, sequence: int | None = None) -> None:
        self._worker.send_audio(self._leg, payload)


class _Worker:
    def __init__(self, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
        self._writer = writer
        self._loop = loop
        self.legs: dict[int, Any] = {}  # leg number -> SipMediaTransport
        self._leg_of: dict[str, int] = {}
        self._next_leg = 0
        self.audio_dropped = 0

    def send(self, message: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(message)

    def send_audio(self, leg: int, payload: bytes) -> None:
        if not send_audio(self._writer, leg, payload):
            self.audio_dropped += 1
            if self.audio_dropped % 500 == 1:
                log.warning("sip worker: the bridge is not reading; %d audio frames dropped", self.audio_dropped)

    def notify(self, kind: str, pid: str, data: dict[str, Any]) -> None:
        """Called on the SIP thread."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._forward_note, kind, pid, data)

    def _forward_note(self, kind: str, pid: str, data: dict[str, Any]) -> None:
        if kind == "media":
            transport = data["transport"]
            self._next_leg = (self._next_leg + 1) % 65536
            leg = self._next_leg
            self.legs[leg] = transport
            self._leg_of[pid] = leg
            transport.bridge = _Uplink(self, leg)
            data = {"leg": leg, "codec": data.get("codec", "")}
        elif kind == "disconnected":
            gone = self._leg_of.pop(pid) if pid in self._leg_of else None
            transport = self.legs.pop(gone, None) if gone is not None else None
            if transport is not None:
                data = {**data, "stats": {"framesOut": transport.frames_out, "underruns": transport.underruns,
                                          "framesDropped": transport.frames_dropped}}
        self.send(pack_json({"note": kind, "pid": pid, "data": data}))

    def reply_when_done(self, request_id: int, future: concurrent.futures.Future[Any]) -> None:
        def done(fut: concurrent.futures.Future[Any]) -> None:
            error = "cancelled" if fut.cancelled() else (None if fut.exception() is None else str(fut.exception()))
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.send, pack_json({"reply": request_id, "error": error}))

        future.add_done_callback(done)


async def serve(sock: socket.socket) -> int:
    from carriers.sip.ua import (  # needs pjsua2: imported only in the worker
        WorkerRole,
        _UserAgent,
    )

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    first = await read_message(reader)
    if first is None or first[0] != KIND_JSON:
        return 2
    init = json.loads(first[1])["init"]
    logging.getLogger("voicecall").setLevel(init.get("logLevel", logging.WARNING))
    settings = SipSettings.model_validate(init["settings"])
    role = WorkerRole(proxy=(init["proxy"][0], int(init["proxy"][1])),
                      contact=(init["contact"][0], int(init["contact"][1])), register=bool(init["register"]))
    worker = _Worker(writer, loop)
    ua = _UserAgent(settings, worker.notify, loop, role)
    ua.start()
    try:
        await asyncio.wrap_future(ua.ready)
    except CarrierError as exc:
        worker.send(pack_json({"error": str(exc)}))
        await writer.drain()
        return 1
    worker.send(pack_json({"ready": {"sip": list(ua.sip_address), "cap": ua.call_cap}}))
    try:
        while (message := await read_message(reader)) is not None:
            kind, body = message
            if kind == KIND_AUDIO:
                transport = worker.legs.get(int.from_bytes(body[:2], "big"))
                if transport is not None:
                    transport.queue_payload(body[2:])
                continue
            request = json.loads(body)
            op = request.get("op")
            if op == "clear":
                transport = worker.legs.get(int(request["leg"]))
                if transport is not None:
                    transport.clear_now()
                continue
            if op == "register":
                worker.reply_when_done(int(request["id"]), ua.submit(ua.start_registration))
                continue
            pid = str(request["pid"])
            if op == "dial":
                fn: Any = functools.partial(ua.dial, pid, str(request["uri"]))
            elif op == "call_op":
                fn = functools.partial(ua.call_op, pid, str(request["what"]), int(request["code"]))
            elif op == "dtmf":
                fn = functools.partial(ua.dial_dtmf, pid, str(request["digits"]))
            elif op == "xfer":
                fn = functools.partial(ua.transfer, pid, str(request["uri"]))
            else:
                worker.send(pack_json({"reply": request.get("id"), "error": f"unknown op {op!r}"}))
                continue
            worker.reply_when_done(int(request["id"]), ua.submit(fn))
    finally:
        # The parent closed the pipe (or died): hang up every call, destroy the library, exit.
        ua.request_stop()
        await asyncio.wrap_future(ua.finished)
        await loop.run_in_executor(None, ua.join, 5.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carriers.sip.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the inherited Unix socket to the parent")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format=f"%(asctime)s sip-worker-{args.index} %(levelname)s %(message)s")
    sock = socket.socket(fileno=args.fd)
    return asyncio.run(serve(sock))


if __name__ == "__main__":
    sys.exit(main())
