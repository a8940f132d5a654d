"""A logger for third-party clients (websockets) that never emits DEBUG records: at DEBUG they
dump request headers, which carry API keys."""

from __future__ import annotations

import logging
from typing import Any


class NoDebugLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level > logging.DEBUG:
            super().log(level, msg, *args, **kwargs)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        return None


def quiet_logger(name: str) -> NoDebugLogger:
    return NoDebugLogger(logging.getLogger(name), {})
