"""Carrier registry: provider name -> factory. Adding a carrier is one line here."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING

from carriers.base import Carrier

if TYPE_CHECKING:
    from bridge.config import Settings

# provider -> "module:factory"; the factory takes the Settings. Imported lazily so optional
# extras (pjsua2) are needed only by the deployments that use them.
REGISTRY: dict[str, str] = {
    "mock": "carriers.mock.carrier:from_settings",
    "twilio": "carriers.twilio.carrier:from_settings",
    "telnyx": "carriers.telnyx.carrier:from_settings",
    "plivo": "carriers.plivo.carrier:from_settings",
    "sip": "carriers.sip.carrier:from_settings",
    "asterisk": "carriers.asterisk.carrier:from_settings",
}


class CarrierUnavailable(RuntimeError):
    pass


def create_carrier(settings: Settings) -> Carrier:
    target = REGISTRY.get(settings.provider)
    if target is None:
        raise CarrierUnavailable(f"provider: unknown carrier {settings.provider!r}")
    module_name, factory_name = target.split(":")
    try:
        module = import_module(module_name)
    except ImportError as exc:
        extra = {"sip": "sip"}.get(settings.provider)
        hint = f" (install the extra: pip install 'voicecall[{extra}]')" if extra else ""
        raise CarrierUnavailable(f"provider {settings.provider!r} is not available here: {exc}{hint}") from None
    factory: Callable[[Settings], Carrier] = getattr(module, factory_name)
    return factory(settings)
