"""YAML (or the seed system's JSON5) + environment -> validated Settings.

Keys are the seed documents' camelCase keys. Every error names the key path and the rule, and
unknown keys get a did-you-mean.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import socket
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from carriers.registry import settings_sections
from carriers.settings import CarrierSettings, ProviderContext

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
# `numbers` keys besides E.164 numbers and sip: URIs: a SIP user or an Asterisk extension
LOCAL_NUMBER = re.compile(r"^[A-Za-z0-9_.*#-][A-Za-z0-9_.*#+-]{0,63}$")
TTS_PROVIDERS = ("espeak", "openai", "elevenlabs", "edge")
CONFIG_ENV = "VOICECALL_CONFIG"


class ConfigError(ValueError):
    """A configuration problem; `str()` lists one line per problem, each naming key path and rule."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ServeSettings(Section):
    port: int = Field(3334, ge=0, le=65535)
    bind: str = "127.0.0.1"
    path: str = Field("/voice/webhook", pattern=r"^/")
    eventLoop: Literal["auto", "asyncio", "uvloop"] = "auto"  # auto: uvloop when installed (extra `fast`)
    # processes sharing the port (SO_REUSEPORT); more than one needs the shared store (`cluster.redisUrl`)
    workers: int | Literal["auto"] = 1

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive number or 'auto'")
        return value

    @property
    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "auto" else int(self.workers)


class ClusterSettings(Section):
    """Several bridge processes or machines sharing one Redis (bridge/cluster/). Absent: the JSONL store."""

    redisUrl: str = Field(pattern=r"^(redis|rediss|unix)://")
    nodeId: str | None = None  # default: <hostname>-<pid>
    leaseSeconds: float = Field(10.0, gt=0)
    keyPrefix: str = Field("voicecall", pattern=r"^[A-Za-z0-9_.:-]+$")

    @property
    def node_id(self) -> str:
        return self.nodeId or f"{socket.gethostname()}-{os.getpid()}"


MachineDetectionMode = Literal["off", "detect", "hangup", "leave-message"]


class OutboundSettings(Section):
    defaultMode: Literal["notify", "conversation"] = "notify"
    notifyHangupDelaySec: int = Field(3, ge=0)
    # Answering machines on outbound calls: detect (record answeredBy), hangup (end machines at
    # once) or leave-message (speak the message after the greeting/beep, end as voicemail).
    machineDetection: MachineDetectionMode = "off"

    @field_validator("machineDetection", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class AmdSettings(Section):
    """Answering-machine detection: which detector, and the local one's parameters (media/amd.py,
    Asterisk amd.conf names and defaults)."""

    # auto: the carrier's own where it has one (Twilio, Telnyx, Plivo), the local one elsewhere;
    # local: always the local detector on the call's audio (needs a media stream on those carriers).
    detector: Literal["auto", "local"] = "auto"

    initialSilence: int = Field(2500, gt=0)
    greeting: int = Field(1500, gt=0)
    afterGreetingSilence: int = Field(800, gt=0)
    totalAnalysisTime: int = Field(5000, gt=0)
    minimumWordLength: int = Field(100, gt=0)
    betweenWordsSilence: int = Field(50, gt=0)
    maximumNumberOfWords: int = Field(2, ge=1)
    silenceThreshold: int = Field(256, ge=0, le=32767)
    maximumWordLength: int = Field(5000, gt=0)
    noiseAdaptive: bool = True  # silence = under the threshold or near the line's noise floor
    noiseFactor: float = Field(2.0, ge=1.0)
    # leave-message: the greeting is over at the end of its beep, or after this much silence
    greetingEndSilenceMs: int = Field(2000, gt=0)
    maxGreetingWaitMs: int = Field(30_000, gt=0)
    voicemailMessage: str | None = None  # default: the call's own message


class TransferSettings(Section):
    """Transfer to a person (bridge/transfer/): what the caller and the person hear, and the limits."""

    holdMessage: str = "Please hold while I connect you."
    # {reason}: "the line was busy", "nobody answered", "the call was declined", ...
    failureMessage: str = "I couldn't reach them: {reason}. Let's continue, how else can I help?"
    # What the person hears before being joined (warm); {summary}: the summary
    briefing: str = "Hello, I have a caller for you. {summary} I'm connecting you now."
    outcomeTimeoutMs: int = Field(60_000, gt=0)  # cold: no outcome from the carrier by then -> failed
    ringTimeoutMs: int = Field(30_000, gt=0)  # warm: the person's phone rings at most this long


class CallEndedHook(Section):
    url: str = Field(pattern=r"^https?://")
    secret: SecretStr
    timeoutMs: int = Field(5000, gt=0)
    maxAttempts: int = Field(12, ge=1)
    retryBaseMs: int = Field(1000, gt=0)  # doubles per attempt
    retryMaxMs: int = Field(300_000, gt=0)


class HooksSettings(Section):
    callEnded: CallEndedHook | None = None


class TailscaleSettings(Section):
    mode: Literal["off", "serve", "funnel"] = "off"
    path: str = "/voice/webhook"


class TunnelSettings(Section):
    provider: Literal["none", "ngrok", "tailscale-serve", "tailscale-funnel"] = "none"
    ngrokAuthToken: SecretStr | None = None
    ngrokDomain: str | None = None
    allowNgrokFreeTierLoopbackBypass: bool = False


class WebhookSecuritySettings(Section):
    allowedHosts: list[str] = Field(default_factory=list)
    trustForwardingHeaders: bool = False
    trustedProxyIPs: list[str] = Field(default_factory=list)
    maxBodyBytes: int = Field(64 * 1024, gt=0)
    bodyTimeoutMs: int = Field(5000, gt=0)
    maxInFlightPerIp: int = Field(8, gt=0)
    replayCacheSize: int = Field(10_000, gt=0)
    replayWindowSeconds: int = Field(600, gt=0)


class OpenAiSttSettings(Section):
    apiKey: SecretStr | None = None
    baseUrl: str = "wss://api.openai.com/v1"
    model: str = "gpt-4o-transcribe"
    language: str | None = None
    vadThreshold: float = Field(0.5, ge=0, le=1)
    prefixPaddingMs: int = Field(300, ge=0)
    silenceDurationMs: int = Field(800, gt=0)


class DeepgramSttSettings(Section):
    apiKey: SecretStr | None = None  # env: DEEPGRAM_API_KEY
    baseUrl: str = "wss://api.deepgram.com/v1"
    model: str = "nova-3"
    language: str | None = None
    endpointingMs: int = Field(300, gt=0)
    utteranceEndMs: int = Field(1000, ge=1000)
    keepAliveSeconds: float = Field(4.0, gt=0, le=9)  # Deepgram closes a stream idle for 10 s


class PocketsphinxSettings(Section):
    keywords: list[str] = Field(default_factory=list)
    grammar: str | None = None


class SttProviders(Section):
    openai: OpenAiSttSettings = Field(default_factory=OpenAiSttSettings)
    deepgram: DeepgramSttSettings = Field(default_factory=DeepgramSttSettings)
    pocketsphinx: PocketsphinxSettings = Field(default_factory=PocketsphinxSettings)


class RealtimeToolSettings(Section):
    """A function the realtime model may call (OpenAI function style)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


REALTIME_DEFAULTS = {
    "openai": {"model": "gpt-realtime", "voice": "marin", "baseUrl": "wss://api.openai.com/v1", "env": "OPENAI_API_KEY"},
    "gemini": {"model": "gemini-2.5-flash-native-audio-preview-12-2025", "voice": "Charon",
               "baseUrl": "wss://generativelanguage.googleapis.com", "env": "GEMINI_API_KEY"},
}


class RealtimeSettings(Section):
    """Speech-to-speech mode: the call's audio goes straight to a realtime model (no STT/TTS turns)."""

    enabled: bool = False
    provider: Literal["openai", "gemini"] = "openai"
    model: str | None = None  # default per provider (REALTIME_DEFAULTS)
    voice: str | None = None
    instructions: str = "You are a helpful, concise assistant on a phone call."
    baseUrl: str | None = None
    apiKey: SecretStr | None = None  # env: OPENAI_API_KEY / GEMINI_API_KEY
    tools: list[RealtimeToolSettings] = Field(default_factory=list)
    transcriptionModel: str | None = "gpt-4o-mini-transcribe"  # OpenAI: transcript of the caller's side
    vadThreshold: float = Field(0.5, ge=0, le=1)
    prefixPaddingMs: int = Field(300, ge=0)
    silenceDurationMs: int = Field(500, gt=0)
    prewarm: bool = True  # open the session while the call rings
    inputChunkMs: int = Field(40, ge=20, le=200, multiple_of=20)  # caller audio per message to the model
    maxReconnects: int = Field(4, ge=0)
    apology: str = "I'm sorry, I'm having technical trouble and have to end the call. Please try again later."
    # the seed system's keys: accepted; `providers.<provider>` values fill the keys above
    streamPath: str | None = None
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def effective(self, key: str) -> Any:
        value = getattr(self, key)
        if value is None:
            value = (self.providers.get(self.provider) or {}).get(key)
        return REALTIME_DEFAULTS[self.provider].get(key) if value is None else value


class StreamingSettings(Section):
    enabled: bool = False
    # STT engine for streamed calls; "none" relies on the carrier's own transcripts (mock, Telnyx, Plivo)
    provider: Literal["openai", "deepgram", "pocketsphinx", "none"] | None = None
    streamPath: str = Field("/voice/stream", pattern=r"^/")
    providers: SttProviders = Field(default_factory=SttProviders)
    preStartTimeoutMs: int = Field(5000, gt=0)
    # Not-yet-started sockets (no token checked yet). Carriers connect from a few addresses, so the
    # per-address cap must let a burst of real calls through; preStartTimeoutMs bounds each one.
    maxPendingConnections: int = Field(64, gt=0)
    maxPendingConnectionsPerIp: int = Field(32, gt=0)
    maxConnections: int = Field(128, gt=0)
    maxSendBufferBytes: int = Field(1024 * 1024, gt=0)
    disconnectGraceMs: int = Field(2000, ge=0)
    bargeIn: bool = True
    # In-band DTMF detection: auto = on unless the carrier's stream reports key presses itself.
    inbandDtmf: Literal["auto", "on", "off"] = "auto"
    # Audio per outbound media message on WebSocket streams (Twilio, Telnyx, Plivo). 40 ms halves the
    # messages, sends and pacing wake-ups per call (-17% CPU); inbound stays as the carrier sends it
    # (20 ms) and SIP's RTP stays 20 ms. Barge-in still clears within one message.
    outboundFrameMs: Literal[20, 40] = 40
    # Benchmarks only: play each caller's audio back through the full media path, no engines.
    echo: bool = False


class RpcSettings(Section):
    token: SecretStr | None = None
    url: str | None = None  # where the CLI finds the server; default http://<serve.bind>:<serve.port>/rpc


class RecordingSettings(Section):
    enabled: bool = False


class LoggingSettings(Section):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


class TelemetrySettings(Section):
    otlpEndpoint: str | None = None  # OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (extra `telemetry`)
    serviceName: str = "voicecall"


class ConsoleSettings(Section):
    enabled: bool = True
    sessionHours: float = Field(12, gt=0)


class MessagesSettings(Section):
    tts: dict[str, Any] = Field(default_factory=dict)


class AgentToolSettings(Section):
    """A tool the model may call during a call: the bridge POSTs its arguments (signed) to `url`."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    url: str = Field(pattern=r"^https?://")
    timeoutMs: int = Field(5000, gt=0, le=120_000)
    secret: SecretStr | None = None
    filler: str | None = None  # spoken while it runs; None: agent.toolFiller; "": nothing


class AgentSettings(Section):
    """The model on the line: how it replies, its tools, and what it says when things go wrong."""

    responseMode: Literal["streaming", "batch"] = "streaming"  # batch: whole reply, then speak (comparison)
    responseContract: Literal["tools", "json"] = "tools"  # json: the old JSON answer, for models without tools
    tools: list[AgentToolSettings] = Field(default_factory=list)
    consult: bool = True  # offer consult_agent (ask the agent on voicecall.subscribe)
    consultTimeoutMs: int = Field(30_000, gt=0)
    consultFiller: str | None = "Let me check on that."
    toolFiller: str | None = "One moment."
    apology: str = "Sorry, I'm having trouble right now."
    onFailure: Literal["apologize", "hangup"] = "apologize"
    maxFailures: int = Field(2, gt=0)  # consecutive failed replies before the call is ended
    maxToolRounds: int = Field(4, ge=0)
    minClauseChars: int = Field(30, gt=0)  # a piece may end at , ; : once this long


BUILTIN_TOOLS = ("end_call", "send_dtmf", "consult_agent", "transfer_call")


def agent_problems(agent: AgentSettings) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for i, tool in enumerate(agent.tools):
        if tool.name in BUILTIN_TOOLS:
            problems.append(f"agent.tools[{i}].name: {tool.name!r} is a built-in tool; choose another name")
        elif tool.name in seen:
            problems.append(f"agent.tools[{i}].name: {tool.name!r} is declared twice")
        seen.add(tool.name)
        if tool.parameters.get("type") != "object":
            problems.append(f"agent.tools[{i}].parameters: must be a JSON schema with \"type\": \"object\"")
        elif not isinstance(tool.parameters.get("properties", {}), dict):
            problems.append(f"agent.tools[{i}].parameters.properties: must be a mapping")
    return problems


S = TypeVar("S", bound=CarrierSettings)
InboundPolicy = Literal["disabled", "allowlist", "pairing", "open"]


class NumberAgent(Section):
    """One of our numbers (or SIP users, Asterisk extensions) answering as its own agent: calls to it,
    and calls placed `from` it. A key left out is the top level's; `tts`, `realtime` and `agent`
    merge over the top level's sections key by key."""

    inboundGreeting: str | None = None
    inboundPolicy: InboundPolicy | None = None
    allowFrom: list[str] | None = None
    responseModel: str | None = None
    responseSystemPrompt: str | None = None
    tts: dict[str, Any] | None = None
    realtime: dict[str, Any] | None = None
    agent: dict[str, Any] | None = None


def number_key_problem(key: str, provider: str) -> str | None:
    if E164.match(key) or (key.lower().startswith(("sip:", "sips:")) and "@" in key):
        return None
    if provider in ("sip", "asterisk") and LOCAL_NUMBER.match(key):
        return None
    local = " or a SIP user / extension" if provider in ("sip", "asterisk") else ""
    return f"numbers.{key}: the key must be an E.164 number like +15550001234, a sip: URI{local} (got {key[:40]!r})"


class CoreSettings(Section):
    """The application's settings. `Settings` adds one section per registered carrier (below)."""

    enabled: bool = True
    provider: str = "mock"  # one of the registered carriers (a Literal in the assembled model)
    fromNumber: str | None = None
    toNumber: str | None = None
    inboundPolicy: InboundPolicy = "disabled"
    allowFrom: list[str] = Field(default_factory=list)
    inboundGreeting: str = "Hello! How can I help you today?"
    numbers: dict[str, NumberAgent] = Field(default_factory=dict)  # per-number agents
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    amd: AmdSettings = Field(default_factory=AmdSettings)
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    hooks: HooksSettings = Field(default_factory=HooksSettings)
    maxDurationSeconds: int = Field(300, gt=0)
    maxConcurrentCalls: int = Field(1, gt=0)
    transcriptTimeoutMs: int = Field(180_000, gt=0)
    silenceTimeoutMs: int = Field(800, gt=0)
    ringTimeoutMs: int = Field(30_000, gt=0)
    staleCallReaperSeconds: int = Field(0, ge=0)
    store: str = "~/.voicecall"
    serve: ServeSettings = Field(default_factory=ServeSettings)
    cluster: ClusterSettings | None = None
    publicUrl: str | None = None
    tunnel: TunnelSettings = Field(default_factory=TunnelSettings)
    tailscale: TailscaleSettings = Field(default_factory=TailscaleSettings)
    webhookSecurity: WebhookSecuritySettings = Field(default_factory=WebhookSecuritySettings)
    skipSignatureVerification: bool = False
    streaming: StreamingSettings = Field(default_factory=StreamingSettings)
    realtime: RealtimeSettings = Field(default_factory=RealtimeSettings)
    tts: dict[str, Any] = Field(default_factory=dict)
    messages: MessagesSettings = Field(default_factory=MessagesSettings)
    responseModel: str = "openai/gpt-4o-mini"
    responseSystemPrompt: str | None = None
    responseTimeoutMs: int = Field(30_000, gt=0)
    responseBaseUrl: str = "https://api.openai.com/v1"
    responseApiKey: SecretStr | None = None
    agent: AgentSettings = Field(default_factory=AgentSettings)
    pipelineSampleRate: Literal[8000, 16000, 24000, 48000] = 16000
    recording: RecordingSettings = Field(default_factory=RecordingSettings)
    rpc: RpcSettings = Field(default_factory=RpcSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> CoreSettings:
        problems: list[str] = []
        for key in ("fromNumber", "toNumber"):
            value = getattr(self, key)
            if value is not None and not E164.match(value):
                problems.append(f"{key}: must be an E.164 number like +15550001234 (got {value!r})")
        for i, entry in enumerate(self.allowFrom):
            if not (E164.match(entry) or entry.startswith(("sip:", "sips:"))):
                problems.append(f"allowFrom[{i}]: must be an E.164 number or a sip: URI (got {entry!r})")
        if self.serve.worker_count > 1 and self.cluster is None:
            problems.append(f"serve.workers: {self.serve.workers} processes need a shared store: set cluster.redisUrl")
        section = self.carrier_sections().get(self.provider)
        if section is not None:
            context = ProviderContext(max_concurrent_calls=self.maxConcurrentCalls,
                                      skip_signature_verification=self.skipSignatureVerification,
                                      from_number=self.fromNumber)
            problems += section.problems(self.provider, context)
        if self.realtime.enabled:
            rt = self.realtime
            api_key = rt.apiKey or (rt.providers.get(rt.provider) or {}).get("apiKey")
            if not api_key:
                env = REALTIME_DEFAULTS[rt.provider]["env"]
                problems.append(f"realtime.apiKey: required when realtime.enabled with provider {rt.provider} (or set {env})")
            base = str(rt.effective("baseUrl"))
            if not base.startswith(("ws://", "wss://", "http://", "https://")):
                problems.append(f"realtime.baseUrl: must start with wss:// or https:// (got {base!r})")
            # the model hears the call through the bridge's media path: streams are implied
            self.streaming.enabled = True
        if self.streaming.provider == "deepgram" and not self.streaming.providers.deepgram.apiKey:
            problems.append("streaming.providers.deepgram.apiKey: required when streaming.provider is deepgram "
                            "(or set DEEPGRAM_API_KEY)")
        problems += agent_problems(self.agent)
        problems += self._url_and_engine_problems()
        if not problems:
            problems += self._build_number_agents()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    _number_agents: dict[str, CoreSettings] = PrivateAttr(default_factory=dict)

    def _build_number_agents(self) -> list[str]:
        """Each `numbers` entry merged over the top level, validated as a whole configuration (so a
        bad model, TTS provider or tool in one number is named with its key), kept for `for_number`."""
        problems: list[str] = []
        agents: dict[str, CoreSettings] = {}
        if not self.numbers:
            return problems
        base = self.model_dump(mode="python", exclude={"numbers"})
        for key, entry in self.numbers.items():
            problem = number_key_problem(key, self.provider)
            if problem is not None:
                problems.append(problem)
                continue
            merged = dict(base)
            for name, value in entry.model_dump(mode="python", exclude_none=True).items():
                merged[name] = deep_merge(base[name], value) if isinstance(value, dict) else value
            try:
                agents[key] = type(self).model_validate(merged)
                if agents[key].realtime.enabled and not self.streaming.enabled:
                    # carriers open media streams per the top level's setting, not per number
                    problems.append(f"numbers.{key}.realtime.enabled: needs streaming.enabled at the top level")
            except ValidationError as exc:
                for err in exc.errors():
                    for line in _describe_error(err, type(self)).splitlines():
                        line = f"numbers.{key}.{line}"
                        if line not in problems:
                            problems.append(line)
        self._number_agents = agents
        return problems

    def for_number(self, number: str | None) -> CoreSettings:
        """The settings of the agent answering on `number` (ours: the dialled one of an inbound call,
        the `from` of an outbound one); the top level when it has no `numbers` entry."""
        key = match_number(self._number_agents, number)
        return self._number_agents[key] if key is not None else self

    def number_keys(self) -> list[str]:
        return list(self._number_agents)

    def _url_and_engine_problems(self) -> list[str]:
        """What `serve` would otherwise refuse later (or trip over on every webhook), found here so
        that `check` finds it too. Engine keys (which may come from the environment) are checked by
        bridge.preflight, which builds the engines the way `serve` does."""
        problems: list[str] = []
        if self.publicUrl is not None and not _is_http_url(self.publicUrl):
            problems.append(f"publicUrl: must be an absolute http(s) URL like https://voice.example.com/voice/webhook "
                            f"(got {self.publicUrl[:80]!r})")
        if self.rpc.url is not None and not _is_http_url(self.rpc.url):
            problems.append(f"rpc.url: must be an absolute http(s) URL (got {self.rpc.url[:80]!r})")
        tts = self.effective_tts
        provider = tts.get("provider", "espeak")
        if not isinstance(provider, str) or provider.lower() not in TTS_PROVIDERS:
            guess = difflib.get_close_matches(str(provider), TTS_PROVIDERS, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            problems.append(f"tts.provider: must be one of {', '.join(TTS_PROVIDERS)} (got {provider!r}){hint}")
        return problems

    # ------------------------------------------------------------------ carrier sections

    def carrier_sections(self) -> dict[str, CarrierSettings]:
        """Each registered carrier's section, by key."""
        return {name: getattr(self, name) for name in CARRIER_SECTIONS}

    def section(self, cls: type[S]) -> S:
        """A carrier's own section, typed: `settings.section(TwilioSettings)`."""
        for value in self.carrier_sections().values():
            if type(value) is cls:
                return value
        raise KeyError(f"no config section of type {cls.__name__}")

    # ------------------------------------------------------------------ derived values

    @property
    def store_dir(self) -> Path:
        return Path(os.path.expanduser(self.store))

    @property
    def mock_audio_dir(self) -> Path:
        """The only folder `mock.callee play` reads from: `mock.audioDir`, else <store>/audio."""
        folder = getattr(self.carrier_sections().get("mock"), "audioDir", None)
        return Path(os.path.expanduser(folder)) if folder else self.store_dir / "audio"

    @property
    def effective_tts(self) -> dict[str, Any]:
        """`tts` deep-merged over `messages.tts` (the seeds' rule)."""
        return deep_merge(self.messages.tts, self.tts)

    @property
    def rpc_url(self) -> str:
        if self.rpc.url:
            return self.rpc.url
        host = self.serve.bind
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.serve.port}/rpc"

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data with every secret masked."""
        return _mask(self.model_dump(mode="python"))


def _is_http_url(value: str) -> bool:
    from urllib.parse import urlsplit

    from bridge.security import UntrustedHost, parse_host

    try:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        parse_host(parts.netloc)
    except (ValueError, UntrustedHost):
        return False
    return True


def _digits(number: str) -> str:
    return "".join(ch for ch in number if ch.isdigit())


def _sip_identity(uri: str) -> str:
    uri = uri.split(";", 1)[0].strip("<>").lower()
    for prefix in ("sips:", "sip:"):
        uri = uri.removeprefix(prefix)
    return uri.split(":", 1)[0] if "@" in uri else uri


def match_number(keys: Mapping[str, Any] | list[str], number: str | None) -> str | None:
    """The `numbers` key that names `number`: the same E.164 digits, the same SIP identity
    (user@host), or, for a SIP user or extension key, the user part of a sip: URI."""
    if not number:
        return None
    if number in keys:
        return number
    if number.lower().startswith(("sip:", "sips:")):
        identity = _sip_identity(number)
        user = identity.split("@", 1)[0]
        for key in keys:
            if key.lower().startswith(("sip:", "sips:")):
                if _sip_identity(key) == identity:
                    return key
            elif key == user or (E164.match(key) and _digits(key) == _digits(user) and _digits(user)):
                return key
        return None
    digits = _digits(number)
    for key in keys:
        if E164.match(key) and digits and _digits(key) == digits:
            return key
    return None


def is_destination(value: str) -> bool:
    """A number or address a phone carrier can dial: E.164, or a sip:/sips: URI."""
    if E164.match(value):
        return True
    lowered = value.lower()
    return lowered.startswith(("sip:", "sips:")) and len(value) <= 256 and "@" in value \
        and not any(ch.isspace() or ch in "<>\"" for ch in value)


CARRIER_SECTIONS: dict[str, type[CarrierSettings]] = settings_sections()


def _assemble() -> type[CoreSettings]:
    """CoreSettings plus one section per registered carrier, so a new carrier needs no edit here."""
    fields: dict[str, Any] = {name: (cls, Field(default_factory=cls)) for name, cls in CARRIER_SECTIONS.items()}
    provider: Any = Literal[tuple(CARRIER_SECTIONS)]
    return create_model("Settings", __base__=CoreSettings, provider=(provider, "mock"), **fields)


if TYPE_CHECKING:
    Settings = CoreSettings
else:
    Settings = _assemble()


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def reveal(data: Any) -> Any:
    """Plain data with secrets as strings, for the engines that need them (never for logs)."""
    if isinstance(data, SecretStr):
        return data.get_secret_value()
    if isinstance(data, dict):
        return {k: reveal(v) for k, v in data.items()}
    if isinstance(data, list):
        return [reveal(v) for v in data]
    return data


_SECRET_KEY = re.compile(r"(token|secret|password|apikey|authtoken)$", re.IGNORECASE)


def _mask(data: Any, key: str = "") -> Any:
    if isinstance(data, SecretStr):
        return "********" if data.get_secret_value() else None
    if isinstance(data, dict):
        return {k: _mask(v, k) for k, v in data.items()}
    if isinstance(data, list):
        return [_mask(v) for v in data]
    if isinstance(data, str) and data and _SECRET_KEY.search(key):
        return "********"
    return data


# ---------------------------------------------------------------------- loading

ENV_FALLBACKS: list[tuple[tuple[str, ...], str]] = [
    *(((name, key), env) for name, cls in CARRIER_SECTIONS.items() for key, env in cls.ENV.items()),
    (("streaming", "providers", "openai", "apiKey"), "OPENAI_API_KEY"),
    (("streaming", "providers", "deepgram", "apiKey"), "DEEPGRAM_API_KEY"),
    (("responseApiKey",), "OPENAI_API_KEY"),
    (("tunnel", "ngrokAuthToken"), "NGROK_AUTHTOKEN"),
    (("rpc", "token"), "VOICECALL_RPC_TOKEN"),
    (("telemetry", "otlpEndpoint"), "OTEL_EXPORTER_OTLP_ENDPOINT"),
]


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    realtime = raw.get("realtime")
    if isinstance(realtime, dict) and realtime.get("enabled") and not realtime.get("apiKey"):
        provider = str(realtime.get("provider") or "openai")
        name = REALTIME_DEFAULTS.get(provider, {}).get("env")
        if name and env.get(name) and not (realtime.get("providers") or {}).get(provider, {}).get("apiKey"):
            realtime["apiKey"] = env[name]
    for path, name in ENV_FALLBACKS:
        value = env.get(name)
        if not value:
            continue
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                break
            node = child
        else:
            if not node.get(path[-1]):
                node[path[-1]] = value


def _migrate_legacy(raw: dict[str, Any]) -> None:
    """The seed system's legacy keys (provider 'log', twilio.from, flat streaming STT keys)."""
    if raw.get("provider") == "log":
        raw["provider"] = "mock"
    twilio = raw.get("twilio")
    if isinstance(twilio, dict) and "from" in twilio:
        raw.setdefault("fromNumber", twilio.pop("from"))
    streaming = raw.get("streaming")
    if isinstance(streaming, dict):
        openai = {}
        for old, new in (("openaiApiKey", "apiKey"), ("sttModel", "model"),
                         ("silenceDurationMs", "silenceDurationMs"), ("vadThreshold", "vadThreshold")):
            if old in streaming:
                openai[new] = streaming.pop(old)
        if "sttProvider" in streaming:
            streaming.setdefault("provider", streaming.pop("sttProvider"))
        providers = streaming.setdefault("providers", {})
        if openai and isinstance(providers, dict):  # else pydantic names streaming.providers as the problem
            current = providers.get("openai") or {}
            providers["openai"] = deep_merge(openai, current) if isinstance(current, dict) else current


def _unwrap_seed_document(raw: Any) -> Any:
    """Accept a whole seed-system config file: plugins.entries.voice-call.config."""
    if isinstance(raw, dict) and "plugins" in raw:
        try:
            entry = raw["plugins"]["entries"]["voice-call"]
        except (KeyError, TypeError):
            raise ConfigError(["plugins: expected plugins.entries.voice-call.config in a seed-system file"]) from None
        if not isinstance(entry, dict):
            raise ConfigError(["plugins.entries.voice-call: must be a mapping (with a `config` mapping)"])
        config = entry.get("config") or {}
        if not isinstance(config, dict):
            raise ConfigError(["plugins.entries.voice-call.config: must be a mapping of keys"])
        merged = dict(config)
        if "enabled" in entry:
            merged.setdefault("enabled", entry["enabled"])
        # seed: the plugin's tts deep-merges over the gateway's messages.tts
        messages = raw.get("messages") or {}
        if not isinstance(messages, dict):
            raise ConfigError(["messages: must be a mapping"])
        messages_tts = messages.get("tts")
        if messages_tts:
            merged.setdefault("messages", {}).setdefault("tts", messages_tts)
        return merged
    return raw


def _where(exc: Exception) -> str:
    """Position and rule of a parse error, never the offending line: it may hold a secret."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        problem = str(getattr(exc, "problem", "") or "syntax error")
        problem = re.sub(r"'[^']*'|\"[^\"]*\"", "…", problem)  # quoted input, e.g. a found token
        return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    match = re.search(r"line (\d+)|:(\d+)", str(exc))
    line = next((g for g in match.groups() if g), None) if match else None
    return f" at line {line}" if line else f" ({type(exc).__name__})"


def parse_text(text: str, source: str) -> dict[str, Any]:
    try:
        if source.endswith((".json", ".json5")):
            import json5

            data = json5.loads(text)
        else:
            # libyaml when PyYAML has it: the pure-Python scanner is quadratic on deeply nested flow
            # collections (`[[[[...`), seconds for one bad file
            data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # either is a safe loader
    except Exception as exc:  # noqa: BLE001 - parser errors vary by library; report them as config errors
        raise ConfigError([f"{source}: not valid {'JSON5' if source.endswith(('.json', '.json5')) else 'YAML'}"
                           f"{_where(exc)}"]) from None
    if _deeper_than(data, MAX_CONFIG_DEPTH):
        raise ConfigError([f"{source}: nested deeper than {MAX_CONFIG_DEPTH} levels"])
    data = _unwrap_seed_document(data if data is not None else {})
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of keys"])
    return data


MAX_CONFIG_DEPTH = 32  # a real config nests a handful of levels; a deeper one would only exhaust recursion later


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether lists/mappings nest deeper than `limit`; iterative, and each shared (aliased) node once."""
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list) or id(node) in seen:
            continue
        if depth > limit:
            return True
        seen.add(id(node))
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def _describe_error(err: Mapping[str, Any], model: type[BaseModel]) -> str:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal[")))]
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(model, [p for p in loc[:-1] if isinstance(p, str)])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return f"{path}: unknown key{hint}"
    if kind == "value_error":
        message = str(err["msg"]).removeprefix("Value error, ")
        return f"{path}: {message}" if path and not message.startswith(path) else message
    return f"{path or '(top level)'}: {err['msg']}"


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    current: Any = model
    for part in path:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}).keys())


def build_settings(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    data = copy.deepcopy(dict(raw))
    _migrate_legacy(data)
    _apply_env(data, os.environ if env is None else env)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems: list[str] = []
        for err in exc.errors():
            for line in _describe_error(err, Settings).splitlines():
                if line not in problems:
                    problems.append(line)
        raise ConfigError(problems) from None


def default_config_text() -> str:
    return resources.files("bridge").joinpath("default.yaml").read_text(encoding="utf-8")


def config_source(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    if path:
        return str(path)
    return env.get(CONFIG_ENV) or None


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """--config FILE, else $VOICECALL_CONFIG, else the built-in default (mock carrier, offline voice)."""
    env = os.environ if env is None else env
    source = config_source(path, env)
    if source is None:
        return build_settings(parse_text(default_config_text(), "default.yaml"), env)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read config file ({exc.strerror})"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})"]) from None
    return build_settings(parse_text(text, source), env)
