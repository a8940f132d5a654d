"""Which pytest-xdist worker this process is (`make test` runs several): each worker, and each process a
test starts (they inherit the variables), takes ports only from its own share, so two tests running at
the same time in different workers are never handed the same port."""

from __future__ import annotations

import os


def slot() -> tuple[int, int]:
    """(this worker's index, how many workers); (0, 1) outside xdist."""
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0
    return index % count, count
