"""The `plivo` config section."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, SecretStr

from carriers.settings import CarrierSettings


class PlivoSettings(CarrierSettings):
    ENV: ClassVar[dict[str, str]] = {"authId": "PLIVO_AUTH_ID", "authToken": "PLIVO_AUTH_TOKEN"}
    REQUIRED: ClassVar[tuple[str, ...]] = ("authId", "authToken")
    NEEDS_FROM_NUMBER: ClassVar[bool] = True

    authId: str | None = None
    authToken: SecretStr | None = None
    apiBaseUrl: str = "https://api.plivo.com"
    # Sent as `machine_detection` when machine detection runs (default "true": Plivo reports, the
    # bridge acts per outbound.machineDetection; "hangup": Plivo also ends machines itself);
    # disabled: the bridge's local detector on the media stream instead.
    machineDetection: Literal["true", "hangup", "disabled"] | None = None
    machineDetectionTime: int = Field(5000, ge=2000, le=10000)  # ms Plivo listens (`machine_detection_time`)
    # V2 signs only the URL path and a nonce (not the query or the body), so a V2 signature copied
    # from one callback would vouch for any other. Off: V3 is required. On (only for an account that
    # cannot send V3): V2 is accepted, and each V2 nonce only once.
    allowV2Signatures: bool = False
