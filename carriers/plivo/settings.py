"""The `plivo` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr


class PlivoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    authId: str | None = None
    authToken: SecretStr | None = None
    apiBaseUrl: str = "https://api.plivo.com"
    machineDetection: Literal["true", "hangup"] | None = None
