"""`make test` runs the files in parallel pytest-xdist workers: each worker (and each process it starts)
takes ports only from its own share, so two tests running side by side never get the same port."""

from __future__ import annotations

import socket

import pytest

from tests import harness
from tests.peers import ports
from tests.workers import slot


def _as_worker(monkeypatch: pytest.MonkeyPatch, index: int, count: int) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(count))


def test_outside_xdist_there_is_one_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert slot() == (0, 1)


def test_os_assigned_ports_are_split_between_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    handed: dict[int, set[int]] = {}
    for index in range(3):
        _as_worker(monkeypatch, index, 3)
        handed[index] = {harness.free_port() for _ in range(20)}
        assert len(handed[index]) == 20, "a process never hands out the same port twice in a row"
        assert all((port // 2) % 3 == index for port in handed[index])
    assert not (handed[0] & handed[1] or handed[0] & handed[2] or handed[1] & handed[2])
    with socket.socket() as sock:  # and each is really free
        sock.bind(("127.0.0.1", handed[2].pop()))


def test_peer_port_blocks_are_split_between_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(3):
        _as_worker(monkeypatch, index, 3)
        taken = [ports.sipp_media() for _ in range(30)]  # 100-port blocks from 26000, wrapping around
        assert {(port - 26000) // 100 % 3 for port in taken} == {index}
        assert all(26000 <= port < 30000 for port in taken)
