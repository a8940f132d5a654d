"""The chat-completions stream, sans I/O: SSE bytes in, text deltas and assembled tool calls out
(conversation reference §1.2-1.4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bridge.conversation.tools import ToolCall
from media.fastjson import loads as _loads


class ChatModelError(Exception):
    """The model could not answer; the message is safe to log (no secrets)."""


class SseDecoder:
    """Bytes of a `text/event-stream` body in, the `data` payload of each complete event out."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        lines = (self._buf + chunk if self._buf else chunk).split(b"\n")
        self._buf = lines.pop()  # the line still being received
        out: list[str] = []
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if self._data:
                    out.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                self._data.append(value.decode("utf-8", "replace"))
            # comments (":"), `event:`, `id:` and `retry:` lines carry nothing for chat completions
        return out


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ChunkAssembler:
    """`chat.completion.chunk` objects in: text deltas out; tool-call fragments assembled by index."""

    def __init__(self) -> None:
        self._calls: list[_PartialCall] = []
        self._by_index: dict[int, _PartialCall] = {}
        self.finish_reason: str | None = None
        self.done = False

    def feed_payload(self, data: str) -> str:
        if data.startswith("[DONE]"):
            self.done = True
            return ""
        try:
            chunk = _loads(data)
        except ValueError:
            raise ChatModelError("the model sent a stream event that is not JSON") from None
        return self.feed(chunk)

    def feed(self, chunk: Any) -> str:
        if not isinstance(chunk, dict):
            raise ChatModelError("the model sent a stream event that is not an object")
        if "error" in chunk:
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else None
            raise ChatModelError(f"the model failed mid-reply: {message or 'an error occurred during streaming'}")
        text: list[str] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                text.append(content)
            for frag in delta.get("tool_calls") or ():
                self._tool_fragment(frag)
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return "".join(text)

    def _tool_fragment(self, frag: Any) -> None:
        if not isinstance(frag, dict):
            return
        index = frag.get("index", 0)
        fn = frag.get("function") or {}
        new_id = frag.get("id") or ""
        current = self._by_index.get(index)
        if current is None or (new_id and current.id and new_id != current.id):
            current = _PartialCall()
            self._by_index[index] = current
            self._calls.append(current)
        if new_id:
            current.id = new_id
        if fn.get("name"):
            current.name += str(fn["name"])
        if fn.get("arguments"):
            current.arguments.append(str(fn["arguments"]))

    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(c.id or f"call_{i}", c.name, "".join(c.arguments)) for i, c in enumerate(self._calls)
                if c.name]
