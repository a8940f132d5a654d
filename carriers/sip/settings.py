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

from carriers.settings import CarrierSettings, ProviderContext

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


class SipSettings(CarrierSettings):

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
    # Calls per pjsua process (its call table). The pjsua2-python wheel is built with
    # PJSUA_MAX_CALLS = 4: start refuses more than the build allows. More calls: more workers.
    maxCalls: int = Field(default=4, ge=1, le=512)
    # User-agent processes behind one SIP port (`sip_pool`): "auto" = enough for maxConcurrentCalls.
    # 1 = the user agent runs on a thread of the bridge itself, on `port`, with no front.
    workers: int | Literal["auto"] = "auto"
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

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> int | str:
        if value == "auto":
            return "auto"
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64:
            return value
        raise ValueError('must be "auto" or a number of user-agent processes from 1 to 64')

    @model_validator(mode="after")
    def _rtp_range(self) -> SipSettings:
        if self.rtpPortStart + self.rtpPortRange > 65535:
            raise ValueError("rtpPortStart + rtpPortRange must stay below 65536")
        return self

    def worker_count(self, max_concurrent_calls: int | None) -> int:
        if self.workers != "auto":
            return int(self.workers)
        wanted = max_concurrent_calls or self.maxCalls
        return max(1, -(-wanted // self.maxCalls))

    def local_uri(self) -> str:
        """Our own SIP identity when no account is configured."""
        host = self.publicAddress or self.bindAddress
        suffix = ";transport=tcp" if self.transport == "tcp" else ""
        return f"sip:voicecall@{host}:{self.port}{suffix}"


    def problems(self, section: str, context: ProviderContext) -> list[str]:
        return sip_capacity_problems(self, context.max_concurrent_calls)


def sip_capacity_problems(sip: SipSettings, max_concurrent_calls: int) -> list[str]:
    """Config rules tying the SIP section to `maxConcurrentCalls` (key path: rule)."""
    workers = sip.worker_count(max_concurrent_calls)
    problems = []
    if max_concurrent_calls > workers * sip.maxCalls:
        problems.append(
            f"maxConcurrentCalls: must not exceed sip.workers x sip.maxCalls ({workers} x {sip.maxCalls}); "
            f'set sip.workers to "auto" or at least {-(-max_concurrent_calls // sip.maxCalls)}'
        )
    if workers > 1 and sip.transport != "udp":
        problems.append("sip.transport: more than one SIP worker needs udp (the SIP front is a UDP proxy)")
    if sip.rtpPortRange < workers * sip.maxCalls * 2:
        problems.append(
            f"sip.rtpPortRange: must be at least {workers * sip.maxCalls * 2} "
            f"(2 ports per call: {workers} workers x {sip.maxCalls} calls)"
        )
    return problems
