"""Config loading: every example deploys, errors name key and rule, env fallbacks, seed JSON5 files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.config import ConfigError, build_settings, load_settings, parse_text

ROOT = Path(__file__).resolve().parents[1]
CREDS_ENV = {
    "TWILIO_ACCOUNT_SID": "AC0123456789abcdef0123456789abcdef",
    "TWILIO_AUTH_TOKEN": "twilio-secret-token",
    "TELNYX_API_KEY": "KEY-telnyx-secret",
    "TELNYX_CONNECTION_ID": "conn-1",
    "TELNYX_PUBLIC_KEY": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
    "PLIVO_AUTH_ID": "MAXXXXXXXXXXXXXXXXXX",
    "PLIVO_AUTH_TOKEN": "plivo-secret-token",
    "ASTERISK_ARI_PASSWORD": "ari-secret-password",
}


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path: Path) -> None:
    settings = load_settings(path, env=CREDS_ENV)
    assert settings.provider in ("mock", "twilio", "telnyx", "plivo", "sip", "asterisk")


def test_required_config_examples_exist() -> None:
    names = {p.name for p in (ROOT / "config").glob("*.yaml")}
    assert {"mock.yaml", "twilio.yaml", "telnyx.yaml", "plivo.yaml"} <= names


def test_builtin_default_is_offline_mock() -> None:
    settings = load_settings(None, env={})
    assert settings.provider == "mock"
    assert settings.effective_tts["provider"] == "espeak"
    assert settings.responseModel == "offline"


def test_env_var_selects_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("provider: mock\nmaxConcurrentCalls: 7\n")
    assert load_settings(None, env={"VOICECALL_CONFIG": str(path)}).maxConcurrentCalls == 7
    # --config wins over the environment
    other = tmp_path / "d.yaml"
    other.write_text("provider: mock\nmaxConcurrentCalls: 9\n")
    assert load_settings(other, env={"VOICECALL_CONFIG": str(path)}).maxConcurrentCalls == 9


def _problems(raw: dict, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_settings(raw, env or {})
    return info.value.problems


def test_unknown_key_gets_did_you_mean() -> None:
    assert _problems({"provider": "mock", "maxConcurentCalls": 2}) == [
        "maxConcurentCalls: unknown key; did you mean 'maxConcurrentCalls'?"]
    assert _problems({"provider": "mock", "serve": {"prot": 1}}) == ["serve.prot: unknown key; did you mean 'port'?"]


def test_e164_rule_names_the_key() -> None:
    problems = _problems({"provider": "mock", "fromNumber": "5550001234"})
    assert problems == ["fromNumber: must be an E.164 number like +15550001234 (got '5550001234')"]
    assert _problems({"provider": "mock", "allowFrom": ["+15550001234", "bob"]}) == [
        "allowFrom[1]: must be an E.164 number or a sip: URI (got 'bob')"]


def test_provider_credentials_required() -> None:
    problems = _problems({"provider": "twilio", "fromNumber": "+15550001234"})
    assert "twilio.accountSid: required when provider is twilio (or set TWILIO_ACCOUNT_SID)" in problems
    assert "twilio.authToken: required when provider is twilio (or set TWILIO_AUTH_TOKEN)" in problems


def test_telnyx_public_key_required_unless_verification_skipped() -> None:
    env = {k: v for k, v in CREDS_ENV.items() if k != "TELNYX_PUBLIC_KEY"}
    problems = _problems({"provider": "telnyx", "fromNumber": "+15550001234"}, env)
    assert problems == ["telnyx.publicKey: required when provider is telnyx (or set TELNYX_PUBLIC_KEY)"]
    ok = build_settings({"provider": "telnyx", "fromNumber": "+15550001234", "skipSignatureVerification": True}, env)
    assert ok.telnyx.publicKey is None


def test_credentials_fall_back_to_environment() -> None:
    settings = build_settings({"provider": "twilio", "fromNumber": "+15550001234"}, CREDS_ENV)
    assert settings.twilio.accountSid == CREDS_ENV["TWILIO_ACCOUNT_SID"]
    assert settings.twilio.authToken.get_secret_value() == "twilio-secret-token"


def test_bad_values_name_key_and_rule() -> None:
    problems = _problems({"provider": "mock", "outbound": {"defaultMode": "shout"}, "serve": {"port": 70000}})
    assert any(p.startswith("outbound.defaultMode: ") and "notify" in p for p in problems)
    assert any(p.startswith("serve.port: ") and "65535" in p for p in problems)


def test_masked_output_hides_every_secret() -> None:
    settings = build_settings({"provider": "twilio", "fromNumber": "+15550001234",
                               "rpc": {"token": "rpc-secret"}}, CREDS_ENV)
    text = json.dumps(settings.masked(), default=str)
    for secret in ("twilio-secret-token", "rpc-secret"):
        assert secret not in text
    assert CREDS_ENV["TWILIO_ACCOUNT_SID"] in text  # an account id is not a secret


def test_tts_deep_merges_over_messages_tts() -> None:
    settings = build_settings({"provider": "mock", "messages": {"tts": {"provider": "openai",
                               "openai": {"voice": "alloy", "model": "tts-1"}}},
                               "tts": {"openai": {"model": "gpt-4o-mini-tts"}}}, {})
    assert settings.effective_tts == {"provider": "openai", "openai": {"voice": "alloy", "model": "gpt-4o-mini-tts"}}


def test_seed_json5_file_is_accepted(tmp_path: Path) -> None:
    text = """{
      // copied from the seed gateway config
      plugins: { entries: { "voice-call": { enabled: true, config: {
        provider: "log",
        twilio: { from: "+15550001234" },
        inboundPolicy: "allowlist", allowFrom: ["+15550009999"],
        streaming: { enabled: true, sttModel: "gpt-4o-mini-transcribe", vadThreshold: 0.6 },
      } } } },
      messages: { tts: { provider: "openai", openai: { voice: "alloy" } } },
    }"""
    path = tmp_path / "openclaw.json5"
    path.write_text(text)
    settings = load_settings(path, env={})
    assert settings.provider == "mock"  # legacy "log"
    assert settings.fromNumber == "+15550001234"  # legacy twilio.from
    assert settings.streaming.providers.openai.model == "gpt-4o-mini-transcribe"
    assert settings.streaming.providers.openai.vadThreshold == 0.6
    assert settings.effective_tts["openai"]["voice"] == "alloy"


def test_malformed_yaml_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_text("provider: [unclosed", "bad.yaml")
    assert info.value.problems[0].startswith("bad.yaml: not valid YAML")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.yaml", env={})
    assert "cannot read config file" in info.value.problems[0]


def test_sip_concurrency_is_bounded_by_workers_times_their_call_table() -> None:
    # "auto" sizes the pool: 10 calls need 3 user agents of 4 calls.
    settings = build_settings({"provider": "sip", "maxConcurrentCalls": 10}, {})
    assert settings.sip.worker_count(settings.maxConcurrentCalls) == 3
    problems = _problems({"provider": "sip", "maxConcurrentCalls": 10, "sip": {"workers": 2}})
    assert problems == ['maxConcurrentCalls: must not exceed sip.workers x sip.maxCalls (2 x 4); '
                        'set sip.workers to "auto" or at least 3']
    problems = _problems({"provider": "sip", "maxConcurrentCalls": 10, "sip": {"transport": "tcp"}})
    assert problems == ["sip.transport: more than one SIP worker needs udp (the SIP front is a UDP proxy)"]
    problems = _problems({"provider": "sip", "maxConcurrentCalls": 40, "sip": {"rtpPortRange": 40}})
    assert problems == ["sip.rtpPortRange: must be at least 80 (2 ports per call: 10 workers x 4 calls)"]
    assert _problems({"provider": "sip", "sip": {"workers": 0}})[0].startswith("sip.workers:")


def test_outbound_frame_ms_is_20_or_40_and_defaults_to_40() -> None:
    assert build_settings({"provider": "mock"}, {}).streaming.outboundFrameMs == 40
    assert build_settings({"provider": "mock", "streaming": {"outboundFrameMs": 20}}, {}).streaming.outboundFrameMs == 20
    for bad in (30, 60, "fast"):
        assert _problems({"provider": "mock", "streaming": {"outboundFrameMs": bad}}) == [
            "streaming.outboundFrameMs: Input should be 20 or 40"]


def test_asterisk_section_rules_name_the_key() -> None:
    problems = _problems({"provider": "asterisk"})
    assert problems == [
        "asterisk.username: required when provider is asterisk (an ari.conf user)",
        "asterisk.password: required when provider is asterisk (or set ASTERISK_ARI_PASSWORD)",
    ]
    ok = build_settings({"provider": "asterisk", "asterisk": {"username": "vc", "url": "http://pbx:8088/ari/"}},
                        {"ASTERISK_ARI_PASSWORD": "ari-secret-password"})
    assert ok.asterisk.password is not None and ok.asterisk.password.get_secret_value() == "ari-secret-password"
    assert ok.asterisk.url == "http://pbx:8088"  # the base URL, with or without /ari
    assert "ari-secret-password" not in json.dumps(ok.masked(), default=str)
    base = {"provider": "asterisk", "asterisk": {"username": "vc", "password": "pw"}}

    def problem(**section: object) -> list[str]:
        return _problems({**base, "asterisk": {**base["asterisk"], **section}})

    assert problem(url="pbx:8088")[0].startswith("asterisk.url: ") and "http://" in problem(url="pbx:8088")[0]
    assert problem(endpoint="PJSIP/trunk")[0].startswith("asterisk.endpoint: must contain {to}")
    assert problem(endpoint="{to}")[0].startswith("asterisk.endpoint: must be a dial string")
    assert problem(format="opus")[0].startswith("asterisk.format: ") and "slin16" in problem(format="opus")[0]
    assert problem(rtpBindAddress="0.0.0.0") == [
        "asterisk.rtpAdvertiseAddress: required when rtpBindAddress is 0.0.0.0 (the address Asterisk sends the call's RTP to)"]
    assert problem(rtpBindAddress="localhost")[0] == "asterisk.rtpBindAddress: must be an IP address (got 'localhost')"
    assert problem(rtpPortStart=65000, rtpPortRange=1000)[0].startswith("asterisk: rtpPortStart + rtpPortRange")
    assert problem(aap="voicecall") == ["asterisk.aap: unknown key; did you mean 'app'?"]
    assert _problems({**base, "maxConcurrentCalls": 5, "asterisk": {**base["asterisk"], "rtpPortRange": 4}}) == [
        "asterisk.rtpPortRange: must be at least maxConcurrentCalls (5): one RTP port per call"]


@pytest.mark.parametrize("source", ["c.yaml", "c.json5"])
@pytest.mark.parametrize("depth", [33, 900, 5000])
def test_a_deeply_nested_config_is_one_clear_error(source: str, depth: int) -> None:
    text = "{allowFrom: " + "[" * depth + "1" + "]" * depth + "}\n"
    with pytest.raises(ConfigError) as info:
        build_settings(parse_text(text, source), {})
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(source)


def test_shared_yaml_nodes_are_walked_once() -> None:
    """An alias bomb (each level refers to the one before, nine times) is checked in linear time."""
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="unknown key"):
        build_settings(parse_text("\n".join(lines) + "\n", "c.yaml"), {})
