"""ONE aiohttp application: webhooks, media-stream WebSockets, RPC, /healthz and /metrics.

Webhook pipeline, in order (the seed system's, hardened): exact path (404), POST only (405),
signature header present (401, before the body is read), per-IP cap on requests whose body is
still arriving (429), body size and read time (413 / 408), public URL + Host validation (400),
signature (401), JSON nesting depth (400), replay check, pure parse into events + reply, the
manager applies the events (not for a replay: 200, no side effect), the reply, then the carrier's
follow-up effects (only when the delivery brought something new). Odd input that a carrier's
parser did not expect is a 400 with one log line, never a 500.

Only requests whose body is still arriving count against the per-IP cap: behind a tunnel every
carrier request shares one address, and a carrier sends its callback in one go, so slow uploads
with a junk signature fill their own slots, never those of signed callbacks. Processing after
verification is synchronous, so verified requests hold no slot at all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from aiohttp import web

from bridge.cluster.forwarded import hook_from_json
from bridge.metrics import CONTENT_TYPE
from bridge.security import ReplayCache, UntrustedHost, resolve_public_url
from bridge.streams import StreamGate, StreamHandler
from carriers.base import WebhookReply, WebhookRequest, WebhookVerdict
from media.untrusted import MAX_DEPTH, nesting_depth

if TYPE_CHECKING:
    from bridge.cluster.webhooks import WebhookRouting
    from bridge.manager import CallManager
    from bridge.metrics import Metrics
    from bridge.rpc import RpcEndpoint
    from bridge.tracing import Tracing

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


class WebhookHandler:
    def __init__(self, manager: CallManager, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.manager = manager
        self.metrics = metrics
        self.tracing = tracing
        security = manager.settings.webhookSecurity
        self.replays = ReplayCache(max_entries=security.replayCacheSize, ttl_seconds=security.replayWindowSeconds,
                                   clock=manager.clock)
        self._uploading: Counter[str] = Counter()
        self.routing: WebhookRouting | None = None  # on a cluster: deliveries for other nodes' calls go there

    @property
    def uploading(self) -> int:
        """Requests whose body is still arriving (what the per-IP cap counts)."""
        return sum(self._uploading.values())

    def _reply(self, status: int, text: str) -> web.Response:
        """An early refusal. The body may be unread, so the connection is closed instead of kept alive
        (aiohttp would otherwise linger up to 10 s reading a body nobody wants)."""
        response = web.Response(status=status, text=text)
        response.force_close()
        return response

    async def handle(self, request: web.Request) -> web.StreamResponse:
        carrier = self.manager.carrier.name
        started = time.perf_counter()
        if self.tracing is None or not self.tracing.enabled:
            response = await self._guarded(request)
        else:
            with self.tracing.span("webhook", {"voicecall.carrier": carrier}) as span:
                response = await self._guarded(request)
                span.set_attribute("http.response.status_code", response.status)
        self.metrics.observe_webhook(carrier, response.status, time.perf_counter() - started)
        return response

    async def _guarded(self, request: web.Request) -> web.StreamResponse:
        settings = self.manager.settings
        carrier = self.manager.carrier
        if request.method != "POST":
            return self._reply(405, "Method Not Allowed")
        verify = not settings.skipSignatureVerification
        if verify and carrier.signature_headers and not any(h in request.headers for h in carrier.signature_headers):
            return self._reply(401, "Missing signature")
        ip = request.remote or ""
        if request.content.is_eof():  # the whole body is already here: nothing to hold a slot for
            checked = await self._read_and_verify(request, verify)
        else:
            if self._uploading[ip] >= settings.webhookSecurity.maxInFlightPerIp:
                return self._reply(429, "Too Many Requests")
            self._uploading[ip] += 1
            try:
                checked = await self._read_and_verify(request, verify)
            finally:
                self._uploading[ip] -= 1
                if self._uploading[ip] <= 0:
                    del self._uploading[ip]
        if isinstance(checked, web.StreamResponse):
            return checked
        if self.routing is not None:
            reply = await self.routing.route(*checked)
            if reply is not None:
                return web.Response(status=reply.status, text=reply.body, content_type=reply.content_type)
        return self._process(*checked)

    def call_of(self, hook: WebhookRequest) -> tuple[str | None, str | None]:
        """(our call id, the carrier's call id) of a delivery about a call this node does not carry;
        (None, None) when it carries it or the delivery names no call (a new inbound call)."""
        manager = self.manager
        query_id = hook.query_value("callId")
        if query_id and manager.find_call(query_id) is not None:
            return None, None
        try:
            events = manager.carrier.parse_webhook(hook, manager).events
        except Exception:  # noqa: BLE001 - `_process` answers what cannot be parsed
            events = []
        for event in events:
            if manager.find_call(event.call_id, event.provider_call_id) is not None:
                return None, None
            if event.call_id or event.provider_call_id:
                return event.call_id or query_id, event.provider_call_id
        return query_id, None

    async def process_forwarded(self, params: dict[str, object]) -> dict[str, object]:
        """`cluster.webhook`: a delivery another node received for a call this node carries."""
        hook, verdict = hook_from_json(params)
        response = self._process(hook, verdict)
        if self.manager.shared is not None:
            await self.manager.shared.drain()  # what the reply points at (a stream token) is in Redis first
        assert isinstance(response, web.Response)
        return {"status": response.status, "body": response.text or "", "contentType": response.content_type}

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

    async def _read_and_verify(self, request: web.Request,
                               verify: bool) -> web.StreamResponse | tuple[WebhookRequest, WebhookVerdict | None]:
        settings = self.manager.settings
        security = settings.webhookSecurity
        try:
            async with asyncio.timeout(security.bodyTimeoutMs / 1000):
                body = await self._read_body(request)
        except BodyTooLarge:
            return self._reply(413, "Payload Too Large")
        except TimeoutError:
            return self._reply(408, "Request Timeout")
        except (ConnectionError, web.HTTPException, ValueError) as exc:  # the client went away mid-body
            log.info("webhook body not read: %s", type(exc).__name__)
            return self._reply(400, "Bad Request")
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
        return self.verify(hook, verify)

    def verify(self, hook: WebhookRequest, verify: bool) -> web.StreamResponse | tuple[WebhookRequest, WebhookVerdict | None]:
        """The signature check: a 401 reply, or the request and its verdict to process."""
        try:
            verdict = self.manager.carrier.verify_webhook(hook) if verify else None
        except Exception as exc:  # noqa: BLE001 - a malformed signature header is a 401, not a 500
            verdict = WebhookVerdict(ok=False, reason=f"unreadable ({type(exc).__name__})")
        if verdict is not None and not verdict.ok:
            log.warning("webhook signature rejected (%s) from %s", verdict.reason, hook.remote)
            return self._reply(401, "Unauthorized")
        return hook, verdict

    def handle_request(self, hook: WebhookRequest) -> web.StreamResponse:
        """Everything after the body is read, without sockets: signature, depth, replay, parse, process
        (what the fuzz tests drive for most of their inputs)."""
        checked = self.verify(hook, not self.manager.settings.skipSignatureVerification)
        return checked if isinstance(checked, web.StreamResponse) else self._process(*checked)

    def _process(self, hook: WebhookRequest, verdict: WebhookVerdict | None) -> web.StreamResponse:
        carrier = self.manager.carrier
        if hook.body.lstrip()[:1] in (b"{", b"[") and nesting_depth(hook.body) > MAX_DEPTH:
            log.warning("webhook refused: JSON nested deeper than %d levels", MAX_DEPTH)
            return self._reply(400, "Bad Request")
        try:
            return self._apply(hook, verdict)
        except Exception as exc:  # noqa: BLE001 - odd input that slipped past validation is a 400, not a 500
            log.warning("webhook refused: %s could not use it (%s)", carrier.name, type(exc).__name__)
            return self._reply(400, "Bad Request")

    def _apply(self, hook: WebhookRequest, verdict: WebhookVerdict | None) -> web.StreamResponse:
        carrier = self.manager.carrier
        replay = bool(verdict and verdict.replay_key and self.replays.check_and_remember(verdict.replay_key))
        result = carrier.parse_webhook(hook, self.manager)
        call = None
        fresh = not result.events  # a delivery with events is new if any of them is
        if replay:
            self.metrics.webhook_replays.labels(carrier=carrier.name).inc()
            first = result.events[0] if result.events else None
            call = self.manager.find_call(first.call_id, first.provider_call_id) if first else None
        else:
            for index, event in enumerate(result.events):
                if verdict is not None and verdict.replay_key and event.dedupe_key is None:
                    event.dedupe_key = f"{verdict.replay_key}:{index}"
                fresh = fresh or not self.manager.has_processed(event)
                processed = self.manager.process_event(event)
                call = call or processed
        if call is None and hook.query_value("callId"):
            call = self.manager.find_call(hook.query_value("callId"))
        reply: WebhookReply = result.respond(call) if result.respond is not None else result.reply
        if result.effects and fresh and not replay:
            carrier.apply_effects(result.effects)
        return web.Response(status=reply.status, text=reply.body, content_type=reply.content_type)

    def _public_url_origin(self) -> str | None:
        return self.manager.settings.publicUrl


class _OneLineHttpErrors(logging.Filter):
    """aiohttp logs a malformed request (duplicate Host, an 8 KB URL, a bad header) as an ERROR with
    a traceback, after already answering 400. It is bad input, not our fault: one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(str(exc.message).split(":", 1)[0].split())[:80]  # not the request bytes
            record.msg, record.args = "malformed HTTP request refused (%s %s)", (exc.code, reason)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_HTTP_ERROR_FILTER = _OneLineHttpErrors()


def one_line_http_errors() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if _HTTP_ERROR_FILTER not in server_log.filters:
        server_log.addFilter(_HTTP_ERROR_FILTER)


WEBHOOK_KEY = web.AppKey("webhook", WebhookHandler)
STREAM_GATE_KEY = web.AppKey("stream_gate", StreamGate)
STREAM_HANDLER_KEY = web.AppKey("stream_handler", StreamHandler)


def create_app(manager: CallManager, rpc: RpcEndpoint, metrics: Metrics,
               tracing: Tracing | None = None) -> web.Application:
    settings = manager.settings
    one_line_http_errors()
    app = web.Application(client_max_size=settings.webhookSecurity.maxBodyBytes)
    webhook = WebhookHandler(manager, metrics, tracing)
    gate = StreamGate(settings.streaming)
    streams = StreamHandler(manager, gate, metrics)
    app[WEBHOOK_KEY] = webhook
    app[STREAM_GATE_KEY] = gate
    app[STREAM_HANDLER_KEY] = streams

    async def close_streams(_: web.Application) -> None:
        await streams.close_all()
        await rpc.close_all()

    app.on_shutdown.append(close_streams)

    async def healthz(_: web.Request) -> web.Response:
        store = manager.store
        body: dict[str, object] = {"ok": manager.started and not store.degraded, "provider": manager.carrier.name,
                                   "activeCalls": len(manager.active_calls())}
        if store.degraded:
            # still serving calls, but a restart now would bring them back in an older state
            body["status"] = "degraded"
            body["problems"] = [f"call log not writable ({store.last_error}); {store.pending} record(s) kept in memory"]
        if manager.shared is not None:
            body["node"] = manager.shared.node_id  # which node (process) answered, behind a balancer
            body["pid"] = os.getpid()  # which worker process, for a supervisor's restart to be seen
        return web.json_response(body)

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def calls_by_state() -> tuple[tuple[str, ...], dict[tuple[str, ...], int]]:
        counts: Counter[tuple[str, ...]] = Counter((c.provider, str(c.state)) for c in manager.active_calls())
        return ("carrier", "state"), dict(counts)

    metrics.gauge("voicecall_calls_active", "Live calls by carrier and state", calls_by_state)
    metrics.gauge("voicecall_streams_open", "Open media-stream sockets", lambda: gate.open)
    metrics.gauge("voicecall_streams_pending", "Media-stream sockets before their start message",
                  lambda: gate.pending)
    metrics.counter("voicecall_store_write_failures", "Call-log writes that failed",
                    lambda: manager.store.write_failures)
    metrics.gauge("voicecall_store_pending_records", "Call records kept in memory until the log is writable",
                  lambda: manager.store.pending)

    app.router.add_route("*", settings.serve.path, webhook.handle)
    app.router.add_get(settings.streaming.streamPath, streams.handle)
    app.router.add_post("/rpc", rpc.post)
    app.router.add_get("/rpc", rpc.websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app
