"""Run a fake's aiohttp app on an ephemeral 127.0.0.1 port."""

from __future__ import annotations

from aiohttp import web


async def serve_local(app: web.Application) -> tuple[web.AppRunner, int]:
    """Start `app` on 127.0.0.1 with a port the kernel picks; returns the runner (cleanup() stops it)
    and the port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)  # a handler left open holds cleanup 5 s, not 60
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]  # noqa: SLF001
