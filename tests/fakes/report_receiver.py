"""A local receiver of after-call reports: scripted statuses, signature checked, deliveries deduped."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from bridge.report import verify
from tests.fakes.http_app import serve_local

SECRET = "hook-secret-123"


class Receiver:
    """A report receiver on 127.0.0.1: answers with the scripted statuses, then 200; checks signatures."""

    def __init__(self, statuses: list[int] | None = None, now: Any = time.time) -> None:
        self.statuses = list(statuses or [])
        self.now = now
        self.received: list[dict[str, Any]] = []  # every request: headers, body, valid signature
        self.accepted: dict[str, dict[str, Any]] = {}  # deduped on the delivery id, 2xx only
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify(SECRET, request.headers.get("X-Voicecall-Signature", ""), body, self.now())
        delivery = request.headers.get("X-Voicecall-Delivery", "")
        self.received.append({"delivery": delivery, "body": body, "valid": ok, "at": self.now(),
                              "event": request.headers.get("X-Voicecall-Event")})
        if not ok:
            return web.Response(status=401)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.accepted.setdefault(delivery, json.loads(body))
        return web.Response(status=status)

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/hooks/call-ended", self.handle)
        if port:
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", port).start()
            self.port = port
        else:
            self.runner, self.port = await serve_local(app)
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/call-ended"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
