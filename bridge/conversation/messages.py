"""The chat messages of a call, rebuilt from its record: system prompt, then the turns as they were
HEARD (an interrupted reply holds only what the caller heard), tool calls as `tool_calls` on the
assistant message that made them, each followed by its `role: tool` result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge.calls import CallRecord, ToolCallEntry

Message = dict[str, Any]


def chat_messages(call: CallRecord, system_prompt: str) -> list[Message]:
    messages: list[Message] = [{"role": "system", "content": system_prompt}]
    by_position: dict[int, list[ToolCallEntry]] = {}
    for entry in call.toolCalls:
        by_position.setdefault(entry.position, []).append(entry)
    for index, line in enumerate(call.transcript):
        if line.isFinal and line.text:
            role = "assistant" if line.speaker == "bot" else "user"
            if role == "user" and messages[-1]["role"] == "user":
                messages[-1]["content"] += " " + line.text  # two finals in a row: one user turn
            else:
                messages.append({"role": role, "content": line.text})
        elif line.speaker == "bot":
            messages.append({"role": "assistant", "content": ""})
        _add_tool_calls(messages, by_position.pop(index + 1, ()))
    for position in sorted(by_position):  # recorded past the transcript's end (not expected)
        _add_tool_calls(messages, by_position[position])
    return [m for m in messages if not (m["role"] == "assistant" and not m.get("content") and not m.get("tool_calls"))]


def _add_tool_calls(messages: list[Message], calls: Sequence[ToolCallEntry]) -> None:
    if not calls:
        return
    first = calls[0]
    if first.withText and messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]:
        holder = messages[-1]
    else:
        holder = {"role": "assistant", "content": None}
        messages.append(holder)
    holder["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                            for c in calls]
    messages.extend({"role": "tool", "tool_call_id": c.id, "content": c.result} for c in calls)
