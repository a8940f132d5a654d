"""Waiting for a carrier's own text-to-speech to finish (Twilio <Say>, Telnyx speak, Plivo <Speak>).

The carrier tells us by a webhook when the caller has heard it all; should that never come, the
wait ends after a bound that is generous for slow voices: 10 s plus 1 s per 5 characters.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from media.clock import Clock

log = logging.getLogger(__name__)

T = TypeVar("T")
BASE_S = 10.0
CHARS_PER_S = 5.0


def speech_bound_s(text: str) -> float:
    return BASE_S + len(text) / CHARS_PER_S


async def wait_spoken(clock: Clock, done: asyncio.Future[T], text: str, *, carrier: str, call_id: str) -> T | None:
    """The result of `done` once the carrier reports the end of `text`; None if it never does.
    `done` is shielded: a waiter that gives up leaves it for the webhook to resolve."""
    bound = speech_bound_s(text)
    try:
        return await clock.wait_for(asyncio.shield(done), bound)
    except TimeoutError:
        log.warning("call %s: %s did not report the end of its speech within %.0fs; going on", call_id, carrier, bound)
        return None
