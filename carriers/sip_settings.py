"""The `sip` config section: how the pjsua2 user agent binds, advertises and registers."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

KNOWN_CODECS = ("PCMU", "PCMA", "G722")


class SipAccount(BaseModel):
    """A registrar / trunk account. Without one the bridge only takes and places direct SIP calls."""

    model_config = ConfigDict(extra="forbid")

    registrar: str | None = None  # e.g. "sip:pbx.example.com"; None = no REGISTER
    username: str
    password: SecretStr = SecretStr("")
    domain: str
    outboundProxy: str | None = None
    realm: str = "*"
    registerTimeoutSec: int = Field(default=300, gt=0)

    @field_validator("registrar", "outboundProxy")
    @classmethod
    def _sip_uri(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sip:", "sips:")):
            raise ValueError("must be a SIP URI starting with sip: or sips:")
        return value


class SipSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bindAddress: str = "127.0.0.1"
    port: int = Field(default=5062, ge=1, le=65535)
    transport: Literal["udp", "tcp"] = "udp"
    publicAddress: str | None = None  # advertised in Contact/Via/SDP (NAT, containers)
    codecs: list[str] = Field(default_factory=lambda: ["PCMU", "PCMA", "G722"], min_length=1)
    clockRate: Literal[8000, 16000] = 8000
    rtpPortStart: int = Field(default=40000, ge=1024, le=65000)
    rtpPortRange: int = Field(default=1000, ge=2, le=20000)
    account: SipAccount | None = None
    answerDelayMs: int = Field(default=0, ge=0, le=60000)
    rejectCode: int = Field(default=403, ge=400, le=699)
    userAgent: str = "voicecall"
    # pjsua's call table. The pjsua2-python wheel is built with PJSUA_MAX_CALLS = 4, so more than 4
    # needs a pjproject built with a larger PJSUA_MAX_CALLS; past the table, INVITEs get 486.
    maxCalls: int = Field(default=4, ge=1, le=512)
    ringTimeoutSec: int = Field(default=30, gt=0)
    logLevel: int = Field(default=1, ge=0, le=6)  # pjsip's own log verbosity (stderr)

    @field_validator("codecs")
    @classmethod
    def _codecs(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for name in value:
            upper = name.upper()
            if upper not in KNOWN_CODECS:
                raise ValueError(f"unknown codec {name!r}; choose from {', '.join(KNOWN_CODECS)}")
            if upper not in out:
                out.append(upper)
        return out

    @model_validator(mode="after")
    def _rtp_range(self) -> SipSettings:
        if self.rtpPortStart + self.rtpPortRange > 65535:
            raise ValueError("rtpPortStart + rtpPortRange must stay below 65536")
        return self

    def local_uri(self) -> str:
        """Our own SIP identity when no account is configured."""
        host = self.publicAddress or self.bindAddress
        suffix = ";transport=tcp" if self.transport == "tcp" else ""
        return f"sip:voicecall@{host}:{self.port}{suffix}"
