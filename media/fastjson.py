"""JSON reading for the per-message paths (model deltas, chat stream chunks): orjson when the `fast`
extra is installed (2-3x the stdlib on these messages), the stdlib otherwise and for whatever
orjson refuses (NaN, lone surrogates), so the verdict on odd input is always the stdlib's."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

_orjson_loads: Callable[[str | bytes], Any] | None
try:
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover - the `fast` extra is optional
    _orjson_loads = None


def loads(raw: str | bytes) -> Any:
    if _orjson_loads is not None:
        try:
            return _orjson_loads(raw)
        except ValueError:
            pass  # orjson refuses some JSON the stdlib takes: the stdlib decides
    return json.loads(raw)
