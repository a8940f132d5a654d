"""Webhook signature algorithms and replay keys for Twilio, Telnyx and Plivo (sans-I/O).

Pure functions over str/bytes: the server hands in the reconstructed public URL(s), the parsed
parameters, the raw body and the signature headers; nothing here reads sockets or the clock.
Every comparison of a computed signature with a received one is constant-time. Secrets (auth
tokens) are never put into exceptions or return values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import SplitResult, parse_qsl, urlsplit, urlunsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

__all__ = [
    "Params",
    "normalize_params",
    "twilio_signature",
    "twilio_url_variants",
    "verify_twilio",
    "load_ed25519_public_key",
    "decode_telnyx_signature",
    "verify_telnyx",
    "plivo_v3_base_string",
    "plivo_v3_signature",
    "verify_plivo_v3",
    "plivo_v2_signature",
    "verify_plivo_v2",
    "plivo_v1_signature",
    "verify_plivo_v1",
    "twilio_replay_key",
    "telnyx_replay_key",
    "plivo_replay_key",
]

# Pairs (keeps repeated names, e.g. a form body), or a mapping whose values are a string or a
# sequence of strings (a dict, or an aiohttp MultiDict whose items() repeat names).
Params = Iterable[tuple[str, str]] | Mapping[str, str | Sequence[str]]


def normalize_params(params: Params | None) -> dict[str, list[str]]:
    """Group parameters by name, keeping every value (order of first appearance)."""
    grouped: dict[str, list[str]] = {}
    if params is None:
        return grouped
    items = params.items() if isinstance(params, Mapping) else params
    for name, value in items:
        bucket = grouped.setdefault(name, [])
        if isinstance(value, str):
            bucket.append(value)
        else:
            bucket.extend(value)
    return grouped


def _secure_equals(expected: str, received: str) -> bool:
    return hmac.compare_digest(expected.encode("utf-8"), received.encode("utf-8"))


def _hmac_b64(key: str, message: str, digest: str) -> str:
    mac = hmac.new(key.encode("utf-8"), message.encode("utf-8"), digest)
    return base64.b64encode(mac.digest()).decode("ascii")


def _split_signatures(header_value: str) -> list[str]:
    return [part.strip() for part in header_value.split(",") if part.strip()]


# ------------------------------------------------------------------------------------ Twilio


def twilio_signature(auth_token: str, url: str, params: Params) -> str:
    """base64(HMAC-SHA1(token, url + name+value for sorted unique names, sorted unique values))."""
    grouped = normalize_params(params)
    parts = [url]
    for name in sorted(grouped):
        for value in sorted(set(grouped[name])):
            parts.append(name + value)
    return _hmac_b64(auth_token, "".join(parts), "sha1")


def _netloc_without_port(netloc: str) -> str:
    """Drop a trailing ':port' (IPv6 literals keep their brackets)."""
    cut = netloc.rfind(":")
    if cut == -1 or netloc.endswith("]"):
        return netloc
    return netloc[:cut]


def twilio_url_variants(url: str) -> list[str]:
    """The URL as given, then: without its port if it has one, else with the default port.

    Twilio's own validator accepts the port-stripped and the default-port forms because Twilio
    is inconsistent about which one it signs.
    """
    variants = [url]
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return variants
    if port:
        variants.append(urlunsplit(parts._replace(netloc=_netloc_without_port(parts.netloc))))
    elif parts.netloc and parts.scheme in ("http", "https"):
        default = 443 if parts.scheme == "https" else 80
        netloc = parts.netloc[:-1] if parts.netloc.endswith(":") else parts.netloc
        variants.append(urlunsplit(parts._replace(netloc=f"{netloc}:{default}")))
    return list(dict.fromkeys(variants))


def _twilio_body_hash(url: str) -> str | None:
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name == "bodySHA256":
            return value
    return None


def verify_twilio(
    auth_token: str,
    urls: Sequence[str],
    params: Params,
    signature: str,
    body: bytes = b"",
) -> bool:
    """True when `signature` (X-Twilio-Signature) matches any candidate URL or its port variants.

    JSON webhooks carry `bodySHA256=<hex sha256(body)>` in the URL: the signature then covers the
    URL alone and the body hash must match as well.
    """
    if not auth_token or not signature:
        return False
    body_hex = hashlib.sha256(body).hexdigest()
    matched = False
    for url in urls:
        claimed_hash = _twilio_body_hash(url)
        if claimed_hash is not None:
            if not _secure_equals(body_hex, claimed_hash.lower()):
                continue
            signed_params: Params = ()
        else:
            signed_params = params
        for candidate in twilio_url_variants(url):
            # No early exit: the work done does not depend on which candidate matched.
            matched |= _secure_equals(twilio_signature(auth_token, candidate, signed_params), signature)
    return matched


# ------------------------------------------------------------------------------------ Telnyx


def _b64decode_lenient(text: str) -> bytes:
    """Decode standard or URL-safe base64, padded or not; raise ValueError otherwise."""
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    alphabet_urlsafe = "-" in compact or "_" in compact
    try:
        if alphabet_urlsafe:
            return base64.b64decode(compact.replace("-", "+").replace("_", "/"), validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not valid base64") from exc


def load_ed25519_public_key(key: str) -> Ed25519PublicKey:
    """Load a Telnyx public key: raw 32 bytes in base64/base64url, PEM, or base64 DER SPKI."""
    text = key.strip()
    if not text:
        raise ValueError("empty Ed25519 public key")
    if text.startswith("-----BEGIN"):
        try:
            loaded = load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise ValueError("invalid PEM public key") from exc
    else:
        raw = _b64decode_lenient(text)
        if len(raw) == 32:
            return Ed25519PublicKey.from_public_bytes(raw)
        try:
            loaded = load_der_public_key(raw)
        except ValueError as exc:
            raise ValueError("public key is neither 32 raw bytes nor DER SubjectPublicKeyInfo") from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise ValueError("public key is not an Ed25519 key")
    return loaded


def decode_telnyx_signature(signature_b64: str) -> bytes | None:
    """The 64 signature bytes from base64 or base64url, or None if malformed."""
    try:
        raw = _b64decode_lenient(signature_b64)
    except ValueError:
        return None
    return raw if len(raw) == 64 else None


def verify_telnyx(
    public_key: Ed25519PublicKey | str,
    signature_b64: str,
    timestamp: str,
    body: bytes,
    now: float,
    tolerance_s: int = 300,
) -> tuple[bool, str]:
    """Ed25519 over b"{timestamp}|" + raw body, with |now - timestamp| <= tolerance_s.

    Returns (ok, reason); reason is "ok" or one of "missing signature", "missing timestamp",
    "malformed timestamp", "malformed signature", "stale timestamp", "future timestamp",
    "bad signature". A key given as text is loaded here (ValueError if invalid); load it once
    with load_ed25519_public_key at startup instead.
    """
    if not signature_b64:
        return False, "missing signature"
    if not timestamp:
        return False, "missing timestamp"
    ts_text = timestamp.strip()
    if not (ts_text.isascii() and ts_text.isdigit() and len(ts_text) <= 12):
        return False, "malformed timestamp"
    signature = decode_telnyx_signature(signature_b64)
    if signature is None:
        return False, "malformed signature"
    skew = now - int(ts_text)
    if skew > tolerance_s:
        return False, "stale timestamp"
    if skew < -tolerance_s:
        return False, "future timestamp"
    key = load_ed25519_public_key(public_key) if isinstance(public_key, str) else public_key
    # The signed message uses the header exactly as received, not the stripped copy.
    message = timestamp.encode("utf-8") + b"|" + body
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False, "bad signature"
    return True, "ok"


# ------------------------------------------------------------------------------------- Plivo


def _plivo_base(parts: SplitResult) -> str:
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _plivo_query_string(grouped: Mapping[str, Sequence[str]]) -> str:
    return "&".join(f"{name}={value}" for name in sorted(grouped) for value in sorted(grouped[name]))


def _plivo_params_string(grouped: Mapping[str, Sequence[str]]) -> str:
    return "".join(f"{name}{value}" for name in sorted(grouped) for value in sorted(grouped[name]))


def plivo_v3_base_string(method: str, url: str, params: Params | None) -> str:
    """The string Plivo V3 signs before '.' + nonce (see carriers.md 3.2)."""
    parts = urlsplit(url)
    base = _plivo_base(parts)
    query = normalize_params(parse_qsl(parts.query, keep_blank_values=True))
    posted = normalize_params(params)
    if method.upper() == "GET":
        # On a name present in both, the URL's query wins (as plivo-python's dict.update).
        merged = {**posted, **query}
        joined = _plivo_query_string(merged)
        return f"{base}?{joined}" if joined else base
    if posted:
        joined = _plivo_query_string(query)
        return f"{base}?{joined}" + ("." if joined else "") + _plivo_params_string(posted)
    joined = _plivo_query_string(query)
    return f"{base}?{joined}" if joined else base


def plivo_v3_signature(auth_token: str, method: str, url: str, params: Params | None, nonce: str) -> str:
    """base64(HMAC-SHA256(token, base_string + "." + nonce))."""
    return _hmac_b64(auth_token, f"{plivo_v3_base_string(method, url, params)}.{nonce}", "sha256")


def verify_plivo_v3(
    auth_token: str,
    method: str,
    url: str,
    params: Params | None,
    header_value: str,
    nonce: str,
) -> bool:
    """X-Plivo-Signature-V3 (or -Ma-V3) may list several signatures; any match passes."""
    if not auth_token or not header_value or not nonce:
        return False
    expected = plivo_v3_signature(auth_token, method, url, params, nonce)
    matched = False
    for candidate in _split_signatures(header_value):
        matched |= _secure_equals(expected, candidate)
    return matched


def plivo_v2_signature(auth_token: str, url: str, nonce: str) -> str:
    """base64(HMAC-SHA256(token, scheme://netloc/path + nonce)); the query is not signed."""
    return _hmac_b64(auth_token, _plivo_base(urlsplit(url)) + nonce, "sha256")


def verify_plivo_v2(auth_token: str, url: str, nonce: str, signature: str) -> bool:
    if not auth_token or not signature or not nonce:
        return False
    expected = plivo_v2_signature(auth_token, url, nonce)
    matched = False
    for candidate in _split_signatures(signature):
        matched |= _secure_equals(expected, candidate)
    return matched


def plivo_v1_signature(auth_token: str, url: str, params: Params | None) -> str:
    """Legacy X-Plivo-Signature: base64(HMAC-SHA1(token, url + sorted name+value))."""
    return _hmac_b64(auth_token, url + _plivo_params_string(normalize_params(params)), "sha1")


def verify_plivo_v1(auth_token: str, url: str, params: Params | None, signature: str) -> bool:
    if not auth_token or not signature:
        return False
    return _secure_equals(plivo_v1_signature(auth_token, url, params), signature.strip())


# ------------------------------------------------------------------------------ replay keys


def _digest(provider: str, *fields: object) -> str:
    # JSON framing keeps field boundaries unambiguous ("ab"+"c" never equals "a"+"bc").
    blob = json.dumps([provider, *fields], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def twilio_replay_key(url: str, params: Params, signature: str) -> str:
    grouped = normalize_params(params)
    canonical = [[name, sorted(grouped[name])] for name in sorted(grouped)]
    return _digest("twilio", url, canonical, signature.strip())


def telnyx_replay_key(timestamp: str, signature: str, body: bytes) -> str:
    # The same signature re-encoded (base64 vs base64url, padding) is the same delivery.
    raw = decode_telnyx_signature(signature)
    sig = raw.hex() if raw is not None else signature.strip()
    return _digest("telnyx", timestamp.strip(), sig, hashlib.sha256(body).hexdigest())


def plivo_replay_key(base_url: str, nonce: str) -> str:
    return _digest("plivo", base_url, nonce.strip())
