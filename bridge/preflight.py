"""What `serve` builds before it listens (carrier, TTS, STT, answering model), built here without any
network, so `voicecall check` refuses every config `serve` would refuse, each problem in one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bridge.config import Settings, reveal


def preflight(settings: Settings) -> list[str]:
    from bridge.responder import create_responder
    from carriers.registry import create_carrier
    from media.tts.factory import create_tts

    def stt() -> Any:
        if settings.streaming.provider in (None, "none") and not settings.streaming.enabled:
            return None
        from media.stt.factory import create_stt

        return create_stt(reveal(settings.streaming.model_dump(mode="python")))

    def responder() -> Any:
        if settings.responseModel == "none":
            return None
        secret = settings.responseApiKey.get_secret_value() if settings.responseApiKey else None
        return create_responder(settings.responseModel, base_url=settings.responseBaseUrl, api_key=secret,
                                system_prompt=settings.responseSystemPrompt, timeout_ms=settings.responseTimeoutMs)

    steps: list[tuple[str, Callable[[], Any]]] = [
        (f"provider {settings.provider}", lambda: create_carrier(settings)),
        ("tts", lambda: create_tts(settings.effective_tts)),
        ("streaming.provider", stt),
        ("responseModel", responder),
    ]
    problems: list[str] = []
    for what, build in steps:
        try:
            build()
        except ImportError as exc:
            problems.append(f"{what}: needs the Python package {exc.name or exc} (pip install the matching extra)")
            continue
        except Exception as exc:  # noqa: BLE001 - every engine has its own error type; all are config problems
            message = " ".join(str(exc).split()) or type(exc).__name__
            problems.append(message if message.startswith(what.split()[0]) else f"{what}: {message}")
    return problems
