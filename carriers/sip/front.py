"""The asyncio edge of the SIP front: one UDP socket, each datagram through `SipFrontCore`, each
result sent on (DNS names resolved with the loop's getaddrinfo, never blocking the loop).

The socket serves both the advertised and the internal address of the core; it may start before
any worker (`core.set_workers` later), answering new calls 503 until then."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from carriers.sip.proxy import Addr, Forward, SipFrontCore

log = logging.getLogger("voicecall.sip")

DNS_TTL_S = 30.0


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, front: SipFront) -> None:
        self.front = front

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.front._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (a peer's port closed) surface here on Linux: not ours to act on.
        log.debug("sip front: socket error: %s", exc)


class SipFront:
    """Serve `core` on a UDP socket bound to `bind` (port 0: any free port)."""

    def __init__(self, core: SipFrontCore, bind: Addr, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = core
        self.bind = bind
        self._clock = clock
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dns: dict[Addr, tuple[tuple[Any, ...], float]] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.bind
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), local_addr=(host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"sip front: cannot bind UDP {host}:{port}: {exc.strerror or exc}") from exc
        self._transport = transport
        core = self.core
        log.info(
            "sip front: listening on UDP %s:%s (advertised %s:%s, internal %s:%s, %d workers)",
            *self.address, *core.advertised, *core.internal, len(core.workers),
        )  # fmt: skip

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    @property
    def address(self) -> Addr:
        if self._transport is None:
            raise RuntimeError("sip front is not started")
        sockname = self._transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    def _received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            source = (str(addr[0]), int(addr[1]))  # IPv6 sockets give (host, port, flowinfo, scope_id)
            forwards = self.core.datagram(data, source, self._clock())
            if log.isEnabledFor(logging.DEBUG):
                log.debug("sip front: %s:%s -> %d datagram(s): %r", *source, len(forwards), data[:2000])
            for forward in forwards:
                self._send(forward)
        except Exception:
            log.exception("sip front: dropped a datagram from %s after an error", addr[:2])

    def _send(self, forward: Forward) -> None:
        transport = self._transport
        if transport is None:
            return
        host, port = forward.to
        try:
            ipaddress.ip_address(host)
        except ValueError:
            task = asyncio.get_running_loop().create_task(self._resolve_and_send(forward))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        transport.sendto(forward.data, (host, port))

    async def _resolve_and_send(self, forward: Forward) -> None:
        try:
            sockaddr = await self._resolve(forward.to)
            if self._transport is not None:
                self._transport.sendto(forward.data, sockaddr)
        except (OSError, ValueError) as exc:  # gaierror; UnicodeError for names IDNA rejects
            log.warning("sip front: cannot send to %s:%s: %s", *forward.to, exc)

    async def _resolve(self, to: Addr) -> tuple[Any, ...]:
        now = self._clock()
        cached = self._dns.get(to)
        if cached is not None and cached[1] > now:
            return cached[0]
        assert self._transport is not None
        family = self._transport.get_extra_info("socket").family
        infos = await asyncio.get_running_loop().getaddrinfo(*to, family=family, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"no address for {to[0]}")
        sockaddr = infos[0][4]
        if len(self._dns) > 1000:
            self._dns.clear()
        self._dns[to] = (sockaddr, now + DNS_TTL_S)
        return sockaddr
