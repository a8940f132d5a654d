"""G.711: bit-exact with audioop over every input, and the carriers.md section 4 vectors."""

from __future__ import annotations

import base64
import struct
import warnings

import numpy as np
import pytest

from media import g711
from media.formats import ALAW_8K, ULAW_8K, AudioEncoding

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ALL_INPUTS = np.arange(-32768, 32768, dtype="<i2")
ALL_CODES = bytes(range(256))

SEG_UEND = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
SEG_AEND = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _seg(v: int, table: tuple[int, ...]) -> int:
    for i, end in enumerate(table):
        if v <= end:
            return i
    return 8


# Independent scalar forms of the G.711 algorithm (Sun g711.c as described in carriers.md), so
# these tests check the codec against the standard and not only against itself.
def ref_ulaw_encode(x: int) -> int:
    p = x >> 2  # audioop's 14-bit input (floor shift)
    mask = 0xFF
    if p < 0:
        p, mask = -p, 0x7F
    p = min(p, 8159) + 33
    seg = _seg(p, SEG_UEND)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((p >> (seg + 1)) & 0xF)) ^ mask


def ref_ulaw_decode(code: int) -> int:
    u = ~code & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return 0x84 - t if u & 0x80 else t - 0x84


def ref_alaw_encode(x: int) -> int:
    p = x >> 3
    if p >= 0:
        mask = 0xD5
    else:
        mask, p = 0x55, -p - 1
    seg = _seg(p, SEG_AEND)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((p >> 1 if seg < 2 else p >> seg) & 0xF)) ^ mask


def ref_alaw_decode(code: int) -> int:
    a = code ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


def _pcm(*xs: int) -> bytes:
    return struct.pack(f"<{len(xs)}h", *xs)


# ------------------------------------------------------------------ exhaustive


def test_ulaw_encode_bit_exact_all_65536_inputs() -> None:
    pcm = ALL_INPUTS.tobytes()
    ours = g711.encode(pcm, AudioEncoding.PCMU)
    assert ours == audioop.lin2ulaw(pcm, 2)
    assert ours == bytes(ref_ulaw_encode(int(x)) for x in ALL_INPUTS)


def test_alaw_encode_bit_exact_all_65536_inputs() -> None:
    pcm = ALL_INPUTS.tobytes()
    ours = g711.encode(pcm, AudioEncoding.PCMA)
    assert ours == audioop.lin2alaw(pcm, 2)
    assert ours == bytes(ref_alaw_encode(int(x)) for x in ALL_INPUTS)


def test_ulaw_decode_bit_exact_all_256_codes() -> None:
    ours = np.frombuffer(g711.decode(ALL_CODES, AudioEncoding.PCMU), dtype="<i2")
    assert ours.tobytes() == audioop.ulaw2lin(ALL_CODES, 2)
    assert ours.tolist() == [ref_ulaw_decode(c) for c in ALL_CODES]


def test_alaw_decode_bit_exact_all_256_codes() -> None:
    ours = np.frombuffer(g711.decode(ALL_CODES, AudioEncoding.PCMA), dtype="<i2")
    assert ours.tobytes() == audioop.alaw2lin(ALL_CODES, 2)
    assert ours.tolist() == [ref_alaw_decode(c) for c in ALL_CODES]


def test_decode_encode_roundtrip_is_identity_on_codes() -> None:
    for enc in (AudioEncoding.PCMU, AudioEncoding.PCMA):
        again = g711.encode(g711.decode(ALL_CODES, enc), enc)
        if enc is AudioEncoding.PCMU:
            # 0x7F (-0) decodes to 0, which encodes as 0xFF (+0): the only non-identity code.
            assert [i for i in range(256) if again[i] != i] == [0x7F]
        else:
            assert again == ALL_CODES


def test_l16_passthrough_and_odd_length_rejected() -> None:
    pcm = _pcm(1, -2, 3)
    assert g711.decode(pcm, AudioEncoding.L16) == pcm
    assert g711.encode(pcm, AudioEncoding.L16) == pcm
    with pytest.raises(ValueError):
        g711.encode(b"\x00\x01\x02", AudioEncoding.PCMU)


# ------------------------------------------------------------------ carriers.md section 4 vectors

VECTORS = [
    # x, lin2ulaw, ulaw2lin(code), lin2alaw, alaw2lin(code)
    (0, 0xFF, 0, 0xD5, 8),
    (-1, 0x7E, -8, 0x55, -8),
    (8, 0xFE, 8, 0xD5, 8),
    (100, 0xF2, 104, 0xD3, 104),
    (-100, 0x72, -104, 0x53, -104),
    (1000, 0xCE, 988, 0xFA, 1008),
    (-1000, 0x4E, -988, 0x7A, -1008),
    (4000, 0xAF, 4092, 0x9A, 4032),
    (16000, 0x90, 15996, 0xBA, 16128),
    (32767, 0x80, 32124, 0xAA, 32256),
    (-32768, 0x00, -32124, 0x2A, -32256),
]


@pytest.mark.parametrize(("x", "ucode", "ulin", "acode", "alin"), VECTORS, ids=[f"x={v[0]}" for v in VECTORS])
def test_vector_table(x: int, ucode: int, ulin: int, acode: int, alin: int) -> None:
    assert g711.encode(_pcm(x), AudioEncoding.PCMU) == bytes([ucode])
    assert g711.decode(bytes([ucode]), AudioEncoding.PCMU) == _pcm(ulin)
    assert g711.encode(_pcm(x), AudioEncoding.PCMA) == bytes([acode])
    assert g711.decode(bytes([acode]), AudioEncoding.PCMA) == _pcm(alin)


def test_vector_buffer_form_ulaw() -> None:
    assert g711.ulaw_encode(_pcm(0, 1000, -1000, 32767, -32768)) == bytes.fromhex("ffce4e8000")


def test_vector_buffer_form_alaw() -> None:
    assert g711.alaw_encode(_pcm(0, 1000, -1000, 32767, -32768)) == bytes.fromhex("d5fa7aaa2a")


def test_vector_full_decode_tables() -> None:
    u = lambda c: struct.unpack("<h", g711.ulaw_decode(bytes([c])))[0]  # noqa: E731
    a = lambda c: struct.unpack("<h", g711.alaw_decode(bytes([c])))[0]  # noqa: E731
    assert (u(0x00), u(0x0F), u(0x80)) == (-32124, -16764, 32124)
    assert (a(0x00), a(0x80), a(0x7F)) == (-5504, 5504, -848)


def test_vector_silence_frame_base64() -> None:
    frame = g711.encode(bytes(ULAW_8K.frame_bytes * 2), AudioEncoding.PCMU)
    assert frame == bytes([ULAW_8K.silence_byte]) * 160
    b64 = base64.b64encode(frame).decode()
    assert len(b64) == 216 and b64.endswith("/////w==")
    assert g711.encode(bytes(320), AudioEncoding.PCMA) == bytes([ALAW_8K.silence_byte]) * 160


def test_vector_seed_mulaw_checks() -> None:
    # seed-system checks: 0 -> 0xFF, 1000 -> 0xCE, -1000 -> 0x4E
    assert g711.ulaw_encode(_pcm(0, 1000, -1000)) == bytes([0xFF, 0xCE, 0x4E])


def test_vector_ulaw_negative_boundary_differs_from_sign_magnitude_form() -> None:
    # audioop (floor shift) vs the 16-bit sign-magnitude form: -1..-4 give 0x7E, and -31611 gives 0x00.
    assert g711.ulaw_encode(_pcm(-1, -4, -31611)) == bytes([0x7E, 0x7E, 0x00])


def test_codec_snr_on_speech_band_signal() -> None:
    # G.711 gives ~38 dB SNR on a loud tone; A-law's (13-bit) and u-law's companding both stay >= 30 dB.
    t = np.arange(8000) / 8000
    x = (12000 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    for enc in (AudioEncoding.PCMU, AudioEncoding.PCMA):
        y = np.frombuffer(g711.decode(g711.encode(x.tobytes(), enc), enc), dtype="<i2").astype(float)
        snr = 10 * np.log10(np.sum(x.astype(float) ** 2) / np.sum((y - x) ** 2))
        assert snr > 30, (enc, snr)
