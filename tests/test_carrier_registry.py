"""A carrier is its package plus one registry line: config picks its section up from the registry."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_one_registry_line_adds_a_provider_and_its_config_section() -> None:
    result = _run("""
        import carriers.registry as registry
        registry.REGISTRY["echo"] = registry.CarrierEntry("carriers.mock.carrier:from_settings",
                                                          "carriers.mock.settings:MockSettings")
        from bridge.config import ConfigError, build_settings
        settings = build_settings({"provider": "echo", "echo": {"ringDelayMs": 5}}, {})
        assert settings.provider == "echo" and settings.echo.ringDelayMs == 5
        assert settings.masked()["echo"]["ringDelayMs"] == 5
        try:
            build_settings({"provider": "echo", "echo": {"ringDelay": 5}}, {})
        except ConfigError as exc:
            print(exc)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "echo.ringDelay: unknown key; did you mean 'ringDelayMs'?"


def test_unregistered_provider_is_refused_with_the_registered_names() -> None:
    from bridge.config import ConfigError, build_settings

    try:
        build_settings({"provider": "skype"}, {})
    except ConfigError as exc:
        message = str(exc)
    else:
        raise AssertionError("provider skype was accepted")
    assert message.startswith("provider: ")
    for name in ("mock", "twilio", "telnyx", "plivo", "sip", "asterisk"):
        assert repr(name) in message
