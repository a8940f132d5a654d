"""Pure transfer decisions: request checks, what a leg's end means, what the caller is told."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bridge.calls import CallState, TranscriptEntry, TransferMode, TransferOutcome
from bridge.config import is_destination

MAX_SUMMARY_CHARS = 1000
SUMMARY_LINES = 3  # caller lines the fallback summary quotes


class TransferRequestError(ValueError):
    """A transfer request that cannot be carried out; the message is for the API caller."""


@dataclass(frozen=True, slots=True)
class TransferRequest:
    to: str
    mode: TransferMode
    summary: str | None


def check_request(to: object, mode: object, summary: object, *, dial_strings: bool = False) -> TransferRequest:
    """`to` E.164 or a sip: URI (carriers that dial extensions check their own), mode cold|warm."""
    if not isinstance(to, str) or not to.strip():
        raise TransferRequestError("`to` is required: an E.164 number like +15550001234 or a sip: URI")
    to = to.strip()
    if not dial_strings and not is_destination(to):
        raise TransferRequestError(f"`to` must be an E.164 number like +15550001234 or a sip: URI (got {to[:40]!r})")
    if len(to) > 256 or any(ch.isspace() or ch in "<>\"" for ch in to):
        raise TransferRequestError("`to` must be at most 256 characters, without spaces, <, > or quotes")
    mode = mode or TransferMode.COLD
    if mode not in (TransferMode.COLD, TransferMode.WARM):
        raise TransferRequestError(f"`mode` must be cold or warm (got {str(mode)[:20]!r})")
    if summary is not None and not isinstance(summary, str):
        raise TransferRequestError("`summary` must be a string")
    if summary is not None and len(summary) > MAX_SUMMARY_CHARS:
        raise TransferRequestError(f"`summary` must be at most {MAX_SUMMARY_CHARS} characters")
    return TransferRequest(to, TransferMode(str(mode)), (summary or "").strip() or None)


def outcome_of_leg_end(reason: CallState, answered: bool) -> TransferOutcome:
    """The person's call ended before the transfer completed: why, as a transfer outcome."""
    if reason == CallState.BUSY:
        return TransferOutcome.BUSY
    if reason in (CallState.NO_ANSWER, CallState.TIMEOUT) and not answered:
        return TransferOutcome.NO_ANSWER
    if reason in (CallState.HANGUP_USER, CallState.COMPLETED):
        return TransferOutcome.REFUSED  # rejected while ringing, or hung up during the briefing
    return TransferOutcome.FAILED


def parse_outcome(value: object) -> TransferOutcome:
    """A carrier's outcome value; anything unknown is a failure."""
    try:
        return TransferOutcome(str(value))
    except ValueError:
        return TransferOutcome.FAILED


def failure_text(template: str, outcome: TransferOutcome) -> str:
    """What the caller hears when the transfer did not go through."""
    reason = {TransferOutcome.BUSY: "the line was busy", TransferOutcome.NO_ANSWER: "nobody answered",
              TransferOutcome.REFUSED: "the call was declined"}.get(outcome, "the call could not be connected")
    return template.replace("{reason}", reason)


def briefing_text(template: str, summary: str) -> str:
    return template.replace("{summary}", summary).strip()


def fallback_summary(transcript: Sequence[TranscriptEntry]) -> str:
    """Without a model: the caller's last few lines, quoted."""
    lines = [t.text.strip() for t in transcript if t.speaker == "user" and t.isFinal and t.text.strip()]
    if not lines:
        return "The caller did not say why they are calling."
    quoted = " ".join(lines[-SUMMARY_LINES:])
    return f"The caller said: {quoted}"[:MAX_SUMMARY_CHARS]
