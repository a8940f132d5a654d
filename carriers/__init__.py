"""Carriers: one package per carrier (protocol, carrier, settings), the interface in base.py and
the registry that names them. See ARCHITECTURE.md for the layout."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, *modules: str) -> Callable[[str], Any]:
    """A module `__getattr__` for a carrier package: `from carriers.twilio import TwilioCarrier`
    keeps working while `import carriers.twilio.protocol` loads no I/O module (no aiohttp)."""

    def __getattr__(name: str) -> Any:
        if not name.startswith("__"):
            for module in modules:
                target = import_module(f"{package}.{module}")
                if hasattr(target, name):
                    return getattr(target, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
