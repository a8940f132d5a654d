"""An unwritable call log (a full disk: /dev/full) over a real server: health says degraded, metrics
count the failures, calls keep working, and every kept record is written once the disk is back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from bridge.calls import CallState, EventType
from bridge.store import CallStore, read_log
from tests.harness import run_bridge
from tests.test_manager import ev, make, settle

ROOT = Path(__file__).resolve().parents[1]
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")


def full_disk(store: Path) -> None:
    log = store / "calls.jsonl"
    if log.exists() or log.is_symlink():
        log.unlink()
    log.symlink_to("/dev/full")  # every write: ENOSPC


def disk_back(store: Path) -> None:
    (store / "calls.jsonl").unlink()


@needs_dev_full
async def test_full_disk_degrades_health_counts_failures_and_flushes_when_back(tmp_path: Path) -> None:
    manager, carrier, clock = make(tmp_path)
    await manager.start()
    full_disk(tmp_path)
    manager.store._close_fd()  # noqa: SLF001 - the disk fills while the log is open: next write reopens
    call = await manager.initiate(None, "Hello", "conversation")
    manager.process_event(ev(EventType.ANSWERED, call.callId))
    await settle()
    assert manager.store.degraded and manager.store.write_failures >= 1
    assert manager.store.last_error == "No space left on device"
    assert call.state == CallState.LISTENING  # the call goes on
    disk_back(tmp_path)
    await clock.advance(5.1)  # the retry timer writes what was kept
    assert not manager.store.degraded
    assert read_log(tmp_path / "calls.jsonl").calls[call.callId].state == CallState.LISTENING
    await manager.stop()


@needs_dev_full
async def test_health_and_metrics_report_an_unwritable_log(tmp_path: Path) -> None:
    async with run_bridge({"provider": "mock", "fromNumber": "+15550001234", "responseModel": "none",
                           "mock": {"ringDelayMs": 60_000}}, tmp_path) as runtime:
        base = f"http://127.0.0.1:{runtime.port}"
        full_disk(tmp_path)
        runtime.manager.store._close_fd()  # noqa: SLF001
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/rpc", json={"jsonrpc": "2.0", "id": 1, "method": "voicecall.initiate",
                                                         "params": {"to": "+15550007777", "message": "hi"}}) as resp:
                assert "result" in await resp.json()
            async with session.get(f"{base}/healthz") as resp:
                health = await resp.json()
            async with session.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
        assert health["ok"] is False and health["status"] == "degraded"
        assert "No space left on device" in health["problems"][0]
        failures = runtime.manager.store.write_failures
        assert failures >= 1  # one per record written while the disk is full
        assert "# TYPE voicecall_store_write_failures_total counter\n" in metrics
        assert f"\nvoicecall_store_write_failures_total {float(failures)}\n" in metrics
        assert "\nvoicecall_store_pending_records 1.0\n" in metrics
        disk_back(tmp_path)


def test_store_write_is_one_line_per_record_and_repairs_a_torn_tail(tmp_path: Path) -> None:
    (tmp_path / "calls.jsonl").write_bytes(b'{"callId": "torn"')
    store = CallStore(tmp_path)
    store.open()
    assert (tmp_path / "calls.jsonl").read_bytes().endswith(b"\n")
    store.close()


@pytest.mark.parametrize("kind", ["directory", "file-for-folder"])
def test_serve_with_an_unusable_call_log_is_one_line(tmp_path: Path, kind: str) -> None:
    store = tmp_path / "store"
    if kind == "directory":
        (store / "calls.jsonl").mkdir(parents=True)
    else:
        store.write_text("not a folder")
    config = tmp_path / "c.yaml"
    config.write_text(f"provider: mock\nstore: {store}\nserve: {{port: 0}}\n")
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.startswith("voicecall: cannot open the call log in ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
