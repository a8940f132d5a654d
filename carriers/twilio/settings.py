"""The `twilio` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr


class TwilioSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    accountSid: str | None = None
    authToken: SecretStr | None = None
    apiBaseUrl: str = "https://api.twilio.com"
    machineDetection: Literal["Enable", "DetectMessageEnd"] | None = None
