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
    # V2 signs only the URL path and a nonce (not the query or the body), so a V2 signature copied
    # from one callback would vouch for any other. Off: V3 is required. On (only for an account that
    # cannot send V3): V2 is accepted, and each V2 nonce only once.
    allowV2Signatures: bool = False
