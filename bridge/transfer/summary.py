"""The briefing for the person in a warm transfer, written from the call's transcript."""

from __future__ import annotations

import asyncio
import logging

from bridge.calls import CallRecord
from bridge.conversation.chat import ChatModel
from bridge.tasks import mirror
from bridge.transfer.rules import MAX_SUMMARY_CHARS, fallback_summary
from media.clock import Clock

log = logging.getLogger(__name__)

SUMMARY_PROMPT = ("You hand a phone caller over to a colleague. In one or two short spoken sentences, tell the "
                  "colleague who is calling and what they want, from the conversation below. No greeting.")
SUMMARY_TIMEOUT_S = 8.0


async def write_summary(call: CallRecord, model: ChatModel | None, clock: Clock) -> str:
    """The model's summary of the transcript; the caller's own last lines when there is no model or it fails."""
    if model is None:
        return fallback_summary(call.transcript)
    lines = "\n".join(f"{'Caller' if t.speaker == 'user' else 'Agent'}: {t.text}"
                      for t in call.transcript if t.isFinal and t.text)
    messages = [{"role": "system", "content": SUMMARY_PROMPT}, {"role": "user", "content": lines or "(nothing said)"}]
    try:
        text = await clock.wait_for(_collect(model, messages), SUMMARY_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - the transfer goes on with the fallback
        log.info("call %s: summary model failed (%s); quoting the caller", call.callId, type(exc).__name__)
        return fallback_summary(call.transcript)
    text = " ".join(text.split())[:MAX_SUMMARY_CHARS]
    return text or fallback_summary(call.transcript)


def _collect(model: ChatModel, messages: list[dict[str, str]]) -> asyncio.Future[str]:
    """The model's whole reply, as a plain future (the clock can time it out; the request is then cancelled)."""
    async def run() -> str:
        stream = await model.stream(messages, [])
        try:
            return "".join([piece async for piece in stream])
        finally:
            await stream.aclose()

    return mirror(asyncio.ensure_future(run()))
