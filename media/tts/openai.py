"""OpenAI TTS (`/v1/audio/speech`, response_format=pcm: raw s16le mono at 24 kHz), streamed
through the official SDK. Works with any OpenAI-compatible server via `baseUrl`."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from media.tts.base import EvenBytes, TtsEngine, TtsError

OPENAI_PCM_RATE = 24000
DEFAULT_MODEL = "gpt-4o-mini-tts"
DEFAULT_VOICE = "alloy"


class OpenAiTts(TtsEngine):
    name = "openai"
    sample_rate = OPENAI_PCM_RATE

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        model: str = DEFAULT_MODEL,
        voice: str = DEFAULT_VOICE,
        instructions: str | None = None,
        speed: float | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        from openai import AsyncOpenAI  # the `openai` extra

        self.model = model
        self.voice = voice
        self.instructions = instructions
        self.speed = speed
        self._client = AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=1)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> OpenAiTts:
        key = cfg.get("apiKey") or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise TtsError("tts.openai.apiKey is required (or set OPENAI_API_KEY)")
        return cls(
            api_key=key,
            base_url=cfg.get("baseUrl") or os.environ.get("OPENAI_BASE_URL") or None,
            model=cfg.get("model") or DEFAULT_MODEL,
            voice=cfg.get("voice") or DEFAULT_VOICE,
            instructions=cfg.get("instructions"),
            speed=cfg.get("speed"),
        )

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        import openai

        extra: dict[str, Any] = {}
        if self.instructions:
            extra["instructions"] = self.instructions
        if self.speed:
            extra["speed"] = self.speed
        even = EvenBytes()
        try:
            async with self._client.audio.speech.with_streaming_response.create(
                model=self.model, voice=self.voice, input=text, response_format="pcm", **extra
            ) as response:
                async for chunk in response.iter_bytes(4800):
                    yield even.feed(chunk)
        except openai.APIStatusError as exc:
            raise TtsError(f"OpenAI TTS failed: HTTP {exc.status_code}") from None
        except openai.APIError as exc:
            raise TtsError(f"OpenAI TTS failed: {type(exc).__name__}") from None

    async def close(self) -> None:
        await self._client.close()
