"""A Redis client that reports every command it runs (name, seconds, ok) to an observer, for metrics.

Every single command goes through `execute_command` (Lua scripts as EVALSHA, named here by the
script they run); pipelines (the replay at start) and the pub/sub listener are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

# (operation, seconds, ok): ok False when the command failed after the client's own retries.
RedisObserver = Callable[[str, float, bool], None]


class ObservedRedis(aioredis.Redis):
    observer: RedisObserver | None = None
    script_names: dict[str, str] = {}  # noqa: RUF012 - replaced per instance by `name_script`

    def name_script(self, sha: str, name: str) -> None:
        self.script_names = {**self.script_names, sha: name}

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        observer = self.observer
        if observer is None:
            return await super().execute_command(*args, **options)
        op = str(args[0]).lower()
        if op == "evalsha" and len(args) > 1:
            op = self.script_names.get(str(args[1]), op)
        start = time.perf_counter()
        try:
            result = await super().execute_command(*args, **options)
        except NoScriptError:
            raise  # the script is loaded and run again by redis-py: not a failure
        except Exception:
            observer(op, time.perf_counter() - start, False)
            raise
        observer(op, time.perf_counter() - start, True)
        return result
