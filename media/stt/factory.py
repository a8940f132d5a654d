"""Build the call STT engine from the `streaming` config section (after secrets are revealed)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from media.stt.base import SttEngine, SttError

log = logging.getLogger(__name__)


def create_stt(streaming: Mapping[str, Any] | None) -> SttEngine | None:
    """`streaming.provider`: "openai" | "deepgram" | "pocketsphinx" | "none"; unset picks OpenAI when a key is
    configured (or OPENAI_API_KEY is set), else none. Options come from `streaming.providers.<name>`."""
    streaming = streaming or {}
    providers = streaming.get("providers") or {}
    provider = streaming.get("provider")
    if provider is None:
        has_key = (providers.get("openai") or {}).get("apiKey") or os.environ.get("OPENAI_API_KEY")
        provider = "openai" if has_key else "none"
    provider = str(provider).lower()
    if provider in ("openai", "openai-realtime"):
        from media.stt.openai_realtime import OpenAiRealtimeStt

        return OpenAiRealtimeStt.from_config(dict(providers.get("openai") or {}))
    if provider == "deepgram":
        from media.stt.deepgram import DeepgramStt

        return DeepgramStt.from_config(dict(providers.get("deepgram") or {}))
    if provider == "pocketsphinx":
        from media.stt.pocketsphinx import PocketsphinxStt

        return PocketsphinxStt.from_config(dict(providers.get("pocketsphinx") or {}))
    if provider == "none":
        return None
    raise SttError(f"streaming.provider must be openai, deepgram, pocketsphinx or none (got {provider!r})")
