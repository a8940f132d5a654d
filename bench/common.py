"""Shared plumbing of the benchmarks: pinned server processes, /proc readings, tables, results."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int | None, argv: Sequence[str]) -> list[str]:
    """`argv` under `taskset -c cpu` (when taskset exists and the CPU does)."""
    if cpu is None or shutil.which("taskset") is None or cpu >= (os.cpu_count() or 1):
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What a figure depends on: CPU model and cores, memory, kernel, Python, load average (before)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": mem_gib, "python": platform.python_version(),
            "python_impl": platform.python_implementation(), "kernel": platform.release(),
            "loadavg": loadavg()}


# Libraries whose version moves the media-path figures (absent ones are reported as None).
MEDIA_LIBS = ("aiohttp", "numpy", "soxr", "uvloop", "orjson", "pybase64", "yarl", "multidict")
PEER_LIBS = ("pipecat-ai", "fastapi", "uvicorn", "starlette", "websockets", "uvloop", "httptools", "numpy", "soxr")


def versions(names: Sequence[str], python: str | None = None) -> dict[str, str | None]:
    """Installed versions of `names` in this interpreter, or in another one (a peer's venv)."""
    if python is None or python == sys.executable:
        return {n: _version(n) for n in names}
    code = ("import json, sys, platform, importlib.metadata as m\n"
            "def v(n):\n    try:\n        return m.version(n)\n    except m.PackageNotFoundError:\n        return None\n"
            "print(json.dumps({'python': platform.python_version(), **{n: v(n) for n in sys.argv[1:]}}))")
    try:
        out = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=60, check=True)
        result: dict[str, str | None] = json.loads(out.stdout)
        return result
    except (OSError, subprocess.SubprocessError, ValueError):
        return {n: None for n in names}


class Server:
    """A server subprocess (its own process group), stopped by SIGTERM then SIGKILL, never leaked."""

    def __init__(self, argv: Sequence[str], *, cwd: Path = ROOT, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(list(argv), cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_http(self, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - 127.0.0.1 only
                    if resp.status < 500:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready at {url} after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 8.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any], out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def python() -> str:
    return sys.executable


def finish(name: str, data: dict[str, Any], args: Any) -> int:
    """Write the results file (`--out`), say where, print them as JSON with `--json`; the exit status."""
    path = write_results(name, data, args.out)
    print(f"results: {path}")
    if args.json:
        print(json.dumps(data, indent=2))
    return 0


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--json (print the results) and --out (where the results file goes), as `finish` reads them."""
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out")


def pin_cpu(cpu: int) -> None:
    """Pin this process to CPU `cpu` (-1, or a CPU this machine does not have: leave it)."""
    if cpu >= 0 and hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})
