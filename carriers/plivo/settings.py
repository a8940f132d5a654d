"""The `plivo` config section."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import SecretStr

from carriers.settings import CarrierSettings


class PlivoSettings(CarrierSettings):
    ENV: ClassVar[dict[str, str]] = {"authId": "PLIVO_AUTH_ID", "authToken": "PLIVO_AUTH_TOKEN"}
    REQUIRED: ClassVar[tuple[str, ...]] = ("authId", "authToken")
    NEEDS_FROM_NUMBER: ClassVar[bool] = True

    authId: str | None = None
    authToken: SecretStr | None = None
    apiBaseUrl: str = "https://api.plivo.com"
    machineDetection: Literal["true", "hangup"] | None = None
