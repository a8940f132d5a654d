"""A bare RTP receiver for tests that stand in for a call's far end, and RFC 4733 telephone-event
decoding of what it caught (the digits a carrier sent as keys out)."""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass
from typing import Any, cast

# RFC 4733 section 3.2: events 0-9, then * # A B C D.
EVENT_DIGITS = "0123456789*#ABCD"


@dataclass(frozen=True, slots=True)
class RtpPacket:
    at: float  # arrival, time.monotonic()
    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class KeyPress:
    """One telephone event as received: all its packets share one RTP timestamp."""

    digit: str
    started_at: float  # arrival of its first packet
    duration: int  # the largest duration field seen, in timestamp units (8 kHz: 8 per ms)
    ended: bool  # an end-bit packet arrived
    marked: bool  # its first packet carried the RTP marker
    volume: int


class RtpSink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[RtpPacket] = []
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, port: int) -> RtpSink:
        sink = cls()
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: sink, local_addr=("127.0.0.1", port))
        return sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        b0, b1, seq, ts, _ssrc = struct.unpack_from("!BBHII", data)
        self.packets.append(RtpPacket(time.monotonic(), b1 & 0x7F, bool(b1 & 0x80), seq, ts,
                                      data[12 + 4 * (b0 & 0x0F):]))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def key_presses(self, payload_type: int) -> list[KeyPress]:
        return key_presses([p for p in self.packets if p.payload_type == payload_type])


def key_presses(packets: list[RtpPacket]) -> list[KeyPress]:
    """Telephone events in arrival order (retransmitted end packets fold into their event)."""
    events: dict[int, list[RtpPacket]] = {}
    for packet in packets:
        if len(packet.payload) >= 4:
            events.setdefault(packet.timestamp, []).append(packet)
    presses = []
    for group in events.values():
        event, flags, _ = struct.unpack_from("!BBH", group[0].payload)
        durations = [struct.unpack_from("!H", p.payload, 2)[0] for p in group]
        presses.append(KeyPress(
            digit=EVENT_DIGITS[event] if event < len(EVENT_DIGITS) else f"?{event}",
            started_at=group[0].at, duration=max(durations),
            ended=any(p.payload[1] & 0x80 for p in group), marked=group[0].marker, volume=flags & 0x3F,
        ))
    return presses
