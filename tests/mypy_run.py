"""One mypy run per test session, started in the background at a lower priority as soon as the run is
collected (tests/conftest.py): the suite mostly waits on real time, so the minute a cold mypy takes
runs beside the other tests instead of after them. tests/test_checks.py::test_mypy waits for it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent

_process: subprocess.Popen[str] | None = None
_output: IO[str] | None = None


def start() -> None:
    """Start mypy unless it is running already."""
    global _process, _output
    if _process is not None:
        return
    # The cache outlives the run (a warm run takes seconds; a cold one about a minute). One cache per
    # checkout: two checkouts sharing one cache at the same time crash mypy (INTERNAL ERROR).
    tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    cache = Path(tempfile.gettempdir()) / f"voicecall-mypy-cache-{tag}"
    _output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read and closed in result()
    _process = subprocess.Popen([sys.executable, "-m", "mypy", "--cache-dir", str(cache)], cwd=ROOT, text=True,
                                stdout=_output, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))


def result(timeout: float) -> tuple[int, str]:
    """(exit code, output) of the run, started here if it was not yet; it is killed after `timeout` s."""
    start()
    assert _process is not None and _output is not None
    try:
        code = _process.wait(timeout=timeout)
    finally:
        stop()
    _output.seek(0)
    return code, _output.read()


def stop() -> None:
    """Kill the run if it is still going (the session ended before test_mypy, or it timed out)."""
    if _process is not None and _process.poll() is None:
        _process.kill()
        _process.wait()
