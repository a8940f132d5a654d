"""Carrier registry: provider name -> its factory and its config section. Adding a carrier is its
package under carriers/ plus one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from carriers.settings import CarrierSettings

if TYPE_CHECKING:  # the config reads this registry: it loads no carrier code (and no numpy) to do so
    from bridge.config import Settings
    from carriers.base import Carrier


@dataclass(frozen=True, slots=True)
class CarrierEntry:
    factory: str  # "module:function" taking the Settings; imported on use (optional extras, e.g. pjsua2)
    settings: str  # "module:Class", the carrier's config section (a CarrierSettings)
    extra: str | None = None  # the pip extra its I/O needs


REGISTRY: dict[str, CarrierEntry] = {
    "mock": CarrierEntry("carriers.mock.carrier:from_settings", "carriers.mock.settings:MockSettings"),
    "twilio": CarrierEntry("carriers.twilio.carrier:from_settings", "carriers.twilio.settings:TwilioSettings"),
    "telnyx": CarrierEntry("carriers.telnyx.carrier:from_settings", "carriers.telnyx.settings:TelnyxSettings"),
    "plivo": CarrierEntry("carriers.plivo.carrier:from_settings", "carriers.plivo.settings:PlivoSettings"),
    "sip": CarrierEntry("carriers.sip.carrier:from_settings", "carriers.sip.settings:SipSettings", extra="sip"),
    "asterisk": CarrierEntry("carriers.asterisk.carrier:from_settings", "carriers.asterisk.settings:AsteriskSettings"),
}


class CarrierUnavailable(RuntimeError):
    pass


def _load(target: str) -> Any:
    module_name, name = target.split(":")
    return getattr(import_module(module_name), name)


def settings_sections() -> dict[str, type[CarrierSettings]]:
    """Each registered carrier's config section class, by its key (= the provider name)."""
    sections: dict[str, type[CarrierSettings]] = {}
    for name, entry in REGISTRY.items():
        section = _load(entry.settings)
        if not (isinstance(section, type) and issubclass(section, CarrierSettings)):
            raise TypeError(f"{entry.settings} is not a CarrierSettings")
        sections[name] = section
    return sections


def create_carrier(settings: Settings) -> Carrier:
    entry = REGISTRY.get(settings.provider)
    if entry is None:
        raise CarrierUnavailable(f"provider: unknown carrier {settings.provider!r}")
    try:
        factory: Callable[[Settings], Carrier] = _load(entry.factory)
    except ImportError as exc:
        hint = f" (install the extra: pip install 'voicecall[{entry.extra}]')" if entry.extra else ""
        raise CarrierUnavailable(f"provider {settings.provider!r} is not available here: {exc}{hint}") from None
    return factory(settings)
