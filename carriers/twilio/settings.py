"""The `twilio` config section."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import SecretStr

from carriers.settings import CarrierSettings


class TwilioSettings(CarrierSettings):
    ENV: ClassVar[dict[str, str]] = {"accountSid": "TWILIO_ACCOUNT_SID", "authToken": "TWILIO_AUTH_TOKEN"}
    REQUIRED: ClassVar[tuple[str, ...]] = ("accountSid", "authToken")
    NEEDS_FROM_NUMBER: ClassVar[bool] = True

    accountSid: str | None = None
    authToken: SecretStr | None = None
    apiBaseUrl: str = "https://api.twilio.com"
    machineDetection: Literal["Enable", "DetectMessageEnd"] | None = None
