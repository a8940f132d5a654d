"""Session hooks: the type check (tests/test_checks.py::test_mypy) starts as soon as the run is
collected, beside the other tests, and never outlives the run."""

from __future__ import annotations

import pytest

from tests import mypy_run


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(item.nodeid.endswith("test_checks.py::test_mypy") for item in session.items):
        mypy_run.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    mypy_run.stop()
