"""Lint and types in the test command (so `.ci/run` = `make test` runs them): ruff and mypy with the
rules in pyproject.toml. Skipped only where the tool is not installed (the `dev` extra installs it).
The import layers are checked by tests/test_layers.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests import mypy_run

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
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    code, output = mypy_run.result(timeout=580)  # started beside the other tests by tests/conftest.py
    assert code == 0, output[-6000:]
