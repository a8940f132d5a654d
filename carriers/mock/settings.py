"""The `mock` config section."""

from __future__ import annotations

from pydantic import Field

from carriers.settings import CarrierSettings


class MockSettings(CarrierSettings):
    """The offline loopback carrier. Numbers ending in 0002 are busy, 0003 never answer, 0004 fail,
    0005 are answering machines, 0006 a person who answers transfers."""

    ringDelayMs: int = Field(300, ge=0)
    answerDelayMs: int = Field(700, ge=0)
    busySuffix: str = "0002"
    noAnswerSuffix: str = "0003"
    failSuffix: str = "0004"
    # What the simulated callee says, one utterance per bot turn (text spoken with offline TTS).
    calleeScript: list[str] = Field(
        default_factory=lambda: ["Yes, I can make it on Thursday at three.", "No, that's all. Goodbye!"]
    )
    replyDelayMs: int = Field(400, ge=0)
    noAnswerAfterMs: int = Field(3000, ge=0)
    # The callee hangs up this long after the bot's last words once its script is done (0: never).
    calleeHangupAfterMs: int = Field(8000, ge=0)
    # The only folder `mock.callee play` reads WAVs from (default <store>/audio).
    audioDir: str | None = None
    # Numbers ending in machineSuffix answer as an answering machine (greeting, beep, silence);
    # transferSuffix is a person who answers transfers (says transferLine, then listens).
    machineSuffix: str = "0005"
    machineGreeting: str = ("Hi, you have reached the voicemail of Alex. I can't take your call right now. "
                            "Please leave a message after the tone.")
    transferSuffix: str = "0006"
    transferLine: str = "Hello, this is Jordan from the front desk."
    # What a person says on picking up when the call uses machine detection ("" = nothing).
    calleeOpener: str = "Hello?"
