"""The `telnyx` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr


class TelnyxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    apiKey: SecretStr | None = None
    connectionId: str | None = None
    publicKey: str | None = None
    apiBaseUrl: str = "https://api.telnyx.com/v2"
    streamCodec: Literal["PCMU", "PCMA"] | None = None  # None: as the call negotiates
    voice: str = "AWS.Polly.Joanna-Neural"  # native speak when no media stream is up
    language: str = "en-US"
    answeringMachineDetection: str | None = None
