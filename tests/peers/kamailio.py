"""Run Kamailio (Debian `kamailio` 5.6) with the repo's docker/kamailio/kamailio.cfg on loopback
ports, in front of bridge nodes, and read its dispatcher's view of them (`kamcmd dispatcher.list`)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

KAMAILIO = shutil.which("kamailio") or shutil.which("kamailio", path="/usr/sbin:/sbin")
KAMCMD = shutil.which("kamcmd") or shutil.which("kamcmd", path="/usr/sbin:/sbin")
CONFIG = Path(__file__).resolve().parents[2] / "docker" / "kamailio" / "kamailio.cfg"

_DEST = re.compile(r"URI:\s*(\S+)\s+FLAGS:\s*(\S+)")


def dispatcher_list(nodes: list[tuple[str, int]]) -> str:
    """The dispatcher's list file: every node in set 1."""
    return "".join(f"1 sip:{host}:{port}\n" for host, port in nodes)


class Kamailio:
    """One Kamailio process (not daemonized; its children die with it) on 127.0.0.1:`port`."""

    def __init__(self, directory: Path, port: int, nodes: list[tuple[str, int]], *, ping_interval_s: int = 1,
                 probe_timeout_ms: int = 1000) -> None:
        self.directory = directory
        self.port = port
        self.ctl = f"unix:{directory / 'ctl'}"
        self.log = directory / "kamailio.log"
        (directory / "dispatcher.list").write_text(dispatcher_list(nodes))
        self.args = [
            str(KAMAILIO), "-DD", "-E", "-f", str(CONFIG), "-Y", str(directory), "-P", str(directory / "pid"),
            "-m", "32", "-M", "4",
            "-A", f"LISTEN=udp:127.0.0.1:{port}",
            "-A", f'DISPATCHER_LIST="{directory / "dispatcher.list"}"',
            "-A", f'CTL_SOCKET="{self.ctl}"',
            "-A", f"PING_INTERVAL={ping_interval_s}",
            "-A", f"PROBE_TIMEOUT_MS={probe_timeout_ms}",
        ]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        async with asyncio.timeout(10):
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"kamailio exited: {self.log.read_text(errors='replace')[-2000:]}")
                if await self._kamcmd("core.version") is not None:
                    return
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def _kamcmd(self, *command: str) -> str | None:
        proc = await asyncio.create_subprocess_exec(
            str(KAMCMD), "-s", self.ctl, *command,
            stdin=subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        return out.decode(errors="replace") if proc.returncode == 0 else None

    async def node_flags(self) -> dict[str, str]:
        """Node URI -> dispatcher flags: `AP` active (probed), `IP` inactive, `TP` trying, `DX` disabled."""
        out = await self._kamcmd("dispatcher.list")
        return dict(_DEST.findall(out or ""))

    async def wait_for_flags(self, wanted: dict[str, str], timeout: float = 15) -> None:
        """Wait until every named node shows the first letter of its wanted flags (A or I)."""
        async with asyncio.timeout(timeout):
            while True:
                flags = await self.node_flags()
                if all(flags.get(uri, "")[:1] == state[:1] for uri, state in wanted.items()):
                    return
                await asyncio.sleep(0.1)

    def lines(self, marker: str) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if marker in line]
