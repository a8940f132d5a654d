"""The batch auto-response path (`agent.responseMode: batch` or `agent.responseContract: json`):
the whole reply first, then it is spoken. The default is the streaming engine in
bridge/conversation/ (tools, speakable pieces as tokens arrive).

Two responders behind one interface: an OpenAI-compatible chat model (any server with
`/chat/completions`), and an offline rule-based one for the demo and tests.
The model answers with a small JSON contract, `{"spoken": "...", "endCall": false}`, the fallback
for models without tool calling (a model that answers in prose tends to narrate; seed issue #27025).
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from bridge.calls import TranscriptEntry

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful voice assistant on a phone call. Keep replies short and conversational "
    "(1-2 sentences max). Never use markdown, lists or emoji: everything you write is spoken aloud."
)
CONTRACT = (
    'Answer ONLY with a JSON object: {"spoken": "<what to say to the caller>", "endCall": <true if '
    "the conversation is finished and you said goodbye, else false>}."
)


@dataclass(slots=True)
class Reply:
    spoken: str
    end_call: bool = False


class ResponderError(Exception):
    pass


class Responder(ABC):
    @abstractmethod
    async def reply(self, transcript: Sequence[TranscriptEntry]) -> Reply: ...

    async def close(self) -> None:
        return None


_GOODBYE = re.compile(r"\b(good ?bye|bye|that'?s all|hang up|no thanks?)\b", re.IGNORECASE)


class OfflineResponder(Responder):
    """Deterministic replies for the offline demo: acknowledges, and closes on a goodbye."""

    async def reply(self, transcript: Sequence[TranscriptEntry]) -> Reply:
        last = next((t.text for t in reversed(transcript) if t.speaker == "user"), "")
        if _GOODBYE.search(last):
            return Reply("Thank you for your time. Goodbye!", end_call=True)
        if not last.strip():
            return Reply("Sorry, I didn't catch that. Could you say it again?")
        return Reply(f"Got it: {last.strip().rstrip('.!?')}. Is there anything else?")


class ChatModelResponder(Responder):
    """Any OpenAI-compatible chat-completions server. `model` may carry a provider prefix (openai/...)."""

    def __init__(self, *, base_url: str, api_key: str | None, model: str, system_prompt: str | None,
                 timeout_s: float) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model.split("/", 1)[1] if model.startswith("openai/") else model
        self.system_prompt = system_prompt or DEFAULT_SYSTEM_PROMPT
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None

    def _messages(self, transcript: Sequence[TranscriptEntry]) -> list[dict[str, str]]:
        lines = "\n".join(f"{'Caller' if t.speaker == 'user' else 'You'}: {t.text}" for t in transcript)
        return [
            {"role": "system", "content": f"{self.system_prompt}\n\n{CONTRACT}"},
            {"role": "user", "content": f"Conversation so far:\n{lines}\n\nWhat do you say next?"},
        ]

    async def reply(self, transcript: Sequence[TranscriptEntry]) -> Reply:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        body = {"model": self.model, "messages": self._messages(transcript), "temperature": 0.4}
        try:
            async with self._session.post(self.url, json=body, headers=headers) as resp:
                if resp.status >= 400:
                    raise ResponderError(f"response model answered HTTP {resp.status}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ResponderError(f"response model unreachable: {type(exc).__name__}") from None
        try:
            content = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ResponderError("response model returned no message") from None
        return extract_reply(content)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)
_INLINE = re.compile(r"\{.*\}", re.DOTALL)
_LEAD_IN = re.compile(r"^(sure|okay|ok|here('s| is) (my|the) (reply|response))[,:.!]?\s+", re.IGNORECASE)


def extract_reply(content: str) -> Reply:
    """Parse the JSON contract (direct, fenced or inline); fall back to the plain text, lead-ins stripped."""
    content = re.sub(r"<think>.*?</think>", "", content, flags=re.DOTALL).strip()
    for candidate in (content, *(m.group(1) for m in _FENCE.finditer(content)),
                      *(m.group(0) for m in _INLINE.finditer(content))):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("spoken"), str):
            return Reply(data["spoken"].strip(), bool(data.get("endCall") or data.get("end_call")))
    return Reply(_LEAD_IN.sub("", content).strip())


def create_responder(model: str, *, base_url: str, api_key: str | None, system_prompt: str | None,
                     timeout_ms: int) -> Responder:
    if model in ("offline", "none", ""):
        return OfflineResponder()
    return ChatModelResponder(base_url=base_url, api_key=api_key, model=model,
                              system_prompt=system_prompt, timeout_s=timeout_ms / 1000)
