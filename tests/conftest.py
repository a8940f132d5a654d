"""Session hooks: the type check (tests/test_checks.py::test_mypy) starts as soon as the run is
collected, beside the other tests, and never outlives the run. Under pytest-xdist (`make test` runs
`-n 3 --dist loadfile`) the controller runs it once for all workers (tests/mypy_run.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import mypy_run

MYPY_TEST = "test_checks.py::test_mypy"
# Under xdist the files go to the workers in collection order: the slowest first (seconds per file in a
# `make test` run on 2 cores, 17:00 UTC 2026-12-01), so no long file starts last and runs alone at the end.
SLOW_FIRST = ("test_bench_smoke.py", "test_fuzz.py", "test_sip_calls.py", "test_hardening_cli.py",  # 77-55 s
              "test_rpc_cli_tool.py", "test_conversation_e2e.py", "test_twilio_e2e.py", "test_realtime_openai.py",
              "test_native_amd_e2e.py", "test_mock_e2e.py", "test_console_browser.py", "test_plivo_e2e.py",
              "test_telnyx_e2e.py", "test_cluster_lab.py", "test_sip_kamailio.py", "test_cluster_nodes.py",
              "test_sip_sipp.py", "test_asterisk_nodes.py", "test_faults.py", "test_sip_lab.py")  # ... 19 s
_REPORT_KEY = "voicecall_mypy_report"
_report_dir: Path | None = None  # the controller's: where its mypy run reports to the workers


def pytest_configure(config: pytest.Config) -> None:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None and _REPORT_KEY in workerinput:
        mypy_run.report_file = Path(workerinput[_REPORT_KEY])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker; every worker sorts alike, so they agree
        rank = {name: i for i, name in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def pytest_collection_finish(session: pytest.Session) -> None:
    if mypy_run.report_file is None and any(item.nodeid.endswith(MYPY_TEST) for item in session.items):
        mypy_run.start()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller, before a worker starts: tell it where the one mypy run will report."""
    global _report_dir
    if _report_dir is None:
        _report_dir = Path(tempfile.mkdtemp(prefix="voicecall-mypy-"))
    node.workerinput[_REPORT_KEY] = str(_report_dir / "result.json")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: Sequence[str]) -> None:
    """xdist controller: the first worker to finish collecting says whether test_mypy will run."""
    if _report_dir is not None and any(nodeid.endswith(MYPY_TEST) for nodeid in ids):
        mypy_run.start(report_to=_report_dir / "result.json")


def pytest_sessionfinish(session: pytest.Session) -> None:
    mypy_run.stop()
    if _report_dir is not None and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_report_dir, ignore_errors=True)
