"""Framer, pacer and reorder buffer (sans-I/O, on a virtual clock)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from media.frames import Framer, Pacer
from media.jitter import ReorderBuffer


@given(st.lists(st.binary(max_size=700), max_size=40))
def test_framer_exact_frames_any_chunking(chunks: list[bytes]) -> None:
    f = Framer(160, 0xFF)
    frames: list[bytes] = []
    for c in chunks:
        frames += f.push(c)
    last = f.flush()
    if last is not None:
        frames.append(last)
    data = b"".join(chunks)
    assert all(len(fr) == 160 for fr in frames)
    assert len(frames) == -(-len(data) // 160)
    joined = b"".join(frames)
    assert joined[: len(data)] == data
    assert set(joined[len(data) :]) <= {0xFF}
    assert f.pending == 0


@given(st.lists(st.binary(max_size=900), max_size=40))
def test_framer_40ms_messages_tail_padded_to_whole_20ms_frames(chunks: list[bytes]) -> None:
    f = Framer(320, 0xFF, pad_to=160)
    msgs: list[bytes] = []
    for c in chunks:
        msgs += f.push(c)
    last = f.flush()
    data = b"".join(chunks)
    assert all(len(m) == 320 for m in msgs)
    if last is not None:
        assert len(last) in (160, 320)
        msgs.append(last)
    joined = b"".join(msgs)
    assert len(joined) == -(-len(data) // 160) * 160  # no more padding than 20 ms frames would add
    assert joined[: len(data)] == data and set(joined[len(data) :]) <= {0xFF}


def test_framer_pad_to_must_divide_the_message() -> None:
    import pytest

    with pytest.raises(ValueError):
        Framer(320, 0xFF, pad_to=150)


class VirtualTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


async def test_pacer_absolute_schedule_and_lead() -> None:
    vt = VirtualTime()
    p = Pacer(vt.monotonic, vt.sleep, lead_frames=3)
    sent_at = []
    for _ in range(100):
        await p.wait_turn()
        sent_at.append(vt.now)
        p.sent_one()
        vt.now += 0.0013  # send cost and loop jitter must not accumulate into drift
    t0 = sent_at[0]
    for n, t in enumerate(sent_at):
        assert t >= t0 + max(0, n - 2) * 0.02 - 1e-9  # never ahead of real time + lead
        assert n - p.played_frames(t) <= 3 + 1e-9  # <= 3 frames queued at the carrier
    # 100 frames with 3 in advance: the last is sent 97 frames after the first (no drift).
    assert abs((sent_at[-1] - t0) - 97 * 0.02) < 0.002
    assert p.underruns == 0
    assert abs(p.end_time - (t0 + 2.0)) < 1e-9


async def test_pacer_underrun_rebases_instead_of_bursting() -> None:
    vt = VirtualTime()
    p = Pacer(vt.monotonic, vt.sleep, lead_frames=3)
    for _ in range(10):
        await p.wait_turn()
        p.sent_one()
    vt.now += 1.0  # the engine stalls for a second: the carrier plays out and goes silent
    times = []
    for _ in range(10):
        await p.wait_turn()
        times.append(vt.now)
        p.sent_one()
    assert p.underruns == 1
    # After the stall, again only 3 frames go at once, then one per 20 ms.
    assert times[2] - times[0] < 1e-9
    assert abs(times[3] - times[2] - 0.02) < 1e-6


async def test_pacer_is_per_frame_so_empty_chunks_cannot_skip_it() -> None:
    """The pipecat #5592 shape: an engine yielding empty and huge chunks. Pace stays 1x."""
    vt = VirtualTime()
    p = Pacer(vt.monotonic, vt.sleep, lead_frames=3)
    f = Framer(160, 0xFF)
    rng = np.random.default_rng(3)
    chunks = [b""] * 50 + [bytes(160 * 200)] + [b""] * 50 + [bytes(int(n)) for n in rng.integers(0, 400, 100)]
    total = 0
    t_first = None
    for c in chunks:
        for _ in f.push(c):
            await p.wait_turn()
            t_first = vt.now if t_first is None else t_first
            p.sent_one()
            total += 1
    assert p.end_time - t_first >= total * 0.02 - 1e-9
    assert vt.now - t_first >= (total - 3) * 0.02 - 1e-9


def test_reorder_buffer_orders_within_window() -> None:
    rb = ReorderBuffer(3)
    order = [1, 3, 2, 4, 6, 5, 7, 8, 10, 9]
    out = []
    for s in order:
        out += rb.push(s, bytes([s]))
    out += rb.drain()
    assert [o[0] for o in out] == list(range(1, 11))
    assert rb.late == 0 and rb.skipped == 0


def test_reorder_buffer_gives_up_gap_and_drops_late() -> None:
    rb = ReorderBuffer(3)
    out = []
    for s in [1, 2, 4, 5, 6, 7, 3, 8]:  # 3 is lost for longer than the window, then arrives late
        out += rb.push(s, bytes([s]))
    assert [o[0] for o in out] == [1, 2, 4, 5, 6, 7, 8]
    assert rb.skipped == 1 and rb.late == 1


def test_reorder_buffer_restarted_counter() -> None:
    rb = ReorderBuffer(3)
    out = []
    seqs = [500, 501, 502, 503, 504, 1, 2, 3, 4, 5]
    for s in seqs:
        out += rb.push(s, bytes([s % 256]))
    out += rb.drain()
    assert [o[0] for o in out] == [s % 256 for s in seqs]
    assert rb.late == 0


@given(st.permutations(list(range(40))), st.integers(1, 3))
def test_reorder_buffer_restores_any_local_shuffle(perm: list[int], window: int) -> None:
    # Shuffle only within blocks of `window` + 1, which the buffer must always undo exactly.
    block = window + 1
    order = [i for b in range(0, 40, block) for i in sorted(range(b, min(b + block, 40)), key=lambda i: perm[i])]
    rb = ReorderBuffer(window)
    out: list[bytes] = []
    for s in order:
        out += rb.push(s, bytes([s]))
    out += rb.drain()
    assert [o[0] for o in out] == list(range(40))
    assert rb.late == 0 and rb.skipped == 0


async def test_pacer_40ms_messages_two_ahead_and_a_short_tail() -> None:
    vt = VirtualTime()
    p = Pacer(vt.monotonic, vt.sleep, lead_frames=2, frame_ms=40)
    sent_at = []
    for i in range(50):
        await p.wait_turn()
        sent_at.append(vt.now)
        p.sent_one(20 if i == 49 else None)  # the play's last message: one 20 ms frame
        vt.now += 0.0007
    t0 = sent_at[0]
    for n, t in enumerate(sent_at):
        assert t >= t0 + max(0, n - 1) * 0.04 - 1e-9
        assert n * 40 - p.played_ms(t) <= 80 + 1e-6  # <= 80 ms queued at the carrier
    assert p.sent == 50 and p.sent_ms == 49 * 40 + 20
    assert abs(p.end_time - (t0 + 1.98)) < 1e-9
    assert p.played_ms(t0 + 10) == 1980.0 and p.played_ms(t0 + 0.5) == 500.0
