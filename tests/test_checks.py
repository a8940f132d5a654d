"""Lint and types in the test command (so `.ci/run` = `make test` runs them): ruff and mypy with the
rules in pyproject.toml. Skipped only where the tool is not installed (the `dev` extra installs it).
The import layers are checked by tests/test_layers.py."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_ruff() -> None:
    result = _run("ruff", "check", "--no-cache", "bridge", "carriers", "media", "tests", "bench", timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.timeout(600)
def test_mypy() -> None:
    # The cache outlives the run (a warm run takes seconds; a cold one about a minute). One cache per
    # checkout: two checkouts sharing one cache at the same time crash mypy (INTERNAL ERROR).
    tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    cache = Path(tempfile.gettempdir()) / f"voicecall-mypy-cache-{tag}"
    result = _run("mypy", "--cache-dir", str(cache), timeout=580)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
