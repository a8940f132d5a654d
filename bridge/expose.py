"""Public exposure of the webhook: Tailscale serve/funnel and ngrok, through their own CLIs."""

from __future__ import annotations

import asyncio
import json
import shutil


class ExposeError(Exception):
    pass


async def _run(*argv: str, timeout: float = 20) -> str:
    binary = shutil.which(argv[0])
    if binary is None:
        raise ExposeError(f"`{argv[0]}` is not installed or not on PATH; install it or set publicUrl instead")
    proc = await asyncio.create_subprocess_exec(binary, *argv[1:], stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        raise ExposeError(f"`{' '.join(argv)}` did not finish in {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise ExposeError(f"`{' '.join(argv[:3])}` failed: {err.decode(errors='replace').strip()[:300]}")
    return out.decode(errors="replace")


async def tailscale_dns_name() -> str:
    status = json.loads(await _run("tailscale", "status", "--json"))
    name = str((status.get("Self") or {}).get("DNSName") or "").rstrip(".")
    if not name:
        raise ExposeError("tailscale is not logged in (no DNS name in `tailscale status`)")
    return name


async def tailscale_expose(mode: str, *, port: int, path: str, serve_path: str) -> str | None:
    """`tailscale serve|funnel --bg --set-path PATH http://127.0.0.1:PORT<servePath>`; `off` resets both."""
    if mode == "off":
        await _run("tailscale", "serve", "reset")
        await _run("tailscale", "funnel", "reset")
        return None
    if mode not in ("serve", "funnel"):
        raise ExposeError(f"expose mode must be funnel, serve or off (got {mode!r})")
    target = f"http://127.0.0.1:{port}{serve_path}"
    await _run("tailscale", mode, "--bg", "--set-path", path, target)
    return f"https://{await tailscale_dns_name()}{path}"
