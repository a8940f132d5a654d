"""RTP (RFC 3550) for one Asterisk ExternalMedia leg: a sans-I/O packet core and a thin UDP edge.

Core (no I/O): `build_packet` / `parse_packet`, `RtpSender` (sequence, timestamp, marker of our
stream), `SequenceExtender` (16-bit sequence numbers -> a counter that does not wrap, as the
MediaPipeline's reorder buffer wants) and `WireCodec` (payload type and byte order per format).

Edge: `RtpTransport`, one UDP socket per call. It is the call's `MediaTransport`: frames the
MediaPipeline sends are queued and sent on a 20 ms clock (the bridge runs a few frames ahead, RTP
wants one packet per packet time); packets received are parsed and handed to the bridge with
their sequence number. Malformed packets are counted and dropped, never raised.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import secrets
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from media.formats import ALAW_8K, FRAME_MS, ULAW_8K, AudioEncoding, AudioFormat

if TYPE_CHECKING:
    from media.pipeline import MediaPipeline

log = logging.getLogger("voicecall.asterisk.rtp")

RTP_VERSION = 2
HEADER = struct.Struct("!BBHII")
PT_PCMU = 0
PT_PCMA = 8
# Asterisk's rtp_engine maps slin16 to payload type 118 (its "16 kHz signed linear").
PT_SLIN16 = 118
MAX_QUEUED_FRAMES = 50  # 1 s of outbound audio; the oldest frame is dropped beyond this


class RtpError(ValueError):
    """A datagram that is not a valid RTP packet."""


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False


def build_packet(payload_type: int, sequence: int, timestamp: int, ssrc: int, payload: bytes,
                 *, marker: bool = False) -> bytes:
    """A version 2 RTP packet without padding, extension or CSRCs."""
    if not 0 <= payload_type <= 127:
        raise ValueError(f"payload type must be 0..127 (got {payload_type})")
    second = (0x80 if marker else 0) | payload_type
    header = HEADER.pack(RTP_VERSION << 6, second, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc & 0xFFFFFFFF)
    return header + payload


def parse_packet(data: bytes) -> RtpPacket:
    """Parse one datagram; raise RtpError if it is not a well-formed RTP packet."""
    if len(data) < HEADER.size:
        raise RtpError(f"too short for an RTP header ({len(data)} bytes)")
    first, second, sequence, timestamp, ssrc = HEADER.unpack_from(data)
    if first >> 6 != RTP_VERSION:
        raise RtpError(f"RTP version {first >> 6}, expected 2")
    payload_type = second & 0x7F
    if second & 0x80 and 72 <= payload_type <= 76:  # RTCP packet types 200-204 (RFC 5761)
        raise RtpError("an RTCP packet, not RTP")
    start = HEADER.size + 4 * (first & 0x0F)  # CSRC list
    if len(data) < start:
        raise RtpError("CSRC list longer than the packet")
    if first & 0x10:  # header extension: 16-bit profile, 16-bit length in 32-bit words
        if len(data) < start + 4:
            raise RtpError("header extension cut short")
        (words,) = struct.unpack_from("!H", data, start + 2)
        start += 4 + 4 * words
        if len(data) < start:
            raise RtpError("header extension longer than the packet")
    end = len(data)
    if first & 0x20:  # padding: the last byte counts the padding bytes, itself included
        pad = data[-1]
        if pad == 0 or pad > end - start:
            raise RtpError(f"bad padding count {pad}")
        end -= pad
    return RtpPacket(payload_type, sequence, timestamp, ssrc, bytes(data[start:end]), bool(second & 0x80))


class RtpSender:
    """Sequence, timestamp and marker of the stream we send (random initial values, RFC 3550 5.1)."""

    def __init__(self, payload_type: int, samples_per_frame: int, *, ssrc: int | None = None,
                 sequence: int | None = None, timestamp: int | None = None) -> None:
        self.payload_type = payload_type
        self.samples_per_frame = samples_per_frame
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self.sequence = random.getrandbits(16) if sequence is None else sequence
        self.timestamp = random.getrandbits(32) if timestamp is None else timestamp
        self._talkspurt = True  # the first packet carries the marker bit
        self.packets = 0

    def packet(self, payload: bytes) -> bytes:
        data = build_packet(self.payload_type, self.sequence, self.timestamp, self.ssrc, payload,
                            marker=self._talkspurt)
        self._talkspurt = False
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.timestamp = (self.timestamp + self.samples_per_frame) & 0xFFFFFFFF
        self.packets += 1
        return data

    def skip(self, frames: int) -> None:
        """`frames` packet times passed without sending: the timestamp moves on, the next packet
        starts a talkspurt (marker bit)."""
        if frames > 0:
            self.timestamp = (self.timestamp + frames * self.samples_per_frame) & 0xFFFFFFFF
            self._talkspurt = True


class SequenceExtender:
    """16-bit RTP sequence numbers -> a counter that keeps counting across wrap-around. A new SSRC
    continues right after the highest number so far, so a change of source is no gap."""

    def __init__(self) -> None:
        self._ssrc: int | None = None
        self._last: int | None = None  # highest 16-bit number seen from this SSRC
        self._highest = 0  # its extended value

    def extend(self, ssrc: int, sequence: int) -> int:
        if self._last is None or ssrc != self._ssrc:
            if self._last is not None:
                self._highest += 1
            self._ssrc, self._last = ssrc, sequence
            return self._highest
        delta = ((sequence - self._last + 0x8000) & 0xFFFF) - 0x8000  # signed, -32768..32767
        value = self._highest + delta
        if delta > 0:
            self._highest, self._last = value, sequence
        return value


@dataclass(frozen=True, slots=True)
class WireCodec:
    """One ExternalMedia `format`: its audio format, RTP payload type and wire byte order."""

    name: str
    format: AudioFormat
    payload_type: int
    big_endian: bool = False  # L16 travels in network byte order (RFC 3551), the bridge wants host order

    @property
    def samples_per_frame(self) -> int:
        return self.format.rate * FRAME_MS // 1000

    def to_wire(self, payload: bytes) -> bytes:
        return _swap16(payload) if self._swap else payload

    def from_wire(self, payload: bytes) -> bytes:
        if self.format.encoding is AudioEncoding.L16 and len(payload) % 2:
            raise RtpError("odd-length 16-bit linear payload")
        return _swap16(payload) if self._swap else payload

    @property
    def _swap(self) -> bool:
        return self.big_endian and sys.byteorder == "little"


CODECS: dict[str, WireCodec] = {
    "ulaw": WireCodec("ulaw", ULAW_8K, PT_PCMU),
    "alaw": WireCodec("alaw", ALAW_8K, PT_PCMA),
    "slin16": WireCodec("slin16", AudioFormat(AudioEncoding.L16, 16000), PT_SLIN16, big_endian=True),
}


def _swap16(payload: bytes) -> bytes:
    samples = array("h")
    samples.frombytes(payload)
    samples.byteswap()
    return samples.tobytes()


# ----------------------------------------------------------------------------- the UDP edge


@dataclass(slots=True)
class RtpCounters:
    packets_in: int = 0
    packets_out: int = 0
    malformed: int = 0  # not RTP, or a payload the codec cannot take
    wrong_payload_type: int = 0  # e.g. comfort noise or telephone-event: not audio of our format
    foreign: int = 0  # from another address than the latched peer
    dropped_no_peer: int = 0  # frames we had to send before knowing where to
    dropped_overflow: int = 0  # frames pushed out of a full send queue


class RtpTransport(asyncio.DatagramProtocol):
    """One call's ExternalMedia leg over UDP, as a MediaPipeline sees it (`media.transport.MediaTransport`).

    The peer is set from the externalMedia channel's UNICASTRTP_LOCAL_ADDRESS/PORT and re-latched
    once to the source of the first packet received (symmetric RTP: the address Asterisk really
    sends from wins over the one it announced); after that, other sources are ignored.
    """

    def __init__(self, codec: WireCodec) -> None:
        self.codec = codec
        self.format = codec.format
        self.supports_marks = False  # RTP cannot echo marks: the bridge trusts its pacing clock
        self.bridge: MediaPipeline | None = None
        self.counters = RtpCounters()
        self.peer: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.closed = False
        self._latched = False
        self._sender = RtpSender(codec.payload_type, codec.samples_per_frame)
        self._extender = SequenceExtender()
        self._queue: collections.deque[bytes] = collections.deque()
        self._transport: asyncio.DatagramTransport | None = None
        self._pump: asyncio.Task[None] | None = None
        self._last_sent_at: float | None = None

    # -- lifecycle
    @classmethod
    async def open(cls, codec: WireCodec, host: str, port_start: int, port_range: int,
                   taken: set[int] | None = None) -> RtpTransport:
        """Bind a UDP port in [port_start, port_start + port_range), starting at a random one."""
        loop = asyncio.get_running_loop()
        offset = random.randrange(port_range)
        last_error: OSError | None = None
        for i in range(port_range):
            port = port_start + (offset + i) % port_range
            if taken is not None and port in taken:
                continue
            proto = cls(codec)
            try:
                await loop.create_datagram_endpoint(lambda p=proto: p, local_addr=(host, port))  # type: ignore[misc]
            except OSError as exc:
                last_error = exc
                continue
            return proto
        detail = f": {last_error.strerror}" if last_error is not None else ""
        raise OSError(f"no free UDP port for RTP on {host} in {port_start}-{port_start + port_range - 1}{detail}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        sockname = transport.get_extra_info("sockname")
        self.local = (str(sockname[0]), int(sockname[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and friends
        log.debug("rtp %s: socket error %s", self.local, exc)

    def set_peer(self, host: str, port: int) -> None:
        if not self._latched:
            self.peer = (host, port)

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- receiving
    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.closed:
            return
        try:
            packet = parse_packet(data)
            if packet.payload_type != self.codec.payload_type:
                self.counters.wrong_payload_type += 1
                return
            payload = self.codec.from_wire(packet.payload)
        except RtpError:
            self.counters.malformed += 1
            return
        source = (str(addr[0]), int(addr[1]))
        if not self._latched:
            self._latched = True
            if source != self.peer:
                log.info("rtp %s: latched to %s:%d (announced %s)", self.local, *source, self.peer)
            self.peer = source
        elif source != self.peer:
            self.counters.foreign += 1
            return
        if not payload:
            return
        self.counters.packets_in += 1
        sequence = self._extender.extend(packet.ssrc, packet.sequence)
        if self.bridge is not None:
            self.bridge.receive(payload, sequence)

    # -- sending (MediaTransport)
    async def send_media(self, payload: bytes) -> None:
        self.queue_frame(payload)

    def send_media_now(self, payload: bytes) -> bool:
        """The same, without a coroutine (the pacing wheel's path): queueing never waits."""
        self.queue_frame(payload)
        return True

    async def send_mark(self, name: str) -> None:
        return None

    async def send_clear(self) -> None:
        self._queue.clear()

    def queue_frame(self, payload: bytes) -> None:
        if self.closed:
            return
        if len(self._queue) >= MAX_QUEUED_FRAMES:
            self._queue.popleft()
            self.counters.dropped_overflow += 1
        self._queue.append(payload)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    async def _run_pump(self) -> None:
        """Send one queued frame per packet time on an absolute schedule; stop when the queue runs
        dry. The RTP timestamp covers the pause, and the next packet starts a talkspurt."""
        loop = asyncio.get_running_loop()
        dt = FRAME_MS / 1000
        start = loop.time()
        if self._last_sent_at is not None:
            self._sender.skip(round((start - self._last_sent_at) / dt) - 1)
        sent = 0
        while self._queue and not self.closed:
            self._send_now(self._queue.popleft())
            sent += 1
            self._last_sent_at = loop.time()
            delay = start + sent * dt - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    def _send_now(self, payload: bytes) -> None:
        packet = self._sender.packet(self.codec.to_wire(payload))
        if self.peer is None or self._transport is None:
            self.counters.dropped_no_peer += 1
            return
        self._transport.sendto(packet, self.peer)
        self.counters.packets_out += 1
