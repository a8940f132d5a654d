"""Run sipp (Debian `sip-tester` 3.6) scenarios from tests/peers/scenarios against the bridge."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SIPP = shutil.which("sipp")
SCENARIOS = Path(__file__).parent / "scenarios"


@dataclass
class SippResult:
    returncode: int
    output: str
    errors: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


async def run_sipp(
    scenario: str,
    target: str | None,
    *,
    workdir: Path,
    local_port: int,
    media_port: int,
    calls: int = 1,
    limit: int = 1,
    rate: float = 10,
    hold_ms: int = 1000,
    service: str = "bot",
    timeout_s: int = 30,
    keys: dict[str, str] | None = None,
    transport: str = "u1",
    prefix: list[str] | None = None,
) -> SippResult:
    """Run one sipp scenario to completion (bounded by timeout_s; the process is killed after).
    `target` is the bridge's host:port for UAC scenarios, None for UAS scenarios; `prefix` runs sipp
    under another command (e.g. `taskset -c 1`)."""
    assert SIPP, "sipp is not installed"
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        *(prefix or []), SIPP, "-sf", str(SCENARIOS / scenario), "-s", service,
        "-m", str(calls), "-l", str(limit), "-r", str(rate), "-d", str(hold_ms),
        "-i", "127.0.0.1", "-p", str(local_port), "-mi", "127.0.0.1", "-mp", str(media_port),
        "-t", transport, "-nostdin", "-timeout", f"{timeout_s}s", "-timeout_error", "-trace_err",
        "-error_file", str(workdir / "errors.log"),
    ]
    if os.environ.get("SIPP_TRACE"):  # debugging aid: every SIP message into workdir/msg.log
        args += ["-trace_msg", "-message_file", str(workdir / "msg.log")]
    for key, value in (keys or {}).items():
        args += ["-key", key, value]
    if target:
        args.append(target)
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=workdir, stdin=subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s + 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    errors_file = workdir / "errors.log"
    errors = errors_file.read_text(errors="replace") if errors_file.exists() else ""
    return SippResult(proc.returncode or 0, out.decode(errors="replace"), errors)
