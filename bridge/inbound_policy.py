"""Who may call in: the inbound policy, allowFrom matching (E.164 digits or a SIP identity) and the
masked caller id written to the log. Pure: strings in, a verdict out."""

from __future__ import annotations

from collections.abc import Iterable


def refusal(policy: str, allow_from: Iterable[str], caller: str | None, *, active: int, limit: int) -> str | None:
    """Why an inbound call from `caller` is refused, or None to answer it (`active` live calls of `limit`)."""
    if policy == "disabled":
        return "inbound calls are disabled"
    if policy in ("allowlist", "pairing"):
        if not caller:
            return "no caller id"
        if not any(same_caller(caller, allowed) for allowed in allow_from):
            return "caller not in allowFrom"
    if active >= limit:
        return f"maximum concurrent calls ({limit}) reached"
    return None


def same_caller(caller: str, allowed: str) -> bool:
    """A SIP identity matches user@host (scheme, parameters and port aside); a number matches by its digits."""
    if allowed.startswith(("sip:", "sips:")) or caller.startswith(("sip:", "sips:")):
        return sip_identity(caller) == sip_identity(allowed)
    return bool(digits(caller)) and digits(caller) == digits(allowed)


def sip_identity(uri: str) -> str:
    uri = uri.split(";", 1)[0].strip("<>").lower()
    for prefix in ("sips:", "sip:"):
        uri = uri.removeprefix(prefix)
    return uri.split(":", 1)[0] if "@" in uri else uri


def digits(number: str) -> str:
    return "".join(ch for ch in number if ch.isdigit())


def mask_number(number: str | None) -> str:
    if not number:
        return "(unknown)"
    return number[:-4] + "****" if len(number) > 6 else "****"
