"""The base of every carrier's config section, and the rules config asks it to check.

A carrier's section (`twilio:`, `sip:`, ...) is a pydantic model in its package's settings.py;
bridge/config.py assembles the sections named in carriers/registry.py into the Settings model,
so the key paths of its errors read `twilio.authToken: ...` like every other key's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, SecretStr


@dataclass(frozen=True, slots=True)
class ProviderContext:
    """The top-level settings a carrier's rules may depend on."""

    max_concurrent_calls: int
    skip_signature_verification: bool
    from_number: str | None


class CarrierSettings(BaseModel):
    """One carrier's config section."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # key -> the environment variable read when the key is not set (credentials)
    ENV: ClassVar[dict[str, str]] = {}
    # keys that must be set when this carrier is the provider
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    # a carrier on the public phone network needs our caller id
    NEEDS_FROM_NUMBER: ClassVar[bool] = False

    def required_keys(self, context: ProviderContext) -> tuple[str, ...]:
        return self.REQUIRED

    def problems(self, section: str, context: ProviderContext) -> list[str]:
        """The rules that hold when this carrier is the provider: one `key.path: rule` line each."""
        problems = []
        if self.NEEDS_FROM_NUMBER and not context.from_number:
            problems.append(f"fromNumber: required when provider is {section}")
        for key in self.required_keys(context):
            value = getattr(self, key)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if not value:
                env = self.ENV.get(key)
                hint = f" (or set {env})" if env else ""
                problems.append(f"{section}.{key}: required when provider is {section}{hint}")
        return problems
