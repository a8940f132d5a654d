"""The bridge <-> SIP worker wire: length-prefixed JSON and audio over a real Unix socket pair, end of
stream, oversized messages, a stalled reader (audio dropped, never queued without bound), and the
settings (with the secret) surviving the trip."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest

from carriers.sip.settings import SipSettings
from carriers.sip.worker import (
    AUDIO_BACKLOG_BYTES,
    KIND_AUDIO,
    KIND_JSON,
    MAX_MESSAGE,
    pack_json,
    read_message,
    send_audio,
    settings_for_wire,
)


async def _pair() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ra, wa = await asyncio.open_unix_connection(sock=a)
    rb, wb = await asyncio.open_unix_connection(sock=b)
    return ra, wa, rb, wb


async def test_json_and_audio_messages_round_trip_in_order() -> None:
    _, wa, rb, wb = await _pair()
    frame = bytes(range(256)) + bytes(64)  # one 20 ms PCM16 frame at 8 kHz
    wa.write(pack_json({"note": "incoming", "pid": "abc@host", "data": {"from": "+15550001111"}}))
    assert send_audio(wa, 513, frame)
    wa.write_eof()
    assert await read_message(rb) == (KIND_JSON, json.dumps(
        {"note": "incoming", "pid": "abc@host", "data": {"from": "+15550001111"}}, separators=(",", ":")).encode())
    kind, body = await read_message(rb)  # type: ignore[misc]
    assert kind == KIND_AUDIO and int.from_bytes(body[:2], "big") == 513 and body[2:] == frame
    assert await read_message(rb) is None  # end of stream
    wa.close()
    wb.close()


async def test_a_message_cut_short_reads_as_end_of_stream() -> None:
    _, wa, rb, wb = await _pair()
    wa.write(pack_json({"reply": 1, "error": None})[:-3])
    wa.write_eof()
    assert await read_message(rb) is None
    wa.close()
    wb.close()


async def test_an_oversized_length_is_refused_before_reading_the_body() -> None:
    _, wa, rb, wb = await _pair()
    wa.write(struct.pack(">BI", KIND_JSON, MAX_MESSAGE + 1))
    with pytest.raises(ValueError, match="sip worker message"):
        await read_message(rb)
    wa.close()
    wb.close()


async def test_audio_to_a_stalled_reader_is_dropped_but_control_still_goes() -> None:
    _, wa, rb, wb = await _pair()
    frame = bytes(320)
    sent = dropped = 0
    for _ in range(20_000):  # 400 s of audio for one call; the reader never reads
        if send_audio(wa, 1, frame):
            sent += 1
        else:
            dropped += 1
        if dropped > 100:
            break
        if sent % 500 == 0:
            await asyncio.sleep(0)  # let the transport try to flush, as the loop would between frames
    assert dropped > 100, "audio kept queueing for a reader that does not read"
    assert wa.transport.get_write_buffer_size() <= AUDIO_BACKLOG_BYTES + 400
    wa.write(pack_json({"op": "clear", "leg": 1}))  # control is never dropped
    # Once the reader catches up, audio flows again.
    while wa.transport.get_write_buffer_size() > 0:
        await rb.read(1 << 16)
        await asyncio.sleep(0)
    assert send_audio(wa, 1, frame)
    wa.close()
    wb.close()


def test_settings_cross_with_the_secret_and_come_back_equal() -> None:
    settings = SipSettings.model_validate({
        "port": 5070, "workers": 3, "codecs": ["PCMA"],
        "account": {"registrar": "sip:pbx.example", "username": "bot", "password": "pw-secret", "domain": "d"},
    })
    wire = json.loads(json.dumps(settings_for_wire(settings)))
    assert wire["account"]["password"] == "pw-secret"
    back = SipSettings.model_validate(wire)
    assert back == settings
    assert "pw-secret" not in repr(back)
