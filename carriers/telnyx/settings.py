"""The `telnyx` config section."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import SecretStr

from carriers.settings import CarrierSettings, ProviderContext


class TelnyxSettings(CarrierSettings):
    ENV: ClassVar[dict[str, str]] = {"apiKey": "TELNYX_API_KEY", "connectionId": "TELNYX_CONNECTION_ID",
                                     "publicKey": "TELNYX_PUBLIC_KEY"}
    REQUIRED: ClassVar[tuple[str, ...]] = ("apiKey", "connectionId")
    NEEDS_FROM_NUMBER: ClassVar[bool] = True

    apiKey: SecretStr | None = None
    connectionId: str | None = None
    publicKey: str | None = None
    apiBaseUrl: str = "https://api.telnyx.com/v2"
    streamCodec: Literal["PCMU", "PCMA"] | None = None  # None: as the call negotiates
    voice: str = "AWS.Polly.Joanna-Neural"  # native speak when no media stream is up
    language: str = "en-US"
    # The mode asked of Telnyx when machine detection runs (default: detect, or greeting_end for
    # leave-message); disabled: the bridge's local detector on the media stream instead.
    answeringMachineDetection: Literal["detect", "detect_beep", "detect_words", "greeting_end", "premium",
                                       "disabled"] | None = None

    def required_keys(self, context: ProviderContext) -> tuple[str, ...]:
        # webhooks are Ed25519-signed; without the key none could be verified
        return self.REQUIRED if context.skip_signature_verification else (*self.REQUIRED, "publicKey")

    def problems(self, section: str, context: ProviderContext) -> list[str]:
        problems = super().problems(section, context)
        if self.publicKey:  # found by `check`, not by the first webhook
            from carriers.signatures import load_ed25519_public_key

            try:
                load_ed25519_public_key(self.publicKey)
            except ValueError:
                problems.append(f"{section}.publicKey: must be the base64 Ed25519 public key from the Telnyx portal")
        return problems
