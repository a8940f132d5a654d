"""Packaging as users expect: version, `python -m bridge`, LICENSE, console files in the package, and a
Makefile that installs only when something changed and says what `make clean` leaves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

import bridge

ROOT = Path(__file__).resolve().parent.parent


def test_version_and_module_entry_point() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bridge", "--version"], check=False, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == f"voicecall {bridge.__version__}"


def test_license_and_metadata_agree() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]
    assert "version" in project["dynamic"]
    assert "prometheus-client>=0.20" in project["dependencies"]
    assert any(dep.startswith("opentelemetry-sdk") for dep in project["optional-dependencies"]["telemetry"])


def test_console_files_ship_in_the_package() -> None:
    static = resources.files("bridge.console").joinpath("static")
    for name in ("index.html", "app.js", "style.css"):
        text = static.joinpath(name).read_text()
        assert "http://" not in text and "https://" not in text, f"{name} must not load anything from elsewhere"
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert data["bridge.console"] == ["static/*"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_installs_only_when_something_changed(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "system-deps.sh").write_text("#!/bin/sh\n")
    (tmp_path / "pyproject.toml").write_text("")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("")

    def plan(target: str) -> str:
        return subprocess.run(["make", "-n", target], check=True, capture_output=True, text=True, cwd=tmp_path,
                              timeout=30).stdout

    assert "pip install -q -e ." in plan("demo")  # never installed
    stamp = tmp_path / ".venv" / ".installed-demo"
    stamp.write_text("")
    os.utime(tmp_path / "pyproject.toml", (1, 1))
    os.utime(tmp_path / "scripts" / "system-deps.sh", (1, 1))
    assert "pip install" not in plan("demo") and "voicecall demo" in plan("demo")
    os.utime(tmp_path / "pyproject.toml")  # the dependencies changed
    assert "pip install -q -e ." in plan("demo")
    clean = subprocess.run(["make", "clean"], check=True, capture_output=True, text=True, cwd=tmp_path,
                           timeout=30).stdout
    assert "kept: the call store" in clean and not (tmp_path / ".venv").exists()
