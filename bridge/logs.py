"""Logging setup: `logging.format: text | json`, and the call id on every line logged for a call.

The call id travels in a context variable: the manager sets it where it starts working on a call,
and asyncio copies the context into every task spawned from there, so a call's background work
(voice, playback, replies) logs with its id without passing it around.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

call_id_var: ContextVar[str | None] = ContextVar("voicecall_call_id", default=None)


def current_call_id() -> str | None:
    return call_id_var.get()


@contextlib.contextmanager
def call_context(call_id: str | None) -> Iterator[None]:
    token = call_id_var.set(call_id)
    try:
        yield
    finally:
        call_id_var.reset(token)


class CallIdFilter(logging.Filter):
    """Puts `call_id` on every record (`-` outside a call) so formats can use %(call_id)s."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "call_id"):
            record.call_id = call_id_var.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, callId (when in a call), exception."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call_id = getattr(record, "call_id", None)
        if call_id and call_id != "-":
            data["callId"] = call_id
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(call_id)s]: %(message)s"


def setup_logging(fmt: str = "text", level: str | int = "WARNING") -> None:
    """(Re)configure the root logger: one stderr handler with the call-id filter."""
    handler = logging.StreamHandler()
    handler.addFilter(CallIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    named = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    root.setLevel(named if isinstance(named, int) else logging.WARNING)
