"""The one 'carrier speech finished' waiter (Twilio <Say>, Telnyx speak, Plivo <Speak>), on the fake clock."""

from __future__ import annotations

import asyncio

from carriers.speech import speech_bound_s, wait_spoken
from media.clock import FakeClock


async def test_returns_what_the_carrier_reported() -> None:
    clock = FakeClock()
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    waiter = asyncio.ensure_future(wait_spoken(clock, done, "Hello there", carrier="x", call_id="c1"))
    await clock.advance(1)
    assert not waiter.done()
    done.set_result("completed")
    assert await waiter == "completed"
    assert clock.pending == 0, "the timeout timer is cancelled"


async def test_gives_up_after_the_bound_and_leaves_the_future_to_the_webhook() -> None:
    clock = FakeClock()
    text = "x" * 50
    assert speech_bound_s(text) == 20.0
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiter = asyncio.ensure_future(wait_spoken(clock, done, text, carrier="x", call_id="c1"))
    await asyncio.sleep(0)  # the waiter starts: its bound counts from now
    assert clock.pending == 1
    await clock.advance(19.9)
    assert not waiter.done()
    await clock.advance(0.2)
    assert await asyncio.wait_for(waiter, 5) is None  # the bound passed on the clock: it returns
    assert not done.done(), "shielded: a late webhook can still resolve it"
    done.set_result(None)
