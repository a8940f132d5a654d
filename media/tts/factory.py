"""Build the call TTS engine from the merged `tts` config (plugin `tts` deep-merged over
`messages.tts`; see `merge_tts_config`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from media.tts.base import TtsEngine, TtsError

log = logging.getLogger(__name__)

PROVIDERS = ("espeak", "openai", "elevenlabs", "edge")


def merge_tts_config(base: Mapping[str, Any] | None, override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Deep merge: dicts merge key by key, anything else in `override` wins."""
    out: dict[str, Any] = dict(base or {})
    for k, v in (override or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_tts_config(out[k], v)
        else:
            out[k] = v
    return out


def create_tts(tts: Mapping[str, Any] | None) -> TtsEngine:
    tts = tts or {}
    provider = str(tts.get("provider") or "espeak").lower()
    if provider not in PROVIDERS:
        raise TtsError(f"tts.provider must be one of {', '.join(PROVIDERS)} (got {provider!r})")
    if provider == "edge":
        log.warning("tts.provider 'edge' is ignored for calls (telephony needs PCM); using espeak-ng")
        provider = "espeak"
    section = dict(tts.get(provider) or {})
    if provider == "openai":
        from media.tts.openai import OpenAiTts

        return OpenAiTts.from_config(section)
    if provider == "elevenlabs":
        from media.tts.elevenlabs import ElevenLabsTts

        return ElevenLabsTts.from_config(section)
    from media.tts.espeak import EspeakTts

    return EspeakTts.from_config(section)
