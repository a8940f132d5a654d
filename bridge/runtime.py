"""Builds a running bridge from Settings: carrier, manager, voices, RPC, and the one server."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from bridge.agents import AgentConversations, AgentVoices, Conversation
from bridge.calls import TRANSFER_PARENT, CallEvent, CallRecord
from bridge.config import Settings, reveal
from bridge.conversation.factory import create_conversation
from bridge.manager import CallManager, VoiceFactory
from bridge.metrics import Metrics
from bridge.monitor import Monitor
from bridge.prewarm import PrewarmingFactory, SttPrewarm, expected_wire
from bridge.responder import create_responder
from bridge.rpc import RpcDispatcher, RpcEndpoint, describe_error
from bridge.server import STREAM_HANDLER_KEY, WEBHOOK_KEY, create_app
from bridge.store import child_path
from bridge.tracing import Tracing
from bridge.voice import CallVoice
from carriers.base import Carrier, CarrierError, StreamStart, request_observers
from carriers.registry import create_carrier
from media.clock import Clock, RealClock
from media.transport import MediaTransport

if TYPE_CHECKING:
    import asyncio

    from bridge.cluster.failover import Failover
    from bridge.cluster.handover import Handover
    from bridge.cluster.router import ClusterRouter
    from bridge.cluster.shared_log import SharedCallLog

log = logging.getLogger(__name__)


HANDOVER_WAIT_S = 5.0  # at shutdown, how long calls with media may take to re-attach elsewhere
HTTP_SHUTDOWN_GRACE_S = 5.0  # at stop, for requests in flight; aiohttp's 60 s default let a connection accepted
# just before the stop (a carrier's callback, no request read yet) hold every stop for the full minute


class StartupError(RuntimeError):
    pass


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def voice_factory(settings: Settings, carrier: Carrier, monitor: Monitor | None = None) -> VoiceFactory:
    """One TTS engine and STT engine per deployment; one CallVoice (MediaPipeline + sessions) per call,
    or a RealtimeVoice when speech-to-speech mode (`realtime.enabled`) is on."""
    from media.recorder import CallRecorder
    from media.tts.factory import create_tts

    tts = create_tts(settings.effective_tts)
    inband_dtmf = {"on": True, "off": False}.get(settings.streaming.inbandDtmf, not carrier.reports_dtmf)

    def recorder_for(call: CallRecord) -> CallRecorder | None:
        if not settings.recording.enabled:
            return None
        try:  # the file name comes from the call id: it must stay inside the recordings folder
            path = child_path(settings.store_dir / "recordings", call.callId, ".wav")
        except ValueError as exc:
            log.warning("call %s: not recorded: %s", call.callId[:40], exc)
            return None
        return CallRecorder(path, settings.pipelineSampleRate)

    if settings.realtime.enabled:
        from bridge.realtime.factory import RealtimeVoices

        # a RealtimeVoice has the surface the manager uses of a CallVoice (start, close, say, interrupt,
        # bridge, the MediaListener callbacks); tests/test_realtime_protocols.py checks it stays so
        realtime = RealtimeVoices(settings, tts, inband_dtmf=inband_dtmf, recorder=recorder_for, monitor=monitor)

        def briefing_voice(call: CallRecord, transport: MediaTransport, emit: Callable[[CallEvent], None]) -> CallVoice:
            return CallVoice(call_id=call.callId, transport=transport, tts=tts, stt_engine=None, emit=emit,
                             pipeline_rate=settings.pipelineSampleRate, barge_in=False, inband_dtmf=inband_dtmf)

        return cast("VoiceFactory", PersonLegVoices(realtime, briefing_voice))
    stt = None
    if settings.streaming.provider != "none":
        from media.stt.factory import create_stt

        stt = create_stt(reveal(settings.streaming.model_dump(mode="python")))
    # network engines connect while the call rings (offline ones have nothing to set up)
    prewarm = SttPrewarm(stt, settings.pipelineSampleRate, expected_wire(settings)) \
        if stt is not None and stt.name in ("openai", "deepgram") else None

    def build(call: CallRecord, transport: MediaTransport, emit: Callable[[CallEvent], None]) -> CallVoice:
        recorder = recorder_for(call)
        voice = CallVoice(
            call_id=call.callId,
            transport=transport,
            tts=tts,
            stt_engine=prewarm.engine_for(call.callId) if prewarm is not None else stt,
            emit=emit,
            pipeline_rate=settings.pipelineSampleRate,
            recorder=recorder,
            barge_in=settings.streaming.bargeIn,
            inband_dtmf=inband_dtmf,
            echo=settings.streaming.echo,
            on_milestone=monitor.milestone_hook(call.callId) if monitor is not None else None,
            on_turn_note=monitor.turn_note_hook(call.callId) if monitor is not None else None,
        )
        if monitor is not None:
            monitor.metrics.track_media(voice.bridge)
        return voice

    # the runtime releases the shared engines (TTS, pre-warmed STT sessions) at stop
    return PrewarmingFactory(build, prewarm, tts.close, tts.prewarm)


class PersonLegVoices:
    """Speech-to-speech: the person's call of a warm transfer gets a plain TTS voice for the briefing,
    not a realtime model of its own; every other call, and the pre-warm/bind/close hooks, go to `inner`."""

    def __init__(self, inner: Any, briefing: Callable[..., CallVoice]) -> None:
        self._inner = inner
        self._briefing = briefing

    def __call__(self, call: CallRecord, transport: MediaTransport, emit: Callable[[CallEvent], None]) -> Any:
        if TRANSFER_PARENT in call.metadata:
            return self._briefing(call, transport, emit)
        return self._inner(call, transport, emit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:  # e.g. `toolbox_for`: set on the realtime factory
        if name in ("_inner", "_briefing"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)


class Runtime:
    def __init__(self, settings: Settings, *, clock: Clock | None = None, carrier: Carrier | None = None,
                 tracer_provider: Any = None) -> None:
        """`tracer_provider`: an OpenTelemetry TracerProvider to use instead of `telemetry.otlpEndpoint`."""
        self.settings = settings
        self.carrier = carrier or create_carrier(settings)
        secret = settings.responseApiKey.get_secret_value() if settings.responseApiKey else None
        # `none`: no auto-replies at all (the agent drives every turn); `offline`: the rule-based one;
        # speech-to-speech: the realtime model answers the caller itself, no cascade responder
        responder = None if settings.responseModel == "none" or settings.realtime.enabled else create_responder(
            settings.responseModel, base_url=settings.responseBaseUrl, api_key=secret,
            system_prompt=settings.responseSystemPrompt, timeout_ms=settings.responseTimeoutMs)
        self.metrics = Metrics()
        self.clock: Clock = clock or RealClock()
        try:
            self.tracing = (Tracing(tracer_provider, monotonic=self.clock.monotonic) if tracer_provider is not None
                            else Tracing.from_settings(settings.telemetry.otlpEndpoint,
                                                       settings.telemetry.serviceName, monotonic=self.clock.monotonic))
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        self.monitor = Monitor(self.metrics, self.tracing)
        self.shared: SharedCallLog | None = None
        if settings.cluster is not None:
            from bridge.cluster.factory import shared_log

            self.shared = shared_log(settings.cluster, self.clock)
            self.shared.store.observe(self.metrics.observe_redis)
        carrier = self.carrier
        voices: VoiceFactory = voice_factory(settings, carrier, self.monitor) if not settings.numbers else \
            AgentVoices(settings, lambda agent: voice_factory(agent, carrier, self.monitor))
        self._close_engines = getattr(voices, "close", None)
        conversation: Conversation | None = None
        if settings.responseModel != "none":
            conversation = create_conversation(settings) if not settings.numbers else \
                AgentConversations(settings, create_conversation)
        self.manager = CallManager(settings, self.carrier, clock=self.clock, responder=responder, store=self.shared,
                                   voice_factory=voices, conversation=conversation)
        bind = getattr(voices, "bind", None)
        if bind is not None:  # speech-to-speech: hang-ups, and the conversation's tools for the model
            bind(self.manager)
        self.monitor.attach(self.manager)
        self.dispatcher = RpcDispatcher(self.manager)
        if self.shared is not None:
            from bridge.cluster.router import ClusterRouter

            self.dispatcher.router = ClusterRouter(self.shared.store, self.shared.node_id, self.manager.clock,
                                                   self.dispatcher.call_here, describe_error)
        self.failover: Failover | None = None
        self.handover: Handover | None = None
        if self.shared is not None and settings.cluster is not None:
            from bridge.cluster.failover import Failover

            self.failover = Failover(self.shared.store, self.shared.node_id, settings.cluster.leaseSeconds,
                                     self.manager.clock, self.manager)
        token = settings.rpc.token.get_secret_value() if settings.rpc.token else None
        limits = settings.webhookSecurity
        self.rpc = RpcEndpoint(self.dispatcher, token, max_body_bytes=limits.maxBodyBytes,
                               body_timeout_s=limits.bodyTimeoutMs / 1000)
        self.app = create_app(self.manager, self.rpc, self.metrics, self.tracing)
        if self.shared is not None and self.dispatcher.router is not None:
            self._join_cluster(self.shared, self.dispatcher.router)
        if settings.console.enabled:
            from bridge.console.routes import add_console

            add_console(self.app, self.manager, self.rpc, token)
        self._runner: web.AppRunner | None = None
        self.crashed = False  # tests: stop like a killed process (the lease is left to expire)
        self._tunnel: Any = None
        self.port: int | None = None

    def _join_cluster(self, shared: SharedCallLog, router: ClusterRouter) -> None:
        """Webhooks for other nodes' calls go there; a media stream moves its call here."""
        from bridge.cluster.handover import Handover
        from bridge.cluster.webhooks import WEBHOOK_METHOD, WebhookRouting

        self.handover = Handover(shared.store, router, self.manager, self.manager.clock, shared.drain)
        webhook = self.app[WEBHOOK_KEY]
        webhook.routing = WebhookRouting(shared.store, router, self.handover, webhook.call_of)
        router.internal[WEBHOOK_METHOD] = webhook.process_forwarded
        handover, carrier = self.handover, self.carrier.name

        async def take_over(start: StreamStart) -> bool:
            return await handover.take_for_stream(carrier, start.provider_call_id, start.call_id, start.token)

        self.app[STREAM_HANDLER_KEY].take_over = take_over

    async def start(self, *, port: int | None = None) -> int:
        settings = self.settings
        bind = settings.serve.bind
        if not _is_loopback(bind) and not settings.rpc.token:
            raise StartupError(f"serve.bind is {bind}, not loopback: set rpc.token (or VOICECALL_RPC_TOKEN) "
                               "so the RPC endpoint is not open to the network")
        request_observers.append(self.monitor.on_carrier_request)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, lingering_time=1.0,
                                     shutdown_timeout=HTTP_SHUTDOWN_GRACE_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, bind, settings.serve.port if port is None else port, reuse_address=True,
                           reuse_port=settings.serve.worker_count > 1 or None)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise StartupError(f"cannot listen on {bind}:{settings.serve.port}: {exc.strerror} "
                               "(is another voicecall server running?)") from None
        server = cast("asyncio.Server | None", site._server)  # noqa: SLF001 - the bound port, for port 0
        sockets = server.sockets if server else []
        self.port = sockets[0].getsockname()[1] if sockets else settings.serve.port
        if not settings.publicUrl and settings.tunnel.provider != "none":
            await self._open_tunnel()
        elif not settings.publicUrl and settings.tailscale.mode != "off":
            await self._open_tunnel(f"tailscale-{settings.tailscale.mode}")
        if not settings.publicUrl:
            host = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
            self.manager.public_base = f"http://{host}:{self.port}"
            if self.carrier.signature_headers and not settings.skipSignatureVerification \
                    and not settings.webhookSecurity.allowedHosts:
                log.warning("no publicUrl (or tunnel, or webhookSecurity.allowedHosts): %s signs the public URL "
                            "it calls, so its webhooks will fail verification unless they reach %s directly",
                            settings.provider, self.manager.public_base)
        if self.shared is not None and settings.cluster is not None:
            from bridge.cluster.factory import ClusterUnavailable, check_reachable

            try:
                await check_reachable(self.shared, settings.cluster.redisUrl)
            except ClusterUnavailable as exc:
                await self.stop()
                raise StartupError(str(exc)) from None
        try:
            await self.manager.start()
        except OSError as exc:  # the call log: a folder in its place, a read-only or missing disk
            await self.stop()
            raise StartupError(f"cannot open the call log in {settings.store_dir}: "
                               f"{exc.strerror or type(exc).__name__}") from None
        except CarrierError as exc:  # e.g. ARI refused our credentials: one clear line, nothing left open
            self.manager.store.close()
            await self.stop()
            raise StartupError(f"carrier {settings.provider} did not start: {exc}") from None
        if self.dispatcher.router is not None:
            await self.dispatcher.router.start()
        if self.failover is not None:
            await self.failover.start()
        return self.port

    async def _open_tunnel(self, provider: str | None = None) -> None:
        from bridge.expose import ExposeError, open_tunnel

        tunnel = self.settings.tunnel
        token = tunnel.ngrokAuthToken.get_secret_value() if tunnel.ngrokAuthToken else None
        provider = provider or tunnel.provider
        # tailscale: tailscale.path is the public path, mapped onto our serve.path
        public_path = self.settings.tailscale.path if provider.startswith("tailscale") else self.settings.serve.path
        try:
            url, self._tunnel = await open_tunnel(provider, port=self.port or 0, path=public_path,
                                                  serve_path=self.settings.serve.path, authtoken=token,
                                                  domain=tunnel.ngrokDomain)
        except ExposeError as exc:
            await self.stop()
            raise StartupError(str(exc)) from None
        log.warning("public webhook URL via %s: %s", provider, url)
        self.settings.publicUrl = url

    @property
    def rpc_url(self) -> str:
        return f"{self.manager.public_base or self.settings.rpc_url.rsplit('/rpc', 1)[0]}/rpc"

    async def stop(self) -> None:
        if self.monitor.on_carrier_request in request_observers:
            request_observers.remove(self.monitor.on_carrier_request)
        if self._tunnel is not None:
            await self._tunnel.stop()
            self._tunnel = None
        self.manager.stopping = True
        if self.dispatcher.router is not None:  # others take this node's calls over from now on
            self.dispatcher.router.draining = True
        # calls with media here: their carrier asks for a new stream when ours closes (a re-attach)
        moving = [c.callId for c in self.manager.active_calls() if self.manager.voice(c.callId) is not None]
        if self._runner is not None:
            await self._runner.cleanup()  # closes media streams and RPC sockets first
            self._runner = None
        await self.dispatcher.continues.close()
        if self.dispatcher.router is not None:
            await self.dispatcher.router.close()
        if self.handover is not None and moving and not self.crashed:
            # the lease goes last: survivors' sweeps would otherwise end calls that are being re-attached
            await self.handover.wait_moved(moving, HANDOVER_WAIT_S)
        if self.failover is not None:
            await self.failover.close(release=not self.crashed)
        if self.manager.started:
            await self.manager.stop()
        if self._close_engines is not None:
            close, self._close_engines = self._close_engines, None
            await close()
        await asyncio.to_thread(self.tracing.shutdown)  # flushes queued spans to the collector (blocking I/O)
