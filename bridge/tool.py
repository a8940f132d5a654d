"""The `voice_call` agent tool: an OpenAI function-calling schema and a dispatcher.

The dispatcher runs the same code path as the gateway RPC: it calls `voicecall.*` methods, either
in-process (RpcDispatcher.call) or on a running server (RpcClient.call).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

TOOL_NAME = "voice_call"

TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": (
            "Place and manage phone calls. initiate_call dials a number and speaks a message "
            "(mode notify hangs up after it, conversation keeps the line open); continue_call speaks "
            "and returns what the person answered; speak_to_user speaks without waiting; end_call hangs "
            "up; get_status returns the call record with its transcript; transfer_call hands the person on "
            "the line to someone else (transferMode cold connects them at once, warm briefs them first "
            "with summary), and returns the outcome."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "action": {
                    "type": "string",
                    "enum": ["initiate_call", "continue_call", "speak_to_user", "send_dtmf", "end_call", "get_status",
                             "transfer_call"],
                },
                "message": {"type": "string", "description": "What to say (initiate, continue, speak)."},
                "to": {"type": "string", "description": "E.164 number to call; defaults to the configured toNumber."},
                "from": {"type": "string", "description": "initiate_call: which of our numbers calls (its agent "
                                                          "speaks); defaults to the configured fromNumber."},
                "mode": {"type": "string", "enum": ["notify", "conversation"]},
                "machineDetection": {"type": "string", "enum": ["off", "detect", "hangup", "leave-message"],
                                     "description": "initiate_call: what to do if an answering machine picks up "
                                                    "(leave-message speaks the message after the beep)."},
                "dtmfSequence": {"type": "string", "description": "initiate_call: keys to press after answer "
                                                                  "(extension, IVR), w = 0.5 s pause."},
                "digits": {"type": "string", "description": "send_dtmf: the keys, 0-9 * # A-D."},
                "callId": {"type": "string", "description": "The call id returned by initiate_call."},
                "transferMode": {"type": "string", "enum": ["cold", "warm"],
                                 "description": "transfer_call: cold (default) or warm."},
                "summary": {"type": "string", "description": "transfer_call, warm: what to tell the person "
                                                             "before connecting (default: from the transcript)."},
            },
            "required": ["action"],
            "additionalProperties": False,
        },
    },
}

Caller = Callable[[str, dict[str, Any]], Awaitable[Any]]

_ACTIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    # action: (rpc method, required args, optional args)
    "initiate_call": ("voicecall.initiate", ("message",), ("to", "from", "mode", "machineDetection", "dtmfSequence")),
    "continue_call": ("voicecall.continue", ("callId", "message"), ()),
    "speak_to_user": ("voicecall.speak", ("callId", "message"), ()),
    "send_dtmf": ("voicecall.dtmf", ("callId", "digits"), ()),
    "end_call": ("voicecall.end", ("callId",), ()),
    "get_status": ("voicecall.status", ("callId",), ()),
    "transfer_call": ("voicecall.transfer", ("callId", "to"), ("transferMode", "summary")),
}
# Tool argument -> RPC parameter, where the names differ (the tool's `mode` is notify|conversation).
_RENAMED = {"transferMode": "mode"}


def _from_legacy(args: dict[str, Any]) -> dict[str, Any]:
    """The seed's older shape {mode: call|status, to, sid, message}."""
    if args.get("mode") == "call":
        return {"action": "initiate_call", "to": args.get("to"), "message": args.get("message")}
    if args.get("mode") == "status":
        return {"action": "get_status", "callId": args.get("sid") or args.get("callId")}
    return args


async def dispatch(call: Caller, args: dict[str, Any]) -> dict[str, Any]:
    """Run one tool call; failures come back as {"error": "..."} for the model to read."""
    if not isinstance(args, dict):
        return {"error": "arguments must be an object"}
    if "action" not in args:
        args = _from_legacy(args)
    action = args.get("action")
    spec = _ACTIONS.get(action) if isinstance(action, str) else None
    if spec is None:
        return {"error": f"unknown action {action!r}; use one of {', '.join(_ACTIONS)}"}
    method, required, optional = spec
    missing = [key for key in required if not args.get(key)]
    if missing:
        return {"error": f"{action} needs {', '.join(missing)}"}
    params = {_RENAMED.get(key, key): args[key] for key in (*required, *optional) if args.get(key) is not None}
    try:
        result = await call(method, params)
    except Exception as exc:  # noqa: BLE001 - the model gets the reason, the agent keeps running
        return {"error": str(exc)}
    return result if isinstance(result, dict) else {"result": result}
