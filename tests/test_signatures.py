"""Signature algorithms: every published vector, the computed seed vectors, and the official SDKs
(twilio, plivo) as oracles over generated URLs and parameters."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import parse_qsl, urlencode

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict
from plivo.utils import validate_signature as plivo_sdk_validate_v2
from plivo.utils import validate_v3_signature as plivo_sdk_validate_v3
from plivo.utils.signature_v3 import construct_get_url, construct_post_url, get_signature_v3
from twilio.request_validator import RequestValidator

from carriers.signatures import (
    decode_telnyx_signature,
    load_ed25519_public_key,
    normalize_params,
    plivo_v1_signature,
    plivo_v2_signature,
    plivo_v3_base_string,
    plivo_v3_signature,
    twilio_signature,
    twilio_url_variants,
    verify_plivo_v1,
    verify_plivo_v2,
    verify_plivo_v3,
    verify_telnyx,
    verify_twilio,
)

# ------------------------------------------------------------------ Twilio vectors (carriers.md 1.2)

TW_TOKEN = "12345"
TW_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TW_FORM = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Digits", "1234"),
    ("From", "+14158675309"),
    ("To", "+18005551212"),
    ("Caller", "+14158675309"),
]
TW_MULTI = [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234"), ("Digits", "1234")]
TW_JSON_BODY = b'{"property": "value", "boolean": true}'
TW_JSON_SHA = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"


def test_twilio_vector_form() -> None:
    assert twilio_signature(TW_TOKEN, TW_URL, TW_FORM) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert verify_twilio(TW_TOKEN, [TW_URL], TW_FORM, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


def test_twilio_vector_https_port_443() -> None:
    url = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
    assert twilio_signature(TW_TOKEN, url, TW_FORM) == "kvajT1Ptam85bY51eRf/AJRuM3w="
    # Either form of the URL validates either signature (port stripped / default port added).
    for candidate in (url, TW_URL):
        assert verify_twilio(TW_TOKEN, [candidate], TW_FORM, "kvajT1Ptam85bY51eRf/AJRuM3w=")
        assert verify_twilio(TW_TOKEN, [candidate], TW_FORM, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


def test_twilio_vector_http_port_80() -> None:
    url = "http://mycompany.com:80/myapp.php?foo=1&bar=2"
    assert twilio_signature(TW_TOKEN, url, TW_FORM) == "0ZXoZLH/DfblKGATFgpif+LLRf4="
    assert verify_twilio(TW_TOKEN, [url], TW_FORM, "0ZXoZLH/DfblKGATFgpif+LLRf4=")
    assert verify_twilio(TW_TOKEN, ["http://mycompany.com/myapp.php?foo=1&bar=2"], TW_FORM, "0ZXoZLH/DfblKGATFgpif+LLRf4=")


def test_twilio_vector_custom_port_kept() -> None:
    url = "http://mycompany.com:1234/myapp.php?foo=1&bar=2"
    assert twilio_signature(TW_TOKEN, url, TW_FORM) == "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
    assert verify_twilio(TW_TOKEN, [url], TW_FORM, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=")
    # A custom port is not a default-port variant: the portless URL must not accept it.
    assert not verify_twilio(TW_TOKEN, ["http://mycompany.com/myapp.php?foo=1&bar=2"], TW_FORM, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=")


def test_twilio_vector_multi_value() -> None:
    assert twilio_signature(TW_TOKEN, TW_URL, TW_MULTI) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    as_mapping = {"Sid": "CA123", "SidAccount": "AC123", "Digits": ["5678", "1234", "1234"]}
    assert twilio_signature(TW_TOKEN, TW_URL, as_mapping) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    assert twilio_signature(TW_TOKEN, TW_URL, MultiDict(TW_MULTI)) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


def test_twilio_vector_signed_string_shape() -> None:
    # The documented signed strings, signed directly, give the same signatures.
    import hmac

    def sign(text: str) -> str:
        return base64.b64encode(hmac.new(b"12345", text.encode(), "sha1").digest()).decode()

    form = TW_URL + "CallSidCA1234567890ABCDECaller+14158675309Digits1234From+14158675309To+18005551212"
    multi = TW_URL + "Digits1234Digits5678SidCA123SidAccountAC123"
    assert sign(form) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert sign(multi) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


def test_twilio_vector_json_body_sha256() -> None:
    assert hashlib.sha256(TW_JSON_BODY).hexdigest() == TW_JSON_SHA
    url = f"{TW_URL}&bodySHA256={TW_JSON_SHA}"
    assert twilio_signature(TW_TOKEN, url, []) == "a9nBmqA0ju/hNViExpshrM61xv4="
    assert verify_twilio(TW_TOKEN, [url], [], "a9nBmqA0ju/hNViExpshrM61xv4=", TW_JSON_BODY)


def test_twilio_json_tampered_body_rejected() -> None:
    url = f"{TW_URL}&bodySHA256={TW_JSON_SHA}"
    tampered = TW_JSON_BODY.replace(b"true", b"false")
    assert not verify_twilio(TW_TOKEN, [url], [], "a9nBmqA0ju/hNViExpshrM61xv4=", tampered)
    assert not verify_twilio(TW_TOKEN, [url], [], "a9nBmqA0ju/hNViExpshrM61xv4=", b"")


def test_twilio_json_ignores_params() -> None:
    url = f"{TW_URL}&bodySHA256={TW_JSON_SHA}"
    assert verify_twilio(TW_TOKEN, [url], [("Injected", "x")], "a9nBmqA0ju/hNViExpshrM61xv4=", TW_JSON_BODY)


def test_twilio_seed_computed_vector() -> None:
    body = "CallSid=CS123&CallStatus=completed&From=%2B15550000000"
    params = parse_qsl(body, keep_blank_values=True)
    url = "https://example.com/voice/webhook?callId=abc"
    assert twilio_signature("test-auth-token", url, params) == "vonREHy+OojVJW0au8iM4cqoW3E="
    assert verify_twilio("test-auth-token", [url], params, "vonREHy+OojVJW0au8iM4cqoW3E=")


def test_twilio_rejects_wrong_token_param_and_empty() -> None:
    sig = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert not verify_twilio("54321", [TW_URL], TW_FORM, sig)
    assert not verify_twilio(TW_TOKEN, [TW_URL], TW_FORM + [("Extra", "1")], sig)
    assert not verify_twilio(TW_TOKEN, [TW_URL], TW_FORM, "")
    assert not verify_twilio("", [TW_URL], TW_FORM, sig)
    assert not verify_twilio(TW_TOKEN, [], TW_FORM, sig)
    assert not verify_twilio(TW_TOKEN, [TW_URL], TW_FORM, "RSOYDt4T1cUTdK1PDd93/VVr8B8=\u00e9")


def test_twilio_tries_every_candidate_url() -> None:
    sig = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert verify_twilio(TW_TOKEN, ["https://wrong.example/x", TW_URL], TW_FORM, sig)


def test_twilio_url_variants() -> None:
    assert twilio_url_variants("https://a.com/x?y=1") == ["https://a.com/x?y=1", "https://a.com:443/x?y=1"]
    assert twilio_url_variants("http://a.com:8080/x") == ["http://a.com:8080/x", "http://a.com/x"]
    assert twilio_url_variants("https://[::1]:8443/x") == ["https://[::1]:8443/x", "https://[::1]/x"]
    assert twilio_url_variants("https://a.com:bad/x") == ["https://a.com:bad/x"]


# -------------------------------------------------------------------- Twilio vs twilio-python

_host = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9](\.[a-z]{2,6}){1,2}", fullmatch=True)
_port = st.one_of(st.none(), st.integers(min_value=1, max_value=65535))
_segment = st.from_regex(r"[A-Za-z0-9._~-]{0,8}", fullmatch=True)
_path = st.lists(_segment, max_size=4).map(lambda parts: "/" + "/".join(parts))
_text = st.text(max_size=12)
_pairs = st.lists(st.tuples(_text, _text), max_size=6)


_ascii_text = st.text(alphabet=st.characters(max_codepoint=127), max_size=12)


@st.composite
def _urls(draw: st.DrawFn, query_text: st.SearchStrategy[str] = _text) -> str:
    scheme = draw(st.sampled_from(["http", "https"]))
    port = draw(_port)
    netloc = draw(_host) + (f":{port}" if port is not None else "")
    url = f"{scheme}://{netloc}{draw(_path)}"
    query = draw(st.lists(st.tuples(query_text, query_text), max_size=3))
    if query:
        url += "?" + urlencode(query)
    return url


@settings(max_examples=150, deadline=None)
@given(url=_urls(), pairs=_pairs, token=st.text(min_size=1, max_size=20))
def test_twilio_matches_sdk(url: str, pairs: list[tuple[str, str]], token: str) -> None:
    sdk = RequestValidator(token)
    ours = twilio_signature(token, url, pairs)
    assert ours == sdk.compute_signature(url, MultiDict(pairs))
    assert verify_twilio(token, [url], pairs, ours)
    assert sdk.validate(url, MultiDict(pairs), ours)
    for variant in twilio_url_variants(url):
        signed_for_variant = twilio_signature(token, variant, pairs)
        assert verify_twilio(token, [url], pairs, signed_for_variant) == sdk.validate(
            url, MultiDict(pairs), signed_for_variant
        )


@settings(max_examples=60, deadline=None)
@given(url=_urls(), body=st.text(max_size=40), token=st.text(min_size=1, max_size=20))
def test_twilio_json_form_matches_sdk(url: str, body: str, token: str) -> None:
    raw = body.encode("utf-8")
    sep = "&" if "?" in url else "?"
    signed_url = f"{url}{sep}bodySHA256={hashlib.sha256(raw).hexdigest()}"
    sig = twilio_signature(token, signed_url, [])
    sdk = RequestValidator(token)
    assert sdk.validate(signed_url, body, sig)
    assert verify_twilio(token, [signed_url], [], sig, raw)
    assert verify_twilio(token, [signed_url], [], sig, raw + b"x") == sdk.validate(signed_url, body + "x", sig)


# -------------------------------------------------------------------- Telnyx (carriers.md 2.2)

TX_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
TX_PUBLIC_B64 = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
TX_TIMESTAMP = "1700000000"
TX_BODY = (
    b'{"data":{"event_type":"call.initiated","id":"0ccc7b54-4df3-4bca-a65a-3da1ecc777f0",'
    b'"payload":{"call_control_id":"v3:abc"},"record_type":"event"}}'
)
TX_SIGNATURE = "s27Ouq2Yg5YFgFiP0BVtQJ8N5CXTGi4zCJ0d3TmPSo9PFdeSoNi5SDLaubcVU2iEVWt1We3UobtJDC9P+N5fCA=="
TX_NOW = 1_700_000_030.0


def _tx_private() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(TX_SEED)


def _key_forms() -> dict[str, str]:
    public = _tx_private().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "raw_base64": base64.b64encode(raw).decode(),
        "raw_base64url_unpadded": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "pem": pem.decode(),
        "der_base64": base64.b64encode(der).decode(),
    }


def test_telnyx_vector_key_is_rfc8032_test1() -> None:
    assert _key_forms()["raw_base64"] == TX_PUBLIC_B64
    assert _tx_private().sign(b"").hex().startswith("e5564300")
    assert _tx_private().sign(b"").hex().endswith("7a100b")


def test_telnyx_vector_self_made() -> None:
    key = load_ed25519_public_key(TX_PUBLIC_B64)
    assert verify_telnyx(key, TX_SIGNATURE, TX_TIMESTAMP, TX_BODY, now=TX_NOW) == (True, "ok")
    expected = base64.b64encode(_tx_private().sign(TX_TIMESTAMP.encode() + b"|" + TX_BODY)).decode()
    assert expected == TX_SIGNATURE


@pytest.mark.parametrize("form", ["raw_base64", "raw_base64url_unpadded", "pem", "der_base64"])
def test_telnyx_key_formats(form: str) -> None:
    key_text = _key_forms()[form]
    assert verify_telnyx(load_ed25519_public_key(key_text), TX_SIGNATURE, TX_TIMESTAMP, TX_BODY, now=TX_NOW)[0]
    # A key given as text is loaded on the fly.
    assert verify_telnyx(key_text, TX_SIGNATURE, TX_TIMESTAMP, TX_BODY, now=TX_NOW)[0]


def test_telnyx_key_surrounding_whitespace_ok() -> None:
    assert load_ed25519_public_key(f"  {TX_PUBLIC_B64}\n")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not base64 at all!",
        base64.b64encode(b"\x00" * 31).decode(),
        base64.b64encode(b"\x00" * 33).decode(),
        "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n",
    ],
)
def test_telnyx_bad_keys_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        load_ed25519_public_key(bad)


def test_telnyx_non_ed25519_key_rejected() -> None:
    x25519_pem = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ValueError, match="not an Ed25519"):
        load_ed25519_public_key(x25519_pem)


def test_telnyx_signature_base64url() -> None:
    url_form = TX_SIGNATURE.replace("+", "-").replace("/", "_")
    key = load_ed25519_public_key(TX_PUBLIC_B64)
    assert verify_telnyx(key, url_form, TX_TIMESTAMP, TX_BODY, now=TX_NOW) == (True, "ok")
    assert verify_telnyx(key, url_form.rstrip("="), TX_TIMESTAMP, TX_BODY, now=TX_NOW) == (True, "ok")
    assert decode_telnyx_signature(url_form) == decode_telnyx_signature(TX_SIGNATURE)


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (1_700_000_000 + 301, "stale timestamp"),
        (1_700_000_000 + 86_400, "stale timestamp"),
        (1_700_000_000 - 301, "future timestamp"),
        (1_700_000_000 - 86_400, "future timestamp"),
    ],
)
def test_telnyx_timestamp_outside_window(now: float, reason: str) -> None:
    key = load_ed25519_public_key(TX_PUBLIC_B64)
    assert verify_telnyx(key, TX_SIGNATURE, TX_TIMESTAMP, TX_BODY, now=now) == (False, reason)


@pytest.mark.parametrize("now", [1_700_000_000 + 300, 1_700_000_000 - 300, 1_700_000_000])
def test_telnyx_timestamp_window_edges_inclusive(now: float) -> None:
    key = load_ed25519_public_key(TX_PUBLIC_B64)
    assert verify_telnyx(key, TX_SIGNATURE, TX_TIMESTAMP, TX_BODY, now=now) == (True, "ok")


def test_telnyx_custom_tolerance() -> None:
    key = load_ed25519_public_key(TX_PUBLIC_B64)
    assert verify_telnyx(key, TX_SIGNATURE, TX_TIMESTAMP, TX_BODY, now=TX_NOW, tolerance_s=10) == (False, "stale timestamp")


@pytest.mark.parametrize(
    "body",
    [
        TX_BODY + b" ",
        TX_BODY.replace(b"call.initiated", b"call.hangup"),
        TX_BODY[:-1],
        b"",
    ],
)
def test_telnyx_tampered_body(body: bytes) -> None:
    key = load_ed25519_public_key(TX_PUBLIC_B64)
    assert verify_telnyx(key, TX_SIGNATURE, TX_TIMESTAMP, body, now=TX_NOW) == (False, "bad signature")


def test_telnyx_tampered_timestamp_is_bad_signature() -> None:
    key = load_ed25519_public_key(TX_PUBLIC_B64)
    assert verify_telnyx(key, TX_SIGNATURE, "1700000001", TX_BODY, now=TX_NOW) == (False, "bad signature")


def test_telnyx_wrong_key() -> None:
    other = Ed25519PrivateKey.generate().public_key()
    assert verify_telnyx(other, TX_SIGNATURE, TX_TIMESTAMP, TX_BODY, now=TX_NOW) == (False, "bad signature")


@pytest.mark.parametrize(
    ("signature", "timestamp", "reason"),
    [
        ("", TX_TIMESTAMP, "missing signature"),
        (TX_SIGNATURE, "", "missing timestamp"),
        (TX_SIGNATURE, "17e8", "malformed timestamp"),
        (TX_SIGNATURE, "-1700000000", "malformed timestamp"),
        (TX_SIGNATURE, "1_700_000_000", "malformed timestamp"),
        ("!!!not-base64!!!", TX_TIMESTAMP, "malformed signature"),
        (base64.b64encode(b"\x01" * 63).decode(), TX_TIMESTAMP, "malformed signature"),
        (base64.b64encode(b"\x01" * 65).decode(), TX_TIMESTAMP, "malformed signature"),
    ],
)
def test_telnyx_malformed_inputs(signature: str, timestamp: str, reason: str) -> None:
    key = load_ed25519_public_key(TX_PUBLIC_B64)
    assert verify_telnyx(key, signature, timestamp, TX_BODY, now=TX_NOW) == (False, reason)


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=200), skew=st.integers(min_value=-300, max_value=300), flip=st.integers(min_value=0))
def test_telnyx_roundtrip_and_any_bitflip_fails(body: bytes, skew: int, flip: int) -> None:
    private = _tx_private()
    key = private.public_key()
    ts = "1700001234"
    signature = private.sign(ts.encode() + b"|" + body)
    sig_b64 = base64.b64encode(signature).decode()
    assert verify_telnyx(key, sig_b64, ts, body, now=1_700_001_234 + skew) == (True, "ok")
    if body:
        index = flip % len(body)
        tampered = body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]
        assert verify_telnyx(key, sig_b64, ts, tampered, now=1_700_001_234) == (False, "bad signature")
    bad_sig = bytearray(signature)
    bad_sig[flip % 64] ^= 0x80
    ok, _ = verify_telnyx(key, base64.b64encode(bytes(bad_sig)).decode(), ts, body, now=1_700_001_234)
    assert not ok


# --------------------------------------------------------------------- Plivo (carriers.md 3.2)

PV_TOKEN = "Y2Q2ZDgxZmY5YWRiOTI5YmQ1Njg0MTAxZWIyOTc4"
PV_NONCE = "31627761595286130198"
PV_PARAMS = {
    "Direction": "outbound",
    "From": "19792014278",
    "ALegUUID": "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36",
    "CallStatus": "in-progress",
    "BillRate": "0.002",
    "ParentAuthID": "MANWVLYTK4ZWU1YTY4QA",
    "To": "sip:PlivoSignature382029104058171078704104@phone-qa.voice.plivodev.com",
    "ALegRequestUUID": "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36",
    "CallUUID": "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36",
    "RequestUUID": "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36",
    "SIP-H-To": "<sip:PlivoSignature382029104058171078704104@52.9.11.55;transport=udp>;tag=1",
    "SessionStart": "2020-04-08 11:34:33.238707",
    "Event": "StartApp",
}
PV_URL_QUERY = "https://plivobin.non-prod.plivops.com/api/v1/validate_signature03.xml/?a=b&c=d"
PV_URL_PLAIN = "https://plivobin.non-prod.plivops.com/api/v1/validate_signature03.xml"


def _check_plivo_v3(method: str, url: str, expected: str) -> None:
    assert plivo_v3_signature(PV_TOKEN, method, url, PV_PARAMS, PV_NONCE) == expected
    assert verify_plivo_v3(PV_TOKEN, method, url, PV_PARAMS, expected, PV_NONCE)
    assert plivo_sdk_validate_v3(method, url, PV_NONCE, PV_TOKEN, expected, dict(PV_PARAMS))


def test_plivo_v3_vector_pass1_post_with_query() -> None:
    _check_plivo_v3("POST", PV_URL_QUERY, "k7Pusd4OxCIjR5IfA9iedDNu/h/gbdYqdzG/MiYtd1c=")


def test_plivo_v3_vector_pass2_get_with_query() -> None:
    _check_plivo_v3("GET", PV_URL_QUERY, "UBq8jAtd32wR8EK9VgxbBn4n5rpI/l1H9iN4WfSEHFQ=")


def test_plivo_v3_vector_pass3_post_without_query() -> None:
    _check_plivo_v3("POST", PV_URL_PLAIN, "iAjE5QqI37mbkYe4w3jTMudqEzbDufdqi7sYwTu64e0=")


def test_plivo_v3_vector_pass4_get_without_query() -> None:
    _check_plivo_v3("GET", PV_URL_PLAIN, "i/MQsaQSAd6fiKhOh2qeeeLHZ9faldADSb3/7+Akfbc=")


def test_plivo_v3_vector_signed_string_key_order() -> None:
    base = plivo_v3_base_string("POST", PV_URL_QUERY, PV_PARAMS)
    assert base.startswith(PV_URL_QUERY + ".ALegRequestUUID3e82ae9d")
    order = ["ALegRequestUUID", "ALegUUID", "BillRate", "CallStatus", "CallUUID", "Direction", "Event",
             "From", "ParentAuthID", "RequestUUID", "SIP-H-To", "SessionStart", "To"]
    assert base == PV_URL_QUERY + "." + "".join(name + PV_PARAMS[name] for name in order)


def test_plivo_v3_method_case_insensitive() -> None:
    assert plivo_v3_signature(PV_TOKEN, "get", PV_URL_QUERY, PV_PARAMS, PV_NONCE) == "UBq8jAtd32wR8EK9VgxbBn4n5rpI/l1H9iN4WfSEHFQ="


def test_plivo_v3_multi_signature_header() -> None:
    good = "k7Pusd4OxCIjR5IfA9iedDNu/h/gbdYqdzG/MiYtd1c="
    other = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    for header in (f"{other},{good}", f"{good},{other}", f"{other}, {good}"):
        assert verify_plivo_v3(PV_TOKEN, "POST", PV_URL_QUERY, PV_PARAMS, header, PV_NONCE)
    assert not verify_plivo_v3(PV_TOKEN, "POST", PV_URL_QUERY, PV_PARAMS, f"{other},{other}", PV_NONCE)


def test_plivo_v3_rejects_tampering() -> None:
    good = "k7Pusd4OxCIjR5IfA9iedDNu/h/gbdYqdzG/MiYtd1c="
    tampered = dict(PV_PARAMS, CallStatus="completed")
    assert not verify_plivo_v3(PV_TOKEN, "POST", PV_URL_QUERY, tampered, good, PV_NONCE)
    assert not verify_plivo_v3(PV_TOKEN, "POST", PV_URL_QUERY, PV_PARAMS, good, PV_NONCE + "1")
    assert not verify_plivo_v3(PV_TOKEN + "x", "POST", PV_URL_QUERY, PV_PARAMS, good, PV_NONCE)
    assert not verify_plivo_v3(PV_TOKEN, "GET", PV_URL_QUERY, PV_PARAMS, good, PV_NONCE)
    assert not verify_plivo_v3(PV_TOKEN, "POST", PV_URL_QUERY, PV_PARAMS, "", PV_NONCE)
    assert not verify_plivo_v3(PV_TOKEN, "POST", PV_URL_QUERY, PV_PARAMS, good, "")


def test_plivo_v3_reordered_query_same_signature() -> None:
    reordered = PV_URL_QUERY.replace("?a=b&c=d", "?c=d&a=b")
    assert plivo_v3_signature(PV_TOKEN, "POST", reordered, PV_PARAMS, PV_NONCE) == "k7Pusd4OxCIjR5IfA9iedDNu/h/gbdYqdzG/MiYtd1c="


def test_plivo_v3_forms() -> None:
    base = "https://h.example/cb"
    # POST, params, no query: '?' stays, no '.' separator.
    assert plivo_v3_base_string("POST", base, {"B": "2", "A": "1"}) == f"{base}?A1B2"
    # POST, no params: the query only.
    assert plivo_v3_base_string("POST", f"{base}?z=1&y=2", {}) == f"{base}?y=2&z=1"
    assert plivo_v3_base_string("POST", base, None) == base
    # List values are sorted and repeated; uppercase sorts first.
    assert plivo_v3_base_string("POST", f"{base}?q=1", {"k": ["b", "a"], "K": "x"}) == f"{base}?q=1.Kxkakb"
    assert plivo_v3_base_string("GET", f"{base}?k=2&k=1", {"a": "x"}) == f"{base}?a=x&k=1&k=2"
    # Pairs with repeated names are the same as a list value.
    assert plivo_v3_base_string("POST", base, [("k", "b"), ("k", "a")]) == f"{base}?kakb"


def test_plivo_v3_seed_computed_vector() -> None:
    url = "https://example.com/voice/webhook?callId=abc&flow=answer"
    params = [("CallStatus", "in-progress"), ("CallUUID", "uuid"), ("From", "+15550000000")]
    base = plivo_v3_base_string("POST", url, params)
    assert f"{base}.nonce-456" == (
        "https://example.com/voice/webhook?callId=abc&flow=answer.CallStatusin-progressCallUUIDuuidFrom+15550000000.nonce-456"
    )
    assert plivo_v3_signature("test-auth-token", "POST", url, params, "nonce-456") == "bC2SrisyhbS+0kQ0P5ZcXWYJcKAOkwrO60AVtfoARUc="


def test_plivo_v2_vector_pass() -> None:
    assert plivo_v2_signature("my_auth_token", "https://answer.url", "12345") == "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc="
    assert verify_plivo_v2("my_auth_token", "https://answer.url", "12345", "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc=")
    assert plivo_sdk_validate_v2("https://answer.url", "12345", "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc=", "my_auth_token")


def test_plivo_v2_vector_wrong_token_fails() -> None:
    assert not verify_plivo_v2("my_auth_tokens", "https://answer.url", "12345", "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc=")
    assert not plivo_sdk_validate_v2("https://answer.url", "12345", "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc=", "my_auth_tokens")


def test_plivo_v2_query_not_signed() -> None:
    sig = "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc="
    assert verify_plivo_v2("my_auth_token", "https://answer.url?x=1&y=2", "12345", sig)
    assert not verify_plivo_v2("my_auth_token", "https://answer.url", "123456", sig)


def test_plivo_v2_seed_computed_vector() -> None:
    assert plivo_v2_signature("test-auth-token", "https://example.com/voice/webhook", "nonce-123") == (
        "PJ9V+hFrV8Su5B6Bvt6VGdBBRCiXrBXSTYguozRD+CY="
    )


def test_plivo_v1_vector_call_uuid_duration() -> None:
    params = {"CallUUID": "97ceeb52-58b6-11e1-86da-77300b68f8bb", "Duration": "300"}
    assert plivo_v1_signature("MAXXXXXXXXXXXXXXXXXX", "http://foo.com/answer/", params) == "EJEt0ELanhr8hjMPIJnLNLex0dE="
    assert verify_plivo_v1("MAXXXXXXXXXXXXXXXXXX", "http://foo.com/answer/", params, "EJEt0ELanhr8hjMPIJnLNLex0dE=")


def test_plivo_v1_vector_space_value() -> None:
    assert plivo_v1_signature("MAXXXXXXXXXXXXXXXXXX", "http://foo.com/answer/", {"a": "1 2"}) == "n3Xfo4u+vRFyl3gsH8B0qDUIK5g="
    assert not verify_plivo_v1("MAXXXXXXXXXXXXXXXXXX", "http://foo.com/answer/", {"a": "1  2"}, "n3Xfo4u+vRFyl3gsH8B0qDUIK5g=")


# ---------------------------------------------------------------------- Plivo vs plivo-python

_plivo_value = st.one_of(_text, st.lists(_text, min_size=1, max_size=3))
_plivo_params = st.dictionaries(st.text(min_size=1, max_size=8), _plivo_value, max_size=6)
_nonce = st.from_regex(r"[0-9A-Za-z-]{1,24}", fullmatch=True)


def _sdk_v3(method: str, url: str, params: dict[str, object], nonce: str, token: str) -> str:
    copy = {k: (list(v) if isinstance(v, list) else v) for k, v in params.items()}
    built = construct_get_url(url, copy) if method == "GET" else construct_post_url(url, copy)
    return get_signature_v3(token.encode(), built.decode("utf-8"), nonce.encode()).decode()


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST"]),
    url=_urls(query_text=_ascii_text),
    params=_plivo_params,
    nonce=_nonce,
    token=st.text(min_size=1, max_size=20),
)
def test_plivo_v3_matches_sdk(method: str, url: str, params: dict[str, object], nonce: str, token: str) -> None:
    ours = plivo_v3_signature(token, method, url, params, nonce)  # type: ignore[arg-type]
    assert ours == _sdk_v3(method, url, params, nonce, token)
    assert plivo_sdk_validate_v3(method, url, nonce, token, ours, dict(params))
    assert verify_plivo_v3(token, method, url, params, ours, nonce)  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(url=_urls(query_text=_ascii_text), nonce=_nonce, token=st.text(min_size=1, max_size=20))
def test_plivo_v2_matches_sdk(url: str, nonce: str, token: str) -> None:
    ours = plivo_v2_signature(token, url, nonce)
    assert plivo_sdk_validate_v2(url, nonce, ours, token)
    assert verify_plivo_v2(token, url, nonce, ours)


def test_normalize_params_forms() -> None:
    expected = {"a": ["1", "2"], "b": ["3"]}
    assert normalize_params([("a", "1"), ("b", "3"), ("a", "2")]) == expected
    assert normalize_params({"a": ["1", "2"], "b": "3"}) == expected
    assert normalize_params(MultiDict([("a", "1"), ("b", "3"), ("a", "2")])) == expected
    assert normalize_params(None) == {}


def test_plivo_v3_non_ascii_query_decoded_as_utf8() -> None:
    # plivo-python raises UnicodeEncodeError on this URL; the query is decoded as UTF-8 here
    # (as plivo-go's url.ParseQuery does), so the signed string carries the character itself.
    url = "https://h.example/cb?name=%C3%A9t%C3%A9"
    assert plivo_v3_base_string("POST", url, {}) == "https://h.example/cb?name=\u00e9t\u00e9"
    with pytest.raises(UnicodeEncodeError):
        construct_get_url(url, {})


def test_plivo_v3_path_parameters_kept() -> None:
    # plivo-python's urlparse drops ';b' from the last path segment; the path is signed as sent
    # here (urlsplit), the form plivo-go's url.Parse keeps too.
    assert plivo_v3_base_string("POST", "https://h.example/a;b?x=1", {"k": "v"}) == "https://h.example/a;b?x=1.kv"
    assert construct_post_url("https://h.example/a;b?x=1", {"k": "v"}) == b"https://h.example/a?x=1.kv"
