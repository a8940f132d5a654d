"""ONE aiohttp application: webhooks, media-stream WebSockets, RPC, /healthz and /metrics.

Webhook pipeline, in order (the seed system's, hardened): exact path (404), POST only (405),
signature header present (401, before the body is read), per-IP in-flight cap (429), body size
and read time (413 / 408), public URL + Host validation (400), signature (401), replay check, pure
parse into events + reply, the manager applies the events (not for a replay: 200, no side effect),
the reply, then the carrier's follow-up effects (only when the delivery brought something new).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from aiohttp import web

from bridge.security import ReplayCache, UntrustedHost, resolve_public_url
from bridge.streams import StreamGate, StreamHandler
from carriers.base import WebhookReply, WebhookRequest

if TYPE_CHECKING:
    from bridge.manager import CallManager
    from bridge.metrics import Metrics
    from bridge.rpc import RpcEndpoint

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


class WebhookHandler:
    def __init__(self, manager: CallManager, metrics: Metrics) -> None:
        self.manager = manager
        self.metrics = metrics
        security = manager.settings.webhookSecurity
        self.replays = ReplayCache(max_entries=security.replayCacheSize, ttl_seconds=security.replayWindowSeconds,
                                   clock=manager.clock)
        self._in_flight: Counter[str] = Counter()

    def _reply(self, status: int, text: str) -> web.Response:
        """An early refusal. The body may be unread, so the connection is closed instead of kept alive
        (aiohttp would otherwise linger up to 10 s reading a body nobody wants)."""
        self.metrics.inc("voicecall_webhooks_total", status=str(status))
        response = web.Response(status=status, text=text)
        response.force_close()
        return response

    async def handle(self, request: web.Request) -> web.StreamResponse:
        settings = self.manager.settings
        carrier = self.manager.carrier
        if request.method != "POST":
            return self._reply(405, "Method Not Allowed")
        verify = not settings.skipSignatureVerification
        if verify and carrier.signature_headers and not any(h in request.headers for h in carrier.signature_headers):
            return self._reply(401, "Missing signature")
        ip = request.remote or ""
        if self._in_flight[ip] >= settings.webhookSecurity.maxInFlightPerIp:
            return self._reply(429, "Too Many Requests")
        self._in_flight[ip] += 1
        try:
            return await self._handle(request, verify)
        finally:
            self._in_flight[ip] -= 1
            if self._in_flight[ip] <= 0:
                del self._in_flight[ip]

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.manager.settings.webhookSecurity.maxBodyBytes
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge
        body = bytearray()
        async for chunk in request.content.iter_chunked(16 * 1024):
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge
        return bytes(body)

    async def _handle(self, request: web.Request, verify: bool) -> web.StreamResponse:
        settings = self.manager.settings
        security = settings.webhookSecurity
        try:
            async with asyncio.timeout(security.bodyTimeoutMs / 1000):
                body = await self._read_body(request)
        except BodyTooLarge:
            return self._reply(413, "Payload Too Large")
        except TimeoutError:
            return self._reply(408, "Request Timeout")
        try:
            resolved = resolve_public_url(
                path_qs=request.path_qs,
                headers=request.headers,
                remote_ip=request.remote or "",
                public_url=self._public_url_origin(),
                allowed_hosts=security.allowedHosts,
                trust_forwarding_headers=security.trustForwardingHeaders,
                trusted_proxy_ips=security.trustedProxyIPs,
                ngrok_loopback_bypass=settings.tunnel.provider == "ngrok"
                and settings.tunnel.allowNgrokFreeTierLoopbackBypass,
            )
        except UntrustedHost as exc:
            log.warning("webhook refused: %s", exc)
            return self._reply(400, "Bad Host")
        form: list[tuple[str, str]] = []
        if request.content_type == "application/x-www-form-urlencoded":
            form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        hook = WebhookRequest(
            method=request.method,
            path=request.path,
            public_url=resolved.url,
            headers=request.headers,
            body=body,
            query=list(request.query.items()),
            form=form,
            remote=request.remote or "",
            url_variants=resolved.variants,
        )
        carrier = self.manager.carrier
        verdict = carrier.verify_webhook(hook) if verify else None
        if verdict is not None and not verdict.ok:
            log.warning("webhook signature rejected (%s) from %s", verdict.reason, request.remote)
            return self._reply(401, "Unauthorized")
        replay = bool(verdict and verdict.replay_key and self.replays.check_and_remember(verdict.replay_key))
        result = carrier.parse_webhook(hook, self.manager)
        call = None
        fresh = not result.events  # a delivery with events is new if any of them is
        if replay:
            self.metrics.inc("voicecall_webhook_replays_total")
            first = result.events[0] if result.events else None
            call = self.manager.find_call(first.call_id, first.provider_call_id) if first else None
        else:
            for index, event in enumerate(result.events):
                if verdict is not None and verdict.replay_key and event.dedupe_key is None:
                    event.dedupe_key = f"{verdict.replay_key}:{index}"
                fresh = fresh or not self.manager.has_processed(event)
                if await self.manager.forward_event(event):
                    continue
                processed = self.manager.process_event(event)
                call = call or processed
        if call is None and hook.query_value("callId"):
            call = self.manager.find_call(hook.query_value("callId"))
        reply: WebhookReply = result.respond(call) if result.respond is not None else result.reply
        if result.effects and fresh and not replay:
            carrier.apply_effects(result.effects)
        self.metrics.inc("voicecall_webhooks_total", status=str(reply.status))
        return web.Response(status=reply.status, text=reply.body, content_type=reply.content_type)

    def _public_url_origin(self) -> str | None:
        return self.manager.settings.publicUrl


WEBHOOK_KEY = web.AppKey("webhook", WebhookHandler)
STREAM_GATE_KEY = web.AppKey("stream_gate", StreamGate)


def create_app(manager: CallManager, rpc: RpcEndpoint, metrics: Metrics) -> web.Application:
    settings = manager.settings
    app = web.Application(client_max_size=settings.webhookSecurity.maxBodyBytes)
    webhook = WebhookHandler(manager, metrics)
    gate = StreamGate(settings.streaming)
    streams = StreamHandler(manager, gate, metrics)
    app[WEBHOOK_KEY] = webhook
    app[STREAM_GATE_KEY] = gate

    async def close_streams(_: web.Application) -> None:
        await streams.close_all()

    app.on_shutdown.append(close_streams)

    async def healthz(_: web.Request) -> web.Response:
        body: dict[str, object] = {"ok": manager.started, "provider": manager.carrier.name,
                                   "activeCalls": len(manager.active_calls())}
        if manager.shared is not None:
            body["node"] = manager.shared.node_id  # which node (process) answered, behind a balancer
        return web.json_response(body)

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain", charset="utf-8")

    metrics.gauge("voicecall_calls_active", lambda: len(manager.active_calls()))
    metrics.gauge("voicecall_streams_open", lambda: gate.open)
    metrics.gauge("voicecall_streams_pending", lambda: gate.pending)

    app.router.add_route("*", settings.serve.path, webhook.handle)
    app.router.add_get(settings.streaming.streamPath, streams.handle)
    app.router.add_post("/rpc", rpc.post)
    app.router.add_get("/rpc", rpc.websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app
