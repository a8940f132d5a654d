"""One mypy run per test session, started in the background at a lower priority as soon as the run is
collected (tests/conftest.py): the suite mostly waits on real time, so the minute a cold mypy takes
runs beside the other tests instead of after them. tests/test_checks.py::test_mypy waits for it.

Under pytest-xdist the controller runs it (once, not once per worker) and leaves its exit code and
output in a file; the worker that runs test_mypy reads that file (`wait_for_report`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent

_process: subprocess.Popen[str] | None = None
_output: IO[str] | None = None
_reporter: threading.Thread | None = None
report_file: Path | None = None  # set in an xdist worker: where the controller's run reports


def start(report_to: Path | None = None) -> None:
    """Start mypy unless it is running already; with `report_to`, write its result there when it ends."""
    global _process, _output, _reporter
    if _process is not None:
        return
    # The cache outlives the run (a warm run takes seconds; a cold one about a minute). One cache per
    # checkout: two checkouts sharing one cache at the same time crash mypy (INTERNAL ERROR).
    tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    cache = Path(tempfile.gettempdir()) / f"voicecall-mypy-cache-{tag}"
    _output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read and closed in result()
    _process = subprocess.Popen([sys.executable, "-m", "mypy", "--cache-dir", str(cache)], cwd=ROOT, text=True,
                                stdout=_output, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))
    if report_to is not None:
        _reporter = threading.Thread(target=_report, args=(_process, _output, report_to), daemon=True)
        _reporter.start()


def _report(process: subprocess.Popen[str], output: IO[str], path: Path) -> None:
    code = process.wait()
    output.seek(0)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"code": code, "output": output.read()}))
    partial.replace(path)  # the reader never sees half a file


def result(timeout: float) -> tuple[int, str]:
    """(exit code, output) of the run, started here if it was not yet; it is killed after `timeout` s."""
    if report_file is not None:
        return wait_for_report(report_file, timeout)
    start()
    assert _process is not None and _output is not None
    try:
        code = _process.wait(timeout=timeout)
    finally:
        stop()
    _output.seek(0)
    return code, _output.read()


def wait_for_report(path: Path, timeout: float) -> tuple[int, str]:
    """The result another process's run wrote to `path` (polled: it is a file, not a child of ours)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no mypy result in {path} after {timeout:.0f} s")
        time.sleep(0.2)
    data = json.loads(path.read_text())
    return int(data["code"]), str(data["output"])


def stop() -> None:
    """Kill the run if it is still going (the session ended before test_mypy, or it timed out)."""
    if _process is not None and _process.poll() is None:
        _process.kill()
        _process.wait()
    if _reporter is not None:
        _reporter.join(timeout=10)
