"""Asterisk ARI facts as pure functions: dial strings, hangup causes -> end reasons, event fields.

ARI channel objects carry `id`, `name`, `state` ("Down", "Ring", "Ringing", "Up", "Busy", ...),
`caller` / `connected` ({name, number}) and `dialplan` ({context, exten, priority}). Hangup causes
are Q.850 cause codes, as in ChannelDestroyed.cause and ChannelHangupRequest.cause.
"""

from __future__ import annotations

import re
from typing import Any

from bridge.calls import CallState, TransferOutcome

CAUSE_UNALLOCATED = 1
CAUSE_NO_ROUTE = 3
CAUSE_NORMAL = 16
CAUSE_BUSY = 17
CAUSE_NO_USER_RESPONSE = 18
CAUSE_NO_ANSWER = 19
CAUSE_REJECTED = 21
CAUSE_NORMAL_UNSPECIFIED = 31

_NORMAL_CAUSES = frozenset({CAUSE_NORMAL, CAUSE_NORMAL_UNSPECIFIED})
_DIAL_STRING = re.compile(r"^[A-Za-z][A-Za-z0-9_]*/\S+$")
DTMF_DIGITS = re.compile(r"^[0-9A-Da-d*#]+$")


class DialError(ValueError):
    pass


def end_reason(cause: int | None, *, answered: bool, local: CallState | None = None,
               ring_timeout: bool = False) -> CallState:
    """How a call ended, from the Q.850 cause Asterisk reports.

    `local` is the reason we gave when we hung up ourselves (hangup-bot, timeout, ...): it wins, the
    cause then only echoes our own request. A ring timeout of ours is no-answer.
    """
    if local is not None:
        return local
    if ring_timeout and not answered:
        return CallState.NO_ANSWER
    if cause in _NORMAL_CAUSES or (answered and not cause):
        return CallState.HANGUP_USER
    if answered:
        # After the answer, busy/no-answer causes mean nothing; anything else is a failure of the line.
        return CallState.HANGUP_USER if cause in (CAUSE_BUSY, CAUSE_NO_USER_RESPONSE, CAUSE_NO_ANSWER) else CallState.FAILED
    if cause == CAUSE_BUSY:
        return CallState.BUSY
    if cause in (CAUSE_NO_USER_RESPONSE, CAUSE_NO_ANSWER):
        return CallState.NO_ANSWER
    return CallState.FAILED  # 21 rejected, 1 unallocated, 34 no circuit, 0 unknown, ...


def transfer_outcome(cause: int | None) -> TransferOutcome:
    """How a transfer went when the person's originated channel ended before it was answered
    (ChannelDestroyed.cause): busy, no answer, refused (rejected, no such number), else failed."""
    if cause == CAUSE_BUSY:
        return TransferOutcome.BUSY
    if cause in (CAUSE_NO_USER_RESPONSE, CAUSE_NO_ANSWER):
        return TransferOutcome.NO_ANSWER
    if cause in (CAUSE_REJECTED, CAUSE_UNALLOCATED, CAUSE_NO_ROUTE):
        return TransferOutcome.REFUSED
    return TransferOutcome.FAILED  # 34 congestion, 38 network out of order, 0 unknown, ...


def dial_endpoint(to: str, template: str) -> str:
    """The ARI `endpoint` for a destination: a dial string (PJSIP/...) as is, a sip: URI through
    PJSIP (its default_outbound_endpoint), anything else through the configured template."""
    to = to.strip()
    if not to or any(c.isspace() or c in "{}," for c in to):
        raise DialError(f"not a number, user or SIP URI: {to!r}")
    if _DIAL_STRING.match(to):
        return to
    if to.lower().startswith(("sip:", "sips:")):
        return f"PJSIP/{to}"
    return template.format(to=to)


def channel_id(event: dict[str, Any]) -> str | None:
    channel = event.get("channel")
    value = channel.get("id") if isinstance(channel, dict) else None
    return value if isinstance(value, str) else None


def caller_of(channel: dict[str, Any]) -> str:
    caller = channel.get("caller")
    if not isinstance(caller, dict):
        return ""
    return str(caller.get("number") or caller.get("name") or "")


def dialed_of(channel: dict[str, Any]) -> str:
    dialplan = channel.get("dialplan")
    return str(dialplan.get("exten") or "") if isinstance(dialplan, dict) else ""


def cause_of(event: dict[str, Any]) -> int | None:
    cause = event.get("cause")
    return cause if isinstance(cause, int) and not isinstance(cause, bool) else None


def rtp_peer(channel: dict[str, Any]) -> tuple[str, int] | None:
    """Where Asterisk's ExternalMedia channel takes RTP: UNICASTRTP_LOCAL_ADDRESS / _PORT."""
    variables = channel.get("channelvars")
    if not isinstance(variables, dict):
        return None
    host = variables.get("UNICASTRTP_LOCAL_ADDRESS")
    port = variables.get("UNICASTRTP_LOCAL_PORT")
    try:
        port_number = int(port)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not isinstance(host, str) or not host or not 0 < port_number < 65536:
        return None
    return host, port_number
