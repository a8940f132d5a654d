"""The conversation model's `transfer_call` tool (registered on each call's CallToolbox)."""

from __future__ import annotations

from typing import Any, Protocol

from bridge.calls import TransferRecord
from bridge.conversation.tools import CallToolbox, ToolOutcome, ToolSpec

TRANSFER_CALL = ToolSpec(
    "transfer_call",
    "Hand the caller to a person at another number. Tell the caller first, in the same reply. mode cold "
    "connects them at once; warm calls the person first and tells them `summary`. If the person cannot be "
    "reached the caller is told so and the conversation goes on.",
    {"type": "object", "properties": {
        "to": {"type": "string", "description": "E.164 number like +15550001234, or a sip: URI."},
        "mode": {"type": "string", "enum": ["cold", "warm"]},
        "summary": {"type": "string", "description": "warm: one or two sentences for the person."}},
     "required": ["to"]})


class Transfers(Protocol):
    async def transfer(self, call_id: str, to: object, mode: object = None, summary: object = None) -> TransferRecord: ...


def register_transfer_tool(box: CallToolbox, transfers: Transfers) -> None:
    async def handler(call_id: str, args: dict[str, Any]) -> ToolOutcome:
        try:
            record = await transfers.transfer(call_id, args.get("to"), args.get("mode"), args.get("summary"))
        except Exception as exc:  # noqa: BLE001 - TransferError/CallError: the model reads why
            return ToolOutcome(f"error: {exc}")
        if record.outcome == "completed":
            return ToolOutcome(f"The caller is now connected to {record.to}.")
        return ToolOutcome(f"The transfer did not go through ({record.outcome}); the caller has been told. "
                           "Carry on helping them.")

    box.register(TRANSFER_CALL, handler, after_speech=True)
