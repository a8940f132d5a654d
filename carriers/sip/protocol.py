"""SIP rules without I/O: caller identities from headers, dial URIs, SIP status -> end reason, and a
REFER's progress (pjsua2 `onCallTransferStatus`) -> transfer outcome."""

from __future__ import annotations

import re

from bridge.calls import CallState, TransferOutcome
from carriers.base import CarrierError
from carriers.sip.settings import SipSettings

_E164 = re.compile(r"^\+?[1-9]\d{1,14}$")
_SCHEME = re.compile(r"(sips?):", re.IGNORECASE)
_PHONE = re.compile(r"^\+?\d{3,15}$")


def caller_id(header: str) -> str:
    """A From/To header or URI as the inbound policy sees it: the number if the user part is a
    telephone number (E.164 `+...`, or digits as the trunk sent them: the policy compares digits),
    else `sip:user@host` (no display name, port, password or parameters)."""
    text = header.strip()
    if "<" in text:
        text = text[text.index("<") + 1 :].split(">", 1)[0]
    match = _SCHEME.search(text)
    if not match:
        return header.strip()
    scheme, rest = match.group(1).lower(), text[match.end() :]
    user, _, hostport = rest.rpartition("@") if "@" in rest else ("", "", rest)
    user = user.split(";", 1)[0].split(":", 1)[0]
    host = hostport.split(";", 1)[0].split("?", 1)[0]
    host = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.split(":", 1)[0]
    if user and _PHONE.match(user):
        return user
    return f"{scheme}:{user}@{host}" if user else f"{scheme}:{host}"


def dial_uri(to: str, settings: SipSettings) -> str:
    """The request URI for an outbound call: a SIP URI as given, or an E.164 number at the trunk."""
    to = to.strip()
    if to.lower().startswith(("sip:", "sips:")):
        uri = to
    elif _E164.match(to) and to.startswith("+"):
        if settings.account is None:
            raise CarrierError("sip: dialing a phone number needs a `sip.account` (trunk or registrar)")
        uri = f"sip:{to}@{settings.account.domain}"
    else:
        raise CarrierError(f"sip: cannot dial {to!r}: expected a sip: URI or an E.164 number")
    if settings.transport == "tcp" and "transport=" not in uri.lower():
        uri += ";transport=tcp"
    return uri


def outbound_end_reason(status: int, *, answered: bool, local: bool, ring_timeout: bool) -> CallState:
    """Map how an outbound INVITE ended to our end reason."""
    if answered:
        return CallState.HANGUP_BOT if local else CallState.HANGUP_USER
    if ring_timeout:
        return CallState.NO_ANSWER
    if local:
        return CallState.HANGUP_BOT  # we cancelled before answer
    if status in (486, 600):
        return CallState.BUSY
    if status in (408, 480, 487):
        return CallState.NO_ANSWER
    return CallState.FAILED


def inbound_end_reason(*, local: bool) -> CallState:
    """An inbound call ends by our hang-up / rejection, or by the caller's BYE / CANCEL."""
    return CallState.HANGUP_BOT if local else CallState.HANGUP_USER




# pjsua reports a transfer subscription that ended without a message (it timed out) as this code.
_PJSUA_NO_RESPONSE = 500
_SERVER_FAILURES = frozenset({_PJSUA_NO_RESPONSE, 503, 504})


def transfer_outcome(code: int, *, accepted: bool, final: bool) -> TransferOutcome | None:
    """What one `onCallTransferStatus` report means for a cold transfer (REFER), or None while it runs.

    `accepted` says whether the REFER was accepted already (an earlier non-final report: pjsua turns
    the 202 into "100 Accepted"); then `code` is the status line of a NOTIFY's message/sipfrag body,
    i.e. how the transferee's INVITE to the person went. Before that it is the REFER's own response.
    Any status >= 200 decides, final or not (pjsua unsubscribes itself after a 2xx sipfrag)."""
    if code < 200:
        # A subscription that ends on a provisional status never learnt how the INVITE went.
        return TransferOutcome.FAILED if final else None
    if code < 300:
        return TransferOutcome.COMPLETED  # a 2xx sipfrag, or a REFER answered "Refer-Sub: false"
    if code in _SERVER_FAILURES or (not accepted and code == 408):
        return TransferOutcome.FAILED  # no answer to the REFER, or no NOTIFY before the subscription expired
    if not accepted:
        return TransferOutcome.REFUSED  # the transferee would not do it (403, 405, 501, 603, ...)
    if code in (486, 600):
        return TransferOutcome.BUSY
    if code in (408, 480, 487):
        return TransferOutcome.NO_ANSWER
    return TransferOutcome.REFUSED  # 403, 404, 603 and the rest of 4xx-6xx
