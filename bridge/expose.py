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


class NgrokTunnel:
    """`ngrok http PORT` as a child process; its public URL is read from ngrok's JSON log."""

    def __init__(self, port: int, *, authtoken: str | None = None, domain: str | None = None) -> None:
        self.port = port
        self._authtoken = authtoken
        self.domain = domain
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 20) -> str:
        binary = shutil.which("ngrok")
        if binary is None:
            raise ExposeError("`ngrok` is not installed or not on PATH; install it or set publicUrl instead")
        argv = [binary, "http", str(self.port), "--log", "stdout", "--log-format", "json"]
        if self.domain:
            argv += ["--url", self.domain]
        env = None
        if self._authtoken:
            import os

            env = {**os.environ, "NGROK_AUTHTOKEN": self._authtoken}
        self._proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                          stderr=asyncio.subprocess.STDOUT, env=env)
        assert self._proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while line := await self._proc.stdout.readline():
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if entry.get("lvl") in ("eror", "crit"):
                        raise ExposeError(f"ngrok: {entry.get('err') or entry.get('msg')}")
                    url = entry.get("url")
                    if isinstance(url, str) and url.startswith("https://"):
                        return url
        except TimeoutError:
            pass
        await self.stop()
        raise ExposeError(f"ngrok did not report a public URL within {timeout:.0f}s")

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except TimeoutError:
                self._proc.kill()
        self._proc = None


class TailscaleExposure:
    """What `serve` set up with tailscale serve/funnel; stop() resets it, so nothing stays exposed."""

    async def stop(self) -> None:
        try:
            await tailscale_expose("off", port=0, path="", serve_path="")
        except ExposeError as exc:
            import logging

            logging.getLogger(__name__).warning("tailscale exposure not reset: %s", exc)


async def open_tunnel(provider: str, *, port: int, path: str, serve_path: str | None = None,
                      authtoken: str | None = None,
                      domain: str | None = None) -> tuple[str, NgrokTunnel | TailscaleExposure]:
    """Start the configured tunnel; returns (public webhook URL, handle to stop it).

    `path` is the public path; for tailscale it maps onto `serve_path` (our webhook path)."""
    if provider == "ngrok":
        tunnel = NgrokTunnel(port, authtoken=authtoken, domain=domain)
        origin = await tunnel.start()
        return origin.rstrip("/") + path, tunnel
    if provider in ("tailscale-serve", "tailscale-funnel"):
        url = await tailscale_expose(provider.removeprefix("tailscale-"), port=port, path=path,
                                     serve_path=serve_path or path)
        return str(url), TailscaleExposure()
    raise ExposeError(f"tunnel.provider: unknown provider {provider!r}")
