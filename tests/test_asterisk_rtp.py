"""RTP for the Asterisk ExternalMedia leg: packet vectors, malformed input, the UDP edge over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from carriers.asterisk.rtp import (
    CODECS,
    PT_SLIN16,
    RtpError,
    RtpSender,
    RtpTransport,
    SequenceExtender,
    build_packet,
    parse_packet,
)
from tests.harness import wait_for


def test_build_packet_matches_a_hand_made_header() -> None:
    packet = build_packet(0, 0x1234, 0xDEADBEEF, 0x01020304, b"\xff" * 160, marker=True)
    assert packet[:12] == bytes.fromhex("80801234deadbeef01020304")
    assert packet[12:] == b"\xff" * 160
    assert build_packet(8, 0x10000 + 5, 2**32 + 7, 9, b"")[:12] == bytes.fromhex("800800050000000700000009")


def test_parse_packet_reads_csrc_extension_and_padding() -> None:
    header = struct.pack("!BBHII", 0x80 | 0x20 | 0x10 | 2, 0x80 | 118, 65535, 320, 77)
    csrcs = struct.pack("!II", 1, 2)
    extension = struct.pack("!HH", 0xBEDE, 1) + b"\x01\x02\x03\x04"
    payload = bytes(range(10))
    padding = b"\x00\x00\x03"
    packet = parse_packet(header + csrcs + extension + payload + padding)
    assert (packet.payload_type, packet.sequence, packet.timestamp, packet.ssrc, packet.marker) == (118, 65535, 320, 77, True)
    assert packet.payload == payload


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x80\x00\x00", "too short"),
        (bytes([0x40, 0]) + bytes(10), "version 1"),
        (bytes([0x8F, 0]) + bytes(10), "15 CSRCs announced, none present"),
        (bytes([0x90, 0]) + bytes(10) + b"\x00\x00", "extension header cut"),
        (bytes([0x90, 0]) + bytes(10) + b"\x00\x00\x00\x05", "extension longer than the packet"),
        (bytes([0xA0, 0]) + bytes(10) + b"\x00", "padding count 0"),
        (bytes([0xA0, 0]) + bytes(10) + b"\x09", "padding longer than the payload"),
        (bytes([0x80, 0xC8]) + bytes(10), "RTCP sender report"),
    ],
)
def test_malformed_packets_are_rejected(data: bytes, why: str) -> None:
    with pytest.raises(RtpError):
        parse_packet(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parse_never_raises_anything_but_rtp_error(data: bytes) -> None:
    try:
        packet = parse_packet(data)
    except RtpError:
        return
    assert len(packet.payload) <= len(data) - 12


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 127), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.binary(max_size=200), st.booleans())
def test_build_then_parse_round_trips(pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: bool) -> None:
    assume(not (72 <= pt <= 76 and marker))  # that header reads as RTCP 200-204
    packet = parse_packet(build_packet(pt, seq, ts, ssrc, payload, marker=marker))
    assert (packet.payload_type, packet.sequence, packet.timestamp, packet.ssrc, packet.payload, packet.marker) == (
        pt, seq, ts, ssrc, payload, marker)


def test_sender_counts_sequence_and_timestamp_and_marks_talkspurts() -> None:
    sender = RtpSender(0, 160, ssrc=5, sequence=0xFFFF, timestamp=2**32 - 160)
    first, second = parse_packet(sender.packet(b"a")), parse_packet(sender.packet(b"b"))
    assert (first.sequence, first.timestamp, first.marker) == (0xFFFF, 2**32 - 160, True)
    assert (second.sequence, second.timestamp, second.marker) == (0, 0, False)
    sender.skip(3)  # 60 ms of silence not sent
    third = parse_packet(sender.packet(b"c"))
    assert (third.sequence, third.timestamp, third.marker) == (1, 160 * 4, True)


def test_sequence_extender_wraps_reorders_and_follows_a_new_ssrc() -> None:
    ext = SequenceExtender()
    assert [ext.extend(1, s) for s in (65534, 65535, 0, 1)] == [0, 1, 2, 3]
    assert ext.extend(1, 65535) == 1  # late packet keeps its place
    assert ext.extend(1, 2) == 4
    assert ext.extend(2, 40000) == 5  # new source continues the count
    assert ext.extend(2, 40001) == 6


def test_slin16_travels_big_endian() -> None:
    codec = CODECS["slin16"]
    assert codec.payload_type == PT_SLIN16 and codec.samples_per_frame == 320
    host = struct.pack("<2h", 1, -2)
    assert codec.to_wire(host) == struct.pack(">2h", 1, -2)
    assert codec.from_wire(codec.to_wire(host)) == host
    with pytest.raises(RtpError):
        codec.from_wire(b"\x00\x01\x02")


class _Sink:
    def __init__(self) -> None:
        self.frames: list[tuple[bytes, int | None]] = []

    def receive(self, payload: bytes, sequence: int | None = None) -> None:
        self.frames.append((payload, sequence))


async def test_transport_latches_drops_garbage_and_paces_its_packets() -> None:
    transport = await RtpTransport.open(CODECS["ulaw"], "127.0.0.1", 42000, 50)
    sink = _Sink()
    transport.bridge = sink  # type: ignore[assignment]
    assert transport.local is not None and 42000 <= transport.local[1] < 42050
    far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    far.bind(("127.0.0.1", 0))
    far.setblocking(False)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        transport.set_peer("127.0.0.1", 9)  # what channelvars announced: wrong, the first packet re-latches
        for data in (b"junk", bytes([0x40]) + bytes(20), build_packet(13, 1, 0, 1, b"\x00")):
            far.sendto(data, transport.local)
        far.sendto(build_packet(0, 7, 0, 42, b"\x01" * 160), transport.local)
        far.sendto(build_packet(0, 8, 160, 42, b"\x02" * 160), transport.local)
        other.sendto(build_packet(0, 9, 320, 42, b"\x03" * 160), transport.local)
        await wait_for(lambda: transport.counters.foreign == 1, timeout=2)
        c = transport.counters
        assert (c.malformed, c.wrong_payload_type, c.packets_in) == (2, 1, 2)
        assert transport.peer == far.getsockname()
        assert sink.frames == [(b"\x01" * 160, 0), (b"\x02" * 160, 1)]

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(10):
            await transport.send_media(bytes([i]) * 160)
        got: list[tuple[float, bytes]] = []
        while len(got) < 10:
            data = await asyncio.wait_for(loop.sock_recv(far, 2048), 2)
            got.append((loop.time() - t0, data))
        packets = [parse_packet(d) for _, d in got]
        assert [p.payload[0] for p in packets] == list(range(10))
        assert [p.marker for p in packets] == [True] + [False] * 9
        assert all((b.sequence - a.sequence) & 0xFFFF == 1 for a, b in itertools.pairwise(packets))
        assert all(b.timestamp - a.timestamp == 160 for a, b in itertools.pairwise(packets))
        assert got[-1][0] >= 0.17, "ten frames took at least nine packet times"
        await transport.send_clear()
        assert transport.queued_frames == 0
    finally:
        transport.close()
        far.close()
        other.close()


async def test_open_skips_ports_in_use_and_reports_an_exhausted_range() -> None:
    first = await RtpTransport.open(CODECS["ulaw"], "127.0.0.1", 42100, 2)
    second = await RtpTransport.open(CODECS["ulaw"], "127.0.0.1", 42100, 2)
    try:
        assert {first.local[1], second.local[1]} == {42100, 42101}  # type: ignore[index]
        with pytest.raises(OSError, match="no free UDP port"):
            await RtpTransport.open(CODECS["ulaw"], "127.0.0.1", 42100, 2)
    finally:
        first.close()
        second.close()
