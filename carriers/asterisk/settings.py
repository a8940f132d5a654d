"""The `asterisk` config section: where ARI is, who we are to it, and how ExternalMedia RTP flows."""

from __future__ import annotations

import ipaddress
import string
from typing import ClassVar, Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from carriers.settings import CarrierSettings, ProviderContext


class AsteriskSettings(CarrierSettings):
    ENV: ClassVar[dict[str, str]] = {"password": "ASTERISK_ARI_PASSWORD"}

    # ARI base URL: Asterisk's HTTP server (http.conf), without the /ari prefix.
    url: str = "http://127.0.0.1:8088"
    username: str | None = None  # an ari.conf user
    password: SecretStr | None = None  # or ASTERISK_ARI_PASSWORD
    app: str = Field("voicecall", pattern=r"^[A-Za-z0-9_.-]+$")  # the dialplan's Stasis(app)
    # Dial string for outbound calls; {to} is the number or user. A --to that is already a dial
    # string (PJSIP/..., SIP/...) or a sip: URI is used as is.
    endpoint: str = "PJSIP/{to}@trunk"
    format: Literal["ulaw", "alaw", "slin16"] = "ulaw"
    rtpBindAddress: str = "127.0.0.1"
    rtpAdvertiseAddress: str | None = None  # external_host given to Asterisk; default rtpBindAddress
    rtpPortStart: int = Field(41000, ge=1024, le=65000)
    rtpPortRange: int = Field(200, ge=1, le=20000)
    ringTimeoutSec: int = Field(30, gt=0, le=600)
    # Keys out (POST /channels/{id}/dtmf): how long each digit sounds, and the gap between digits.
    dtmfDurationMs: int = Field(100, ge=40, le=2000)
    dtmfGapMs: int = Field(100, ge=0, le=5000)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) == 0:
            raise ValueError("must be an http:// or https:// URL like http://127.0.0.1:8088")
        return value.removesuffix("/ari")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"not a valid template: {exc}") from None
        if fields != ["to"]:
            raise ValueError('must contain {to} once and no other {field}, e.g. "PJSIP/{to}@trunk"')
        if "/" not in value:
            raise ValueError('must be a dial string Technology/resource, e.g. "PJSIP/{to}@trunk"')
        return value

    @field_validator("rtpBindAddress", "rtpAdvertiseAddress")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"must be an IP address (got {value!r})") from None
        return value

    @model_validator(mode="after")
    def _rtp(self) -> AsteriskSettings:
        if self.rtpPortStart + self.rtpPortRange > 65536:
            raise ValueError("rtpPortStart + rtpPortRange must stay below 65537")
        return self

    @property
    def advertise_address(self) -> str:
        return self.rtpAdvertiseAddress or self.rtpBindAddress


    def problems(self, section: str, context: ProviderContext) -> list[str]:
        return asterisk_problems(self, context.max_concurrent_calls)


def asterisk_problems(ast: AsteriskSettings, max_concurrent_calls: int) -> list[str]:
    """Config rules for `provider: asterisk` (key path: rule)."""
    problems = []
    if not ast.username:
        problems.append("asterisk.username: required when provider is asterisk (an ari.conf user)")
    if ast.password is None or not ast.password.get_secret_value():
        problems.append("asterisk.password: required when provider is asterisk (or set ASTERISK_ARI_PASSWORD)")
    if ast.rtpAdvertiseAddress is None and ipaddress.ip_address(ast.rtpBindAddress).is_unspecified:
        problems.append(
            f"asterisk.rtpAdvertiseAddress: required when rtpBindAddress is {ast.rtpBindAddress} "
            "(the address Asterisk sends the call's RTP to)"
        )
    if ast.rtpPortRange < max_concurrent_calls:
        problems.append(
            f"asterisk.rtpPortRange: must be at least maxConcurrentCalls ({max_concurrent_calls}): one RTP port per call"
        )
    return problems
